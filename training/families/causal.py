"""The ``causal`` family: a left-to-right transformer with draft heads (format 2; the bundled model).

Model ``training/causal.py`` (CausalLM). Loss: next-token cross-entropy up to and including EOS, plus
``draft_weight`` times each draft head's cross-entropy (head k at position j predicts the token k + 1 places
after it: multi-token prediction, Medusa's heads). Decoded by draft-and-verify, so the draft heads buy
calls and never change the molecules. Exported as a causal step (``imadarem export``) or a decode file
(``--decode``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from imadarem.runtime.errors import ImadaremError, ModelFileError
from imadarem.runtime.formats.causal import CausalConfig
from imadarem.training.causal import CausalLM
from imadarem.training.checks import check_size, config_values
from imadarem.training.distributed import global_sum
from imadarem.training.families.base import Family, LossInput


@dataclass
class CausalTraining:
    """The training knobs of the causal family, beside the model's shape (``CausalConfig``)."""

    draft_weight: float = 0.5  # weight of each draft head's loss
    ema_decay: float = 0.999  # EMA of the weights (decay warmed up as (1 + s) / (10 + s))
    dropout: float = 0.0  # on the embeddings and every residual branch, in training only
    # train the draft heads alone on a trunk from --init-from (more heads with --drafts: each new one starts as
    # the next-token head): draft-and-verify keeps the trunk's molecules, so only the calls a molecule costs change
    freeze_trunk: bool = False


@dataclass
class CausalTrainConfig:
    """What a causal checkpoint records: the model's shape and its training knobs, one flat dict."""

    model: CausalConfig
    training: CausalTraining = field(default_factory=CausalTraining)

    def __getattr__(self, name: str):  # max_seq_len, vocab_size, ... and draft_weight, ema_decay
        for part in ("model", "training"):
            inner = self.__dict__.get(part)
            if inner is not None and name in {f.name for f in dataclasses.fields(inner)}:
                return getattr(inner, name)
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        return {**self.model.to_dict(), **dataclasses.asdict(self.training)}


class CausalFamily(Family):
    name = "causal"
    summary = "a left-to-right transformer with draft heads, decoded by draft-and-verify (format 2)"
    flags = {"--hidden-size": "hidden_size", "--layers": "num_layers", "--heads": "num_heads",
             "--max-seq-len": "max_seq_len", "--drafts": "num_drafts", "--dropout": "dropout"}
    shown = ("loss", "ce", "draft_ce")

    def make_config(self, vocab_size: int, fields: dict[str, Any]) -> CausalTrainConfig:
        names = {f.name for f in dataclasses.fields(CausalConfig)} - {"vocab_size"}
        model = config_values(CausalConfig, {k: v for k, v in fields.items() if k in names}, self.name,
                              skip=("vocab_size",))
        rest = {k: v for k, v in fields.items() if k not in names}
        training = config_values(CausalTraining, rest, self.name)
        return self._checked(CausalConfig(vocab_size=vocab_size, **model), CausalTraining(**training))

    def config_from_dict(self, data: dict[str, Any]) -> CausalTrainConfig:
        names = {f.name for f in dataclasses.fields(CausalTraining)}
        try:
            model = CausalConfig.from_dict({k: v for k, v in data.items() if k not in names}, "checkpoint")
        except ModelFileError as exc:
            raise ImadaremError(str(exc)) from None
        return self._checked(model, CausalTraining(**{k: v for k, v in data.items() if k in names}))

    @staticmethod
    def _checked(model: CausalConfig, training: CausalTraining) -> CausalTrainConfig:
        checks = [(model.hidden_size > 0 and model.num_heads > 0 and model.hidden_size % model.num_heads == 0,
                   "hidden_size must be a positive multiple of num_heads"),
                  (model.num_layers >= 1, "num_layers must be >= 1"), (model.max_seq_len >= 2, "max_seq_len must be >= 2"),
                  (0 <= model.num_drafts <= 16, "num_drafts must be in 0..16"),
                  (model.sampling_temperature >= 0, "sampling_temperature must be >= 0"),
                  (training.draft_weight >= 0, "draft_weight must be >= 0"),
                  (0.0 <= training.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
                  (0.0 <= training.dropout < 1.0, "dropout must be in [0, 1)")]
        for ok, message in checks:
            if not ok:
                raise ImadaremError(f"bad model config: {message}")
        check_size(model.hidden_size, model.num_layers, model.vocab_size, model.max_seq_len)
        return CausalTrainConfig(model, training)

    def build(self, config: CausalTrainConfig, tokenizer) -> CausalLM:
        model = CausalLM(config.model, tokenizer, dropout=config.training.dropout)
        if config.training.freeze_trunk:  # the optimiser skips every weight but the draft heads'
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith(self.fresh_on_init(config)))
        return model

    def fresh_on_init(self, config) -> tuple[str, ...]:
        """Draft heads: a run may keep more or fewer than its --init-from checkpoint (new ones start fresh)."""
        return ("draft.",)

    def train_module(self, model: CausalLM):
        return _TeacherForcing(model)

    def loss(self, config: CausalTrainConfig, batch: LossInput):
        clean, sp = batch.clean, batch.special
        cfg, weight = config.model, config.training.draft_weight
        bos = torch.full_like(clean[:, :1], sp.mask)
        inputs = torch.cat([bos, clean[:, :-1]], 1)
        with batch.autocast() if batch.autocast else contextlib.nullcontext():
            logits, drafts = batch.forward(inputs)
        # positions up to and including each row's first EOS (the rest is PAD and learns nothing)
        valid = clean != sp.pad
        if sp.eos is not None:
            is_eos = (clean == sp.eos).long()
            valid = (torch.cumsum(is_eos, 1) - is_eos) == 0
        V = cfg.vocab_size
        ce = F.cross_entropy(logits.float().reshape(-1, V), clean.reshape(-1), reduction="none").view_as(clean)
        sums = [(ce * valid).sum()]
        counts = [valid.sum()]
        for k in range(1, cfg.num_drafts + 1):  # head k at position j: the token at j + k
            target, ok = clean[:, k:], valid[:, k:]
            d = F.cross_entropy(drafts[:, :-k, k - 1].float().reshape(-1, V), target.reshape(-1),
                                reduction="none").view_as(target)
            sums.append((d * ok).sum())
            counts.append(ok.sum())
        n = global_sum(torch.stack(counts).float()).clamp(min=1.0)
        terms = torch.stack(sums) / n
        loss = terms[0] + weight * terms[1:].sum()
        stats = global_sum(torch.stack(sums).detach()) / n
        metrics = {"loss": stats[0] + weight * stats[1:].sum(), "ce": stats[0],
                   "draft_ce": stats[1:].mean() if cfg.num_drafts else stats[0] * 0, "tokens": n[0]}
        return loss * batch.world, metrics


class _TeacherForcing(torch.nn.Module):
    """The whole sequence in one causal pass: next-token and draft logits at every position."""

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.teacher_forcing(tokens)

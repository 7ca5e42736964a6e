"""The ``refine`` family: a bidirectional refinement model with a learned gate (format 1).

Model ``training/model.py``; objective ``training/objective.py``: ``imadarem-v`` (Imadarem V: masks at the
rate of step t, refills from the EMA teacher's own samples, a gate that marks wrong tokens) or ``mixture``
(the masks the samplers show, semi-autoregressive blocks among them, and a gate that scores the token
each position holds or will hold). Exported by ``imadarem export`` as a refinement step.
"""

from __future__ import annotations

from typing import Any

import torch
from imadarem.training.block_objective import block_loss
from imadarem.training.checks import check_size, config_values
from imadarem.training.config import ImplicitRefinementConfig
from imadarem.training.families.base import Family, LossInput
from imadarem.training.model import ImplicitRefinementModel
from imadarem.training.objective import corrupt, corrupt_mixture, draw_noise, refinement_loss


class _TrainView(torch.nn.Module):
    """Makes ``forward_train`` the forward DDP wraps (DDP hooks only ``forward``)."""

    def __init__(self, model: ImplicitRefinementModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, step, cond, allowed=None, positions=None, placed=None):
        return self.model.forward_train(tokens, step, cond, allowed, positions, placed)


class RefineFamily(Family):
    name = "refine"
    summary = "Imadarem V: a bidirectional refinement model with a learned gate (format 1)"
    flags = {"--hidden-size": "hidden_size", "--layers": "num_layers", "--heads": "num_heads",
             "--dropout": "dropout", "--max-seq-len": "max_seq_len", "--refine-steps": "max_refinement_steps",
             "--schedule": "corruption_schedule", "--critic/--no-critic": "use_critic",
             "--gate/--no-gate": "use_refine_gate"}
    shown = ("loss", "ce", "gate_acc")

    def make_config(self, vocab_size: int, fields: dict[str, Any]) -> ImplicitRefinementConfig:
        values = config_values(ImplicitRefinementConfig, fields, self.name, skip=("vocab_size",))
        values.setdefault("max_seq_len", 64)
        return self._sized(ImplicitRefinementConfig(vocab_size=vocab_size, **values))

    def config_from_dict(self, data: dict[str, Any]) -> ImplicitRefinementConfig:
        return self._sized(ImplicitRefinementConfig.from_dict(data))

    @staticmethod
    def _sized(config: ImplicitRefinementConfig) -> ImplicitRefinementConfig:
        check_size(config.hidden_size, config.num_layers, config.vocab_size, config.max_seq_len, config.mlp_ratio)
        return config

    def build(self, config, tokenizer) -> ImplicitRefinementModel:
        model = ImplicitRefinementModel(config, tokenizer)
        if config.freeze_trunk:  # only the heads learn (gate, verifier); the optimiser skips the rest
            heads = tuple(h for h in self.fresh_on_init(config) if h != "gate_head." or config.gate_loss_weight > 0)
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith(heads))
        return model

    def fresh_on_init(self, config) -> tuple[str, ...]:
        """A gate head of another shape (``gate_head_hidden``) or a verifier starts fresh on a trained trunk."""
        return ("gate_head.", "verify_")

    def train_module(self, model):
        return _TrainView(model)

    def loss(self, config: ImplicitRefinementConfig, batch: LossInput):
        cfg, sp = config, batch.special
        if cfg.objective == "block":
            return block_loss(batch.forward, batch.ema, batch.clean, batch.generator, batch.global_batch, batch.rows,
                              cfg, sp, batch.world, batch.autocast)
        L = batch.clean.shape[1]
        noise = draw_noise(batch.generator, batch.global_batch, L, cfg, sp, batch.clean.device)
        make = corrupt_mixture if cfg.objective == "mixture" else corrupt
        corrupted = make(batch.clean, noise.rows(batch.rows), batch.ema, cfg, sp, batch.autocast)
        return refinement_loss(batch.forward, corrupted, cfg, sp, batch.world, batch.autocast)

    def unused_parameters(self, config) -> bool:
        """The gate head gets no gradient when the gate is not trained (DDP must know)."""
        return not config.use_refine_gate or config.gate_loss_weight == 0


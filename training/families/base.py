"""What a model family gives the one trainer: its config, its model, and the loss of one batch.

Everything else (data, tokenizers, batching, DDP, resume, time limits, EMA with warm-up, validation,
progress, bf16, checkpoints) is the trainer's, written once for every family (``training/trainer.py``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class LossInput:
    """One (rank's share of a) batch: the clean rows, a generator seeded by (seed, step) for the global
    batch's noise, which rows of the global batch are this rank's, and how to run the model."""

    clean: torch.Tensor  # [b, L] this rank's rows: ids, EOS, then PAD
    generator: torch.Generator
    global_batch: int
    rows: slice
    forward: Any  # the (DDP-wrapped) training forward
    ema: Any  # the EMA weights, or their compiled forward_train (the refine family samples its corruptions from them)
    special: Any
    world: int
    autocast: Any  # a context-manager factory, or None


class Family(abc.ABC):
    """A model family: ``name`` (recorded in checkpoints), the format its files are exported as, its
    config class, and the flags of ``imadarem train`` that set that config's fields."""

    name: ClassVar[str]
    summary: ClassVar[str]
    #: command-line flag -> config field, for the flags this family's config has
    flags: ClassVar[dict[str, str]]
    #: metrics shown on the progress bar and reported for validation (prefixed val_)
    shown: ClassVar[tuple[str, ...]] = ("loss",)

    @abc.abstractmethod
    def make_config(self, vocab_size: int, fields: dict[str, Any]):
        """The config for a vocabulary of ``vocab_size`` with the user's ``fields`` (one-line errors)."""

    @abc.abstractmethod
    def config_from_dict(self, data: dict[str, Any]):
        """The config a checkpoint recorded."""

    @abc.abstractmethod
    def build(self, config, tokenizer) -> torch.nn.Module:
        """A fresh model (its ``tokenizer`` attached, as export needs)."""

    @abc.abstractmethod
    def train_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose ``forward`` is the training forward (what DDP wraps)."""

    @abc.abstractmethod
    def loss(self, config, batch: LossInput) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of the rank's share (scaled so that DDP's average is the global batch's gradient) and
        metrics of the global batch as 0-dim tensors (read, a host sync, only when the trainer logs);
        ``metrics["tokens"]`` counts the tokens it trained on."""

    def unused_parameters(self, config) -> bool:
        """Whether some parameters get no gradient (DDP must be told)."""
        return False

    def fresh_on_init(self, config) -> tuple[str, ...]:
        """Weight-name prefixes that ``--init-from`` may leave out or find in another shape (a head this run
        replaces, which starts from its initial weights); any other misfit is an error."""
        return ()

    def max_seq_len(self, config) -> int:
        return config.max_seq_len

    def ema_decay(self, config) -> float:
        return config.ema_decay

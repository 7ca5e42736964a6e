"""Sums over DDP ranks: every mean a loss takes is over the global batch, so N processes under DDP compute
the loss of one process with the whole batch."""

from __future__ import annotations

import torch


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over DDP ranks (x itself in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x

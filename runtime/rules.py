"""The refinement loop's rules, written once for numpy arrays and torch tensors.

The numpy loop (``runtime/generator.py``), the PyTorch loop (``training/reference.py``), the training
objective (``training/objective.py``) and the sampling head that is traced into the ONNX graph
(``export/sampling_head.py``) must agree on these, so each rule exists exactly once, here
(docs/ARCHITECTURE.md, "The loop"). Every function takes either numpy arrays or torch tensors and
returns the same kind; this module never imports torch itself (the runtime stays torch-free): a tensor
is recognised only when torch was already imported by the caller.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

SCHEDULES = ("linear", "cosine")
#: a sampling temperature at or below this means argmax (greedy)
GREEDY_TEMPERATURE = 1e-6
#: uniforms are clipped into [U_MIN, U_MAX] before the double log of Gumbel noise
U_MIN, U_MAX = 1e-20, 1.0 - 1e-7


def is_tensor(x: Any) -> bool:
    """True for a torch tensor (torch is looked up, never imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _positions(like: Any, length: int) -> Any:
    """[length] int positions on the same backend (and device) as ``like``."""
    if is_tensor(like):
        return sys.modules["torch"].arange(length, device=like.device)
    return np.arange(length)


def _where(cond: Any, a: Any, b: Any) -> Any:
    return sys.modules["torch"].where(cond, a, b) if is_tensor(cond) else np.where(cond, a, b)


# -- EOS ---------------------------------------------------------------------------------------------
def first_eos(tokens: Any, eos: int) -> Any:
    """Position of the first EOS of each row, [B]; the row length when a row has none."""
    is_eos = tokens == eos
    length = tokens.shape[-1]
    if is_tensor(tokens):
        first = is_eos.float().argmax(-1)  # float: ArgMax of bool is not exportable to ONNX
    else:
        first = is_eos.argmax(-1)
    return _where(is_eos.any(-1), first, length)


def after_first_eos(first: Any, length: int) -> Any:
    """[B, length] bool: the positions after each row's first EOS (``first`` from :func:`first_eos`)."""
    return _positions(first, length)[None, :] > first[:, None]


def pad_after_eos(tokens: Any, eos: int | None, pad: int) -> Any:
    """What committing EOS means: every position after a row's first EOS becomes PAD."""
    if eos is None:
        return tokens
    after = after_first_eos(first_eos(tokens, eos), tokens.shape[-1])
    return _where(after, pad, tokens)


def freeze_after_eos(tokens: Any, frozen: Any, eos: int, pad: int) -> tuple[Any, Any]:
    """Freeze the first EOS of each row and turn everything after it into frozen padding."""
    length = tokens.shape[-1]
    first = first_eos(tokens, eos)
    pos = _positions(first, length)[None, :]
    after = pos > first[:, None]
    return _where(after, pad, tokens), frozen | after | (pos == first[:, None])


def eos_banned(first: Any, length: int) -> Any:
    """[B, length] bool: where EOS may not be proposed, before a row's committed EOS, so that a length
    once chosen is final (its padding frozen). Rows without a committed EOS ban nothing."""
    limit = _where(first < length, first, 0)
    return _positions(first, length)[None, :] < limit[:, None]


# -- sampling ------------------------------------------------------------------------------------
def gumbel(uniform: Any) -> Any:
    """Gumbel noise -log(-log u) from uniforms in [0, 1) (clipped away from 0 and 1)."""
    if is_tensor(uniform):
        u = uniform.clamp(U_MIN, U_MAX)
        return -(-u.log()).log()
    g = np.clip(uniform, U_MIN, U_MAX)  # the one new array: the loop calls this on [B, L, V] every step
    np.log(g, out=g)
    np.negative(g, out=g)
    np.log(g, out=g)
    return np.negative(g, out=g)


def gumbel_max(logits: Any, temperature: float, uniform: Any) -> Any:
    """Sample from softmax(logits / temperature) with one uniform per logit: argmax(logits / T + g)."""
    return (logits / temperature + gumbel(uniform)).argmax(-1)


def entropy(logits: Any) -> Any:
    """Entropy in nats of softmax(logits) over the last axis; -inf logits (bans) contribute nothing."""
    if is_tensor(logits):
        torch = sys.modules["torch"]
        logp = torch.log_softmax(logits.float(), -1)
        p = logp.exp()
        return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    shifted = logits - logits.max(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        p = np.exp(logp)
        return (-np.where(p > 0, p * logp, 0.0).sum(-1)).astype(np.float32)


# -- schedules -----------------------------------------------------------------------------------
def check_schedule(kind: str) -> str:
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be 'linear' or 'cosine', got {kind!r}")
    return kind


def mask_schedule(kind: str, ratio: Any) -> Any:
    """Fraction of positions still masked after a fraction ``ratio`` of the steps (1 at 0, 0 at 1):
    linear 1 - r, or cosine cos(pi/2 r). The training corruption and the unmasking selectors share it."""
    check_schedule(kind)
    if is_tensor(ratio):
        return 1.0 - ratio if kind == "linear" else (math.pi / 2 * ratio).cos()
    ratio = np.asarray(ratio)
    return 1.0 - ratio if kind == "linear" else np.cos(np.pi / 2 * ratio)


def model_step(t: int, num_steps: int, model_steps: int) -> int:
    """The model's step index for run step t of num_steps: the run's schedule stretched onto the K the
    model was trained with, so a run with more (or fewer) steps than K still sees familiar step indices."""
    if num_steps == model_steps:
        return t
    return min(model_steps - 1, t * model_steps // num_steps)


# -- selection -------------------------------------------------------------------------------------
def gate_update(gate: Any, threshold: float) -> Any:
    """The learned gate's rule: a position takes its proposal iff gate > threshold."""
    return gate > threshold


def entropy_update(is_mask: Any, ent: Any, threshold: float) -> Any:
    """The gate-off rule: fill every mask, re-predict committed tokens whose entropy > threshold."""
    return is_mask | (ent > threshold)


# -- stopping ------------------------------------------------------------------------------------
def change_ratio(new: Any, old: Any, frozen: Any) -> tuple[Any, Any]:
    """Changed positions per row and their share of the row's non-frozen positions."""
    changed = ((new != old) & ~frozen).sum(-1)
    editable = (~frozen).sum(-1)
    if is_tensor(changed):
        # float64 as numpy's: a float32 ratio compared with a tiny threshold would round it to 0
        return changed, changed.double() / editable.clamp(min=1).double()
    return changed, changed / np.maximum(editable, 1)


def edits(new: Any, old: Any, frozen: Any, pad: int) -> Any:
    """Tokens a step edited, per row: positions that changed and now hold a token. A position turned into
    padding (the tail behind a committed EOS) is not an edit, so ``Sample.edits`` counts what a reader
    sees change; the stop rule keeps its :func:`change_ratio`."""
    return ((new != old) & ~frozen & (new != pad)).sum(-1)


def finished(t: int, ratio: Any, stop_threshold: float, masks_left: Any, all_frozen: Any) -> Any:
    """A row is done when nothing is left to change, or (after step 0) when its change ratio fell under
    ``stop_threshold`` and no mask is left."""
    return all_frozen | ((t > 0) & (ratio < stop_threshold) & ~masks_left)

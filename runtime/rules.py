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


# -- counter-based noise (causal files) ----------------------------------------------------------------
#: Hash values are 31-bit integers held in int64, so that every operation the hash needs (multiply, add,
#: division by a power of two, modulo) exists, with the same results, in numpy, torch and onnxruntime's
#: CPU and CUDA kernels (which have no bitwise operators): a square of a value < 2**31 plus one more such
#: value stays under 2**63, and all values stay non-negative, where truncating and floor division agree.
_WORD = 1 << 31
_K1, _K2, _K3 = 0x2545F491, 0x5851F42D, 0x41C64E6D
_POSITION_STEP, _TOKEN_STEP = 0x27D4EB2F, 0x165667B1
#: a uniform carries 23 random bits: (top + 1/2) / 2**23 is exact in float32 and strictly inside (0, 1)
_UNIFORM_BITS = 23


def _shift(x: Any, bits: int) -> Any:
    """x >> bits for non-negative int64 x: a truncating division on torch (it exports to ONNX Div), the
    shift itself on numpy (the same numbers, several times faster than numpy's integer division)."""
    if is_tensor(x):
        return sys.modules["torch"].div(x, 1 << bits, rounding_mode="trunc")
    return x >> bits


def _word(x: Any) -> Any:
    """x mod 2**31 for non-negative int64 x (ONNX Mod on torch; a mask on numpy, the same numbers)."""
    return x % _WORD if is_tensor(x) else x & (_WORD - 1)


def _mix31(c: Any) -> Any:
    """A 31-bit mixing function: two middle-square rounds with a Weyl term, then a multiply and an
    add-shift. Squaring supplies the nonlinearity that xor gives the usual integer hashes (no bitwise
    operators in the graphs); ``tests/test_rules.py`` checks uniformity, independence along every axis and
    Gumbel-max frequencies."""
    if not is_tensor(c):
        return _mix31_numpy(c)
    x, w = _word(c * _K1), _word(c * _K2)
    for _ in range(2):
        x = _word(_shift(x * x + w, 15))
    x = _word(x * _K3 + w)
    return _word(x + _shift(x, 16))


def _mix31_numpy(c: np.ndarray) -> np.ndarray:
    """:func:`_mix31` step for step, in place on two buffers (the host computes it for every row of a
    batch when a decode graph starts; ``tests/test_rules.py`` checks it against the torch branch)."""
    mask = _WORD - 1
    x = np.multiply(c, _K1)
    x &= mask
    w = np.multiply(c, _K2)
    w &= mask
    t = np.empty_like(x)
    for _ in range(2):
        np.multiply(x, x, out=t)
        t += w
        t >>= 15
        np.bitwise_and(t, mask, out=x)
    x *= _K3
    x += w
    x &= mask
    np.right_shift(x, 16, out=t)
    x += t
    x &= mask
    return x


def sample_keys(words: tuple[int, int], first: int, count: int) -> np.ndarray:
    """[count] int64 keys in [0, 2**31) of samples first .. first + count - 1 of a request whose seed gave
    the two ``words``: a sample's key depends only on (seed, its index), never on its batch."""
    return keys_at(words, np.arange(first, first + count, dtype=np.int64))


def keys_at(words: tuple[int, int], indices: np.ndarray) -> np.ndarray:
    """:func:`sample_keys` of the samples ``indices`` (any order, e.g. a prompt reader's group)."""
    index = _word(np.asarray(indices, dtype=np.int64) + int(words[0]))
    return _mix31(_word(_mix31(index) + int(words[1])))


def counter_uniforms(keys: Any, positions: Any, vocab: int) -> Any:
    """[B, P, vocab] float32 uniforms in (0, 1) for sample keys [B] and sequence positions [B, P] (int64):
    a pure function of (key, position, token), so the host loop, the left-to-right decoder, the PyTorch
    loop and a decode graph on a GPU draw the same number for the same token of the same sample."""
    if is_tensor(keys):
        torch = sys.modules["torch"]
        token = torch.arange(vocab, device=keys.device, dtype=torch.int64) * _TOKEN_STEP
    else:
        token = np.arange(vocab, dtype=np.int64) * _TOKEN_STEP
    bits = _mix31(_word(keys[:, None, None] + positions[:, :, None] * _POSITION_STEP + token))
    top = _shift(bits, 31 - _UNIFORM_BITS)
    scale = 1.0 / (1 << _UNIFORM_BITS)
    if is_tensor(top):
        return top.float() * scale + 0.5 * scale
    return top.astype(np.float32) * np.float32(scale) + np.float32(0.5 * scale)


def counter_gumbel(keys: Any, positions: Any, vocab: int) -> Any:
    """Gumbel noise -log(-log u) of :func:`counter_uniforms` (no clipping needed: u is inside (0, 1))."""
    u = counter_uniforms(keys, positions, vocab)
    return -(-u.log()).log() if is_tensor(u) else -np.log(-np.log(u))


def position_noise(keys: np.ndarray, length: int, vocab: int) -> np.ndarray:
    """[B, length, vocab] Gumbel noise of every position of each sample (computed once per batch): the noise
    of every exact token and draft of a draft-and-verify decoder (causal files, block refine files)."""
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (keys.shape[0], length))
    return counter_gumbel(keys, positions, vocab)


def tempered_noise(noise: Any, temperature: Any) -> Any:
    """T g: the Gumbel noise of :func:`coupled_sample` scaled by the temperature (once per call in a
    decode graph, shared by the exact tokens and the drafts)."""
    return temperature * noise


def coupled_argmax(logits: Any, tempered: Any) -> Any:
    """argmax(logits + T g), with ``tempered`` = :func:`tempered_noise`."""
    return (logits + tempered).argmax(-1)


def coupled_sample(logits: Any, temperature: Any, noise: Any) -> Any:
    """argmax(logits + T g) = argmax(logits / T + g), with Gumbel noise ``g`` of the token's own
    (sample, position): a sample from softmax(logits / T), argmax at T = 0 (no branch, so a graph can take
    T as an input). The exact tokens of a causal file and the drafts that guess them draw on the same
    noise, so a draft equals its exact token as often as the two distributions allow, and keeping a draft
    iff it equals its exact token gives the left-to-right decoder's molecule, token for token."""
    return coupled_argmax(logits, tempered_noise(noise, temperature))


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


def block_attention(tokens: Any, block: int, mask_id: int, pad_id: int) -> Any:
    """[B, L, L] bool: which keys each query may see in a ``block`` model (numpy or torch, one rule for the model's
    graph and for a host that builds the mask itself): keys in its own or an earlier block of ``block``
    positions, and the tokens already in place after the row's current block (the first block holding a mask),
    such as a template's clean suffix; never PAD (the caller hides it).

    Decoding block by block, the blocks after the current one hold only masks, so this is BD3-LM's block-causal
    attention, exactly what the vectorised training shows (training/block_objective.py); with a blank in the
    middle of a template, the text after the blank is seen from everywhere, as in the objective's span rows."""
    blk = _floor_div(_positions(tokens, tokens.shape[-1]), block)
    current = _floor_div(first_eos(tokens, mask_id), block)  # the first mask's block
    placed_later = (blk[None] > current[:, None]) & (tokens != mask_id) & (tokens != pad_id)
    earlier = blk[:, None] >= blk[None, :]
    return earlier[None] | placed_later[:, None, :]


def _floor_div(x: Any, d: int) -> Any:
    return sys.modules["torch"].div(x, d, rounding_mode="floor") if is_tensor(x) else x // d


def row_windows(tokens: np.ndarray, targets: np.ndarray, mask_id: int, pad_id: int, block: int) -> np.ndarray:
    """[B] int: how many leading positions each row of ``tokens`` needs in a call of a ``block`` refine model:
    each block up to the last one that holds a placed token (not mask, not PAD) or the row's ``targets``
    position (its first open mask, or a state's verified position). The blocks after that hold only masks,
    which the model's attention hides from every earlier position (training/model.py: ``block_attention``),
    so the outputs at the kept positions are the full-length call's; the window grows as decoding moves right."""
    length = tokens.shape[-1]
    placed = (tokens != mask_id) & (tokens != pad_id)
    last = np.where(placed.any(-1), length - 1 - np.argmax(placed[:, ::-1], -1), 0)
    need = np.maximum(last, np.minimum(targets, length - 1)) + 1
    return np.minimum(length, -(-need // block) * block)


#: what one more run of a call costs on a CPU, counted in positions (rows x window) of the model's work
WINDOW_RUN_COST = 32
#: at most this many runs per call
WINDOW_MAX_RUNS = 3


def window_groups(windows: np.ndarray, run_cost: float | None = None,
                  max_runs: int | None = None) -> list[tuple[np.ndarray, int]]:
    """Rows of one block-model call, split in up to ``max_runs`` runs by window: (row indices, window) pairs.

    Why: rows decode at their own pace (draft-and-verify keeps 0-3 drafts a call, confidence commits as many
    tokens as it trusts), so one run over the widest row's window computes many positions that a shorter row
    does not need; on a CPU a run costs its rows x window. The split minimises the positions run plus
    ``run_cost`` (default :data:`WINDOW_RUN_COST`) per run, in at most ``max_runs`` (:data:`WINDOW_MAX_RUNS`): rows sorted by window, each run the rows between
    two cut points (an exact search over at most 14 distinct windows of a 56-token model).
    """
    run_cost = WINDOW_RUN_COST if run_cost is None else run_cost
    max_runs = WINDOW_MAX_RUNS if max_runs is None else max_runs
    rows = np.arange(windows.size)
    cuts, counts = np.unique(windows, return_counts=True)
    if cuts.size < 2 or max_runs < 2:
        return [(rows, int(windows.max(initial=0)))]
    below = np.concatenate([[0], np.cumsum(counts)])  # rows with a window among the first i distinct ones
    # best[g][i]: the cheapest way to run the rows of the first i distinct windows in g runs (and where it cut)
    best = [{0: (0.0, [])}]
    for _ in range(max_runs):
        step = {}
        for i in range(1, cuts.size + 1):
            options = [(cost + (below[i] - below[j]) * cuts[i - 1] + run_cost, ends + [i])
                       for j, (cost, ends) in best[-1].items() if j < i]
            if options:
                step[i] = min(options, key=lambda o: o[0])
        best.append(step)
    cost, ends = min((b[cuts.size] for b in best[1:] if cuts.size in b), key=lambda o: o[0])
    groups, lower = [], -1
    for end in ends:
        upper = int(cuts[end - 1])
        groups.append((rows[(windows > lower) & (windows <= upper)], upper))
        lower = upper
    return groups


def outside_current_block(tokens: np.ndarray, frozen: np.ndarray, mask_id: int, block: int) -> np.ndarray:
    """[B, L] bool: the positions outside each row's current block, the first block of ``block`` positions
    that holds an unfrozen mask (a ``block`` refine model decodes its blocks left to right). A row with no
    mask left has no current block: every position is outside, so the row settles."""
    length = tokens.shape[-1]
    open_mask = (tokens == mask_id) & ~frozen
    first = np.where(open_mask.any(-1), open_mask.argmax(-1), length)
    current = first // block
    return (np.arange(length)[None, :] // block) != current[:, None]

"""Which tokens may be sampled where: the loop's bans, as additive -inf logit biases.

MASK and PAD are never sampled (padding only ever follows a committed EOS), nor UNK; a template allows EOS
only where its blanks may end and only EOS in its closing slot; a blank a prompt reader restricts holds
only its allowed ids; and no EOS is sampled before a row's
committed EOS, so a length once chosen is final. Every format's decoding (host loops, decode graphs, the
sampling head, the PyTorch loops) builds its bans here.
"""

from __future__ import annotations

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.prompt import Layout, blank_layout


def banned_ids(special, unk: int | None = None) -> np.ndarray:
    """Ids never proposed: MASK, PAD and UNK if any."""
    ids = {special.mask, special.pad} | ({unk} if unk is not None and unk not in (special.eos,) else set())
    return np.array(sorted(ids), dtype=np.int64)


def logit_bias(layout: Layout, vocab_size: int, banned: np.ndarray, eos: int | None) -> np.ndarray:
    """[length, vocab] additive bias holding every ban that depends only on the run: the banned ids
    everywhere and, for a template, no EOS where it may not go and only EOS in its closing slot."""
    bias = np.zeros((layout.length, vocab_size), dtype=np.float32)
    bias[:, banned] = -np.inf
    if eos is not None:
        bias[~layout.eos_allowed, eos] = -np.inf
        bias[layout.eos_only, :] = -np.inf
        bias[layout.eos_only, eos] = 0.0
    for pos, ids in layout.allowed:  # a blank restricted to some ids (a prompt reader's): nothing else, no EOS
        kept = bias[pos, list(ids)].copy()
        bias[pos, :] = -np.inf
        bias[pos, list(ids)] = kept
    return bias


def run_bias(layout: Layout, tokenizer, special, vocab_size: int) -> np.ndarray:
    """:func:`logit_bias` of a run over ``layout`` with the tokenizer's banned ids."""
    return logit_bias(layout, vocab_size, banned_ids(special, getattr(tokenizer, "unk_token_id", None)), special.eos)


def ban_logits(logits: np.ndarray, bias: np.ndarray, first: np.ndarray | None, eos: int | None) -> None:
    """Apply ``logit_bias`` and the per-row ban in place: no EOS before a row's first committed EOS
    (``first``; = length when there is none). The sampling head does the same inside the graph."""
    logits += bias
    if eos is not None:
        logits[..., eos][rules.eos_banned(first, logits.shape[1])] = -np.inf


def blank_bans(tokenizer, special, vocab_size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The bans of a causal decoder's exact tokens (the loop's for a blank layout, the same at every
    position) and of its drafts (EOS too: an EOS comes only from an exact token), float32 [V] each."""
    bias = run_bias(blank_layout(length, special), tokenizer, special, vocab_size)[0].copy()
    draft = bias.copy()
    if special.eos is not None:
        draft[special.eos] = -np.inf
    return bias, draft

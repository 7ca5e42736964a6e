"""The acceptance gate of a block refine model: when may the decoder commit a block's masks together, and which
of its parallel commits should it take back (``gate_target: "acceptance"``).

Why: a block model decoded one token per call samples from its left-to-right conditionals; committing several
masks of a block in one call draws each from its marginal given the masks beside it, which is right only where
the tokens hardly depend on each other. Raw confidence (Fast-dLLM) guesses that from how peaked one marginal
is; the gate learns it from the model's own conditionals. For a block whose first ``o`` positions are clean,
draw x^ at every masked position from the model's marginals (state 0) and let state k hold x^ at the block's
next k positions, masks after them (k = 0 .. block - 1: the states a decoder that commits prefixes reaches).
Position j's left-to-right conditional is its prediction in state j - o (everything before it committed).
The gate, in a state k drawn per block, learns

- at a mask j: the chance that committing it now agrees with committing it after the tokens before it,
  1 - TV(p_k(j), p_{j-o}(j)) (the expected acceptance of a speculative draft from p_k);
- at a committed token j: the chance that the left-to-right conditional rejects it, given the block's other
  commits, 1 - min(1, p_{j-o}(x^_j) / p_0(x^_j)) (speculative sampling's rejection of a draft from p_0).

So one gate reads "commit" on masks and "take back" on tokens, as the ``gate`` selector expects. The targets
come from the EMA model's own forwards (no gradient), the gate reads detached features (training/model.py),
so the trunk's conditionals are never shaped by the gate; ``freeze_trunk`` trains the gate head alone on a
trained model. The states use BD3-LM's two streams, so every block of every row is an example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from imadarem.runtime.tokenizer import SpecialIds
from imadarem.training.config import ImplicitRefinementConfig
from imadarem.training.model import two_stream_forward
from imadarem.training.objective import sample_tokens


def _in_block(values: torch.Tensor, block: int) -> torch.Tensor:
    """[b, L] -> [b, nb, block] (the last block padded with zeros)."""
    b, L = values.shape
    nb = -(-L // block)
    return F.pad(values, (0, nb * block - L)).view(b, nb, block)


def _eos_before(filled: torch.Tensor, eos: int | None, block: int) -> torch.Tensor:
    """[b, L] bool: an EOS sits earlier in the same block (the position would be padding once it is committed)."""
    if eos is None:
        return torch.zeros_like(filled, dtype=torch.bool)
    L = filled.shape[1]
    hits = _in_block((filled == eos).long(), block)
    before = hits.cumsum(-1) - hits
    return (before > 0).flatten(1)[:, :L]


def _state(clean, xhat, in_block_pos, offset, k, special: SpecialIds, block: int) -> torch.Tensor:
    """The noisy stream of state ``k``: clean before the block's offset, x^ at the next k positions, masks after;
    within a block, everything after a committed EOS is padding (as the decoder freezes it)."""
    xt = torch.where(in_block_pos < offset, clean,
                     torch.where(in_block_pos < offset + k, xhat, torch.full_like(clean, special.mask)))
    after_eos = _eos_before(xt, special.eos, block)
    return torch.where(after_eos, torch.full_like(xt, special.pad), xt)


def acceptance_targets(teacher, clean: torch.Tensor, ends: torch.Tensor, draws: dict[str, torch.Tensor],
                       cfg: ImplicitRefinementConfig, special: SpecialIds, autocast=None) -> dict[str, torch.Tensor]:
    """The gate's training state and targets for the rows ``clean`` [b, L] with ``ends`` (each row's EOS
    position) and this rank's ``draws`` (``gate_offset``, ``gate_state`` [b, blocks], ``gumbel`` [b, L, V]), from
    the ``teacher``'s forwards (no gradient): ``state`` [b, L] (the noisy stream the gate reads), ``target``,
    ``where`` (the positions it learns at), ``committed``, ``xhat``, ``offset`` and ``k`` per position."""
    b, L = clean.shape
    B, dev = cfg.block_size, clean.device
    pos = torch.arange(L, device=dev)
    blk = torch.div(pos, B, rounding_mode="floor")
    m = (pos % B)[None].expand(b, L)
    first = (draws["gate_offset"] * B).floor().long().clamp(max=B - 1)  # per block: its first masked offset
    state = (draws["gate_state"] * (B - first)).floor().long().clamp(max=B - 1 - first)  # 0 .. block - first - 1
    offset, k = first[:, blk], state[:, blk]
    upto = blk[None] <= torch.div(ends.clamp(max=L - 1), B, rounding_mode="floor")[:, None]
    banned = [special.mask, special.pad]
    with torch.no_grad():
        logps, xhat = [], clean  # x^ is drawn in state 0, which holds none of it
        for i in range(B):
            state_i = _state(clean, xhat, m, offset, i, special, B)
            logits = two_stream_forward(teacher.forward_train, state_i, clean, cfg.hidden_size, B, autocast)["logits"]
            logits = logits[:, :L]
            if i == 0:
                xhat = sample_tokens(logits, draws["gumbel"], special)
            logits = logits.float()
            logits[..., banned] = float("-inf")
            logps.append(torch.log_softmax(logits, -1))
        probs = torch.stack(logps, 2).exp()  # [b, L, state, V]
        ref = (m - offset).clamp(0, B - 1)  # the state where everything before the position is committed
        V = probs.shape[-1]
        p_ref = probs.gather(2, ref[..., None, None].expand(b, L, 1, V)).squeeze(2)
        p_now = probs.gather(2, k[..., None, None].expand(b, L, 1, V)).squeeze(2)
        committed = (m >= offset) & (m < offset + k)
        q_draft = probs[:, :, 0].gather(-1, xhat[..., None]).squeeze(-1)
        p_draft = p_ref.gather(-1, xhat[..., None]).squeeze(-1)
        reject = 1.0 - (p_draft / q_draft.clamp(min=1e-12)).clamp(max=1.0)
        accept = 1.0 - 0.5 * (p_now - p_ref).abs().sum(-1)
        target = torch.where(committed, reject, accept).clamp(0.0, 1.0)
        filled = torch.where(m < offset, clean, xhat)
        xt = _state(clean, xhat, m, offset, k, special, B)
        where = upto & (m >= offset) & ~_eos_before(filled, special.eos, B) & (xt != special.pad)
    return {"state": xt, "target": target, "where": where, "committed": committed, "xhat": xhat,
            "offset": offset, "k": k}


def acceptance_gate_loss(forward, teacher, clean: torch.Tensor, ends: torch.Tensor, draws: dict[str, torch.Tensor],
                         cfg: ImplicitRefinementConfig, special: SpecialIds, autocast=None):
    """The gate's BCE against :func:`acceptance_targets`, through the training ``forward`` (its gradient
    reaches the gate head only). Returns (bce sum, correct sum, target sum, positions) as 0-dim tensors."""
    t = acceptance_targets(teacher, clean, ends, draws, cfg, special, autocast)
    L = clean.shape[1]
    out = two_stream_forward(forward, t["state"], clean, cfg.hidden_size, cfg.block_size, autocast)
    gate_logits = out["gate_logits"][:, :L].float()
    bce = F.binary_cross_entropy_with_logits(gate_logits, t["target"], reduction="none")
    correct = ((gate_logits > 0) == (t["target"] > 0.5)) & t["where"]
    w = t["where"].float()
    return (bce * w).sum(), correct.sum().float(), (t["target"] * w).sum(), w.sum()

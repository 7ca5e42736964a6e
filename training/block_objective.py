"""The ``block`` objective of the refine family: block diffusion with every block trained in every row.

Why: the mixture objective trains the conditional that block-by-block decoding samples from (the next block
given a clean prefix) at about one position per row, and its models sample poorly at any number of calls
(experiments/runs/shared-h200-2026-12-02). BD3-LM (Arriola et al. 2025) trains all blocks of a row at once:
the model reads x_t ++ x_0 (the noisy copy, then the clean one, at the same positions) under
:func:`~imadarem.training.model.two_stream_attention`, so block b's noisy tokens see block b and the clean
blocks before it, exactly the state a decoder reaches with the same model's single-stream
:func:`~imadarem.training.model.block_attention`.

Per row (every draw for the global batch, from the step's generator):

- *block rows* (1 - ``span_weight``): each block masked either as a suffix of the block from a random offset
  (``block_suffix_share``, what left-to-right commits inside a block leave) or at a random rate. With
  ``sample_replace_rate`` / ``random_replace_rate`` above 0, some masked positions are refilled with the EMA
  teacher's samples or random tokens (committed tokens that may be wrong, the gate's revision targets).
  **The block presets set both to 0**: a model that has seen refills inside its blocks learns to discount the
  tokens committed there, and its own left-to-right samples lose coherence (refine-block4: teacher-forced
  NLL 0.62 per token, yet FCD/Test 8.4 sampled one token per call; swapping the token just before a
  prediction moves it 5x less inside a block than across a block boundary; experiments/refine/PLAN.md, "Third finding");
- *span rows* (``span_weight``): one span masked at a random rate with clean text on both sides, in a single
  stream (a middle blank; the model sees the clean suffix after a row's last mask);
- *states rows* (``block_states_share``): every left-to-right state of every block at once
  (:class:`~imadarem.training.model.StatesLayout`: x_0, then a copy of each block in each state r_k). A block row
  trains about one block position in four on the exact left-to-right conditional p(x_k | x_<k), the one
  draft-and-verify samples from (and fragment prompts, which are prefixes, depend on); a states row trains all
  four, and the drafts after each, for ~2.5x a block row's positions.

Loss: cross-entropy on the corrupted positions of the blocks up to each row's EOS block, plus the gate's
BCE: with ``gate_target: "match"`` the mixture's gate (a mask: will the token sampled there be right; a committed
token: is it wrong), with ``"acceptance"`` the acceptance gate of training/acceptance_gate.py (its own states).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from imadarem.runtime import rules
from imadarem.runtime.tokenizer import SpecialIds
from imadarem.training.acceptance_gate import acceptance_gate_loss
from imadarem.training.config import ImplicitRefinementConfig
from imadarem.training.distributed import global_sum
from imadarem.training.model import states_forward, two_stream_forward
from imadarem.training.objective import sample_tokens, tail_with_eos, targets_of


def _draws(gen: torch.Generator, batch: int, length: int, cfg: ImplicitRefinementConfig, special: SpecialIds,
           device) -> dict[str, torch.Tensor]:
    kw = {"generator": gen, "device": device}
    blocks = -(-length // cfg.block_size)
    V = cfg.vocab_size
    allowed = torch.tensor([i for i in range(V) if i not in (special.mask, special.pad, special.eos)], device=device)
    return {"rate": torch.rand(batch, blocks, **kw), "suffix": torch.rand(batch, blocks, **kw),
            "offset": torch.rand(batch, blocks, **kw), "u": torch.rand(batch, length, **kw),
            "replace": torch.rand(batch, length, **kw),
            "random": allowed[torch.randint(0, len(allowed), (batch, length), **kw)],
            "gumbel": rules.gumbel(torch.rand(batch, length, V, **kw)), "span": torch.rand(batch, 3, **kw),
            "gate_offset": torch.rand(batch, blocks, **kw), "gate_state": torch.rand(batch, blocks, **kw)}


def block_loss(forward, teacher, clean: torch.Tensor, gen: torch.Generator, global_batch: int, rows: slice,
               cfg: ImplicitRefinementConfig, special: SpecialIds, world: int = 1, autocast=None):
    """The loss of this rank's rows ``clean`` [b, L] (``rows`` of the global batch) and its metrics.
    ``forward`` is the (compiled, DDP-wrapped) training forward, ``teacher`` the EMA model."""
    B, L = clean.shape
    dev = clean.device
    d = {k: v[rows] for k, v in _draws(gen, global_batch, L, cfg, special, dev).items()}
    n_span = int(round(global_batch * cfg.span_weight))
    n_states = int(round(global_batch * cfg.block_states_share))
    index = torch.arange(global_batch, device=dev)[rows]
    is_span = index >= global_batch - n_span
    is_states = (index >= global_batch - n_span - n_states) & ~is_span
    targets, ends = targets_of(clean, special)
    pos = torch.arange(L, device=dev)
    blk = torch.div(pos, cfg.block_size, rounding_mode="floor")
    ctx = autocast() if autocast else contextlib.nullcontext()
    parts, verify = {}, cfg.verify_layers > 0

    # -- block rows: x_t ++ x_0 -------------------------------------------------------------------
    b_rows = ~is_span & ~is_states
    if b_rows.any():
        c, t, e = clean[b_rows], targets[b_rows], ends[b_rows]
        rate, suf, off = d["rate"][b_rows], d["suffix"][b_rows], d["offset"][b_rows]
        rate = rate.clamp(min=1.0 / cfg.block_size)
        at_random = d["u"][b_rows] < rate[:, blk]
        first = (off * cfg.block_size).floor().long()  # the first masked offset of a suffix-masked block
        as_suffix = (pos % cfg.block_size)[None] >= first[:, blk]
        corrupted = torch.where(suf[:, blk] < cfg.block_suffix_share, as_suffix, at_random)
        corrupted = tail_with_eos(corrupted, e)
        xt = torch.where(corrupted, torch.full_like(c, special.mask), c)
        upto = blk[None] <= torch.div(e.clamp(max=L - 1), cfg.block_size, rounding_mode="floor")[:, None]
        p_s, p_r = cfg.sample_replace_rate, cfg.random_replace_rate
        refills = p_s + p_r > 0  # committed-looking tokens that may be wrong (see the module docstring)
        if refills:
            with torch.no_grad():
                first_pass = two_stream_forward(teacher.forward_train, xt, c, cfg.hidden_size, cfg.block_size, autocast)
            samples = sample_tokens(first_pass["logits"][:, :L], d["gumbel"][b_rows], special)
            u = d["replace"][b_rows]
            refill = corrupted & upto & (samples != special.eos)
            xt = torch.where(refill & (u < p_s), samples, xt)
            xt = torch.where(refill & (u >= p_s) & (u < p_s + p_r), d["random"][b_rows], xt)
            xt = rules.pad_after_eos(xt, special.eos, special.pad)
        out = two_stream_forward(forward, xt, c, cfg.hidden_size, cfg.block_size, autocast, verify=verify)
        if not refills:  # the gate's target at a mask: is the model's own sample right
            samples = sample_tokens(out["logits"][:, :L].detach(), d["gumbel"][b_rows], special)
        valid = upto & (xt != special.pad)
        parts["block"] = (out["logits"][:, :L], out["gate_logits"][:, :L], xt, t, samples, corrupted & valid, valid,
                          out.get("verify_logits"))

    # -- span rows: one blank with clean text on both sides, a single stream ----------------------------
    if is_span.any():
        c, t, e = clean[is_span], targets[is_span], ends[is_span]
        u3 = d["span"][is_span]
        length = (e + 1).clamp(max=L)
        start = (u3[:, 0:1] * length[:, None]).floor().long()
        span_len = 1 + (u3[:, 1:2] * (length[:, None] - start)).floor().long()
        in_span = (pos[None] >= start) & (pos[None] < start + span_len)
        corrupted = (in_span & (d["u"][is_span] < u3[:, 2:3].clamp(min=0.1))) | (pos[None] == start)
        corrupted = tail_with_eos(corrupted, e)
        xt = torch.where(corrupted, torch.full_like(c, special.mask), c)
        zeros = torch.zeros(c.shape[0], L, cfg.hidden_size, device=dev)
        step = torch.zeros(c.shape[0], dtype=torch.long, device=dev)
        with ctx:
            out = forward(xt, step, zeros, None, None, c if verify else None)
        samples = sample_tokens(out["logits"].detach(), d["gumbel"][is_span], special)
        valid = xt != special.pad
        parts["span"] = (out["logits"], out["gate_logits"], xt, t, samples, corrupted & valid, valid,
                         out.get("verify_logits"))

    # -- states rows: every left-to-right state of every block (module docstring) ----------------------------
    if is_states.any():
        c, t, e = clean[is_states], targets[is_states], ends[is_states]
        out, lay = states_forward(forward, c, special.mask, cfg.hidden_size, cfg.block_size, autocast)
        t_slots = t[:, lay.positions]
        masked = ~lay.clean[None].expand_as(t_slots)
        live = lay.start[None] <= e[:, None]  # a state decoding reaches: the row's EOS not yet committed
        xt = torch.where(masked, torch.full_like(t_slots, special.mask), t_slots)
        samples = sample_tokens(out["logits"].detach(), d["gumbel"][is_states][:, lay.positions], special)
        parts["states"] = (out["logits"], out["gate_logits"], xt, t_slots, samples, masked & live, live, None)

    V = cfg.vocab_size
    metrics_sums = torch.zeros(3, device=dev)  # ce, gate bce, gate correct
    metric_counts = torch.zeros(2, device=dev)  # loss positions, gate positions
    verify_sum = torch.zeros((), device=dev)  # the verifier's cross-entropy, on the trunk's loss positions
    acceptance = cfg.gate_target == "acceptance"
    for logits, gate_logits, xt, t, samples, loss_pos, valid, verify_logits in parts.values():
        ce = F.cross_entropy(logits.float().reshape(-1, V), t.reshape(-1), reduction="none").view_as(t)
        if verify_logits is not None:
            vce = F.cross_entropy(verify_logits.float().reshape(-1, V), t.reshape(-1), reduction="none").view_as(t)
            verify_sum = verify_sum + (vce * loss_pos).sum()
        if acceptance:  # the gate learns from its own states below
            metrics_sums = metrics_sums + torch.stack([(ce * loss_pos).sum(), ce.new_zeros(()), ce.new_zeros(())])
            metric_counts = metric_counts + torch.stack([loss_pos.sum().float(), ce.new_zeros(())])
            continue
        masked = xt == special.mask
        gate_target = torch.where(masked, (samples == t).float(), (xt != t).float())
        bce = F.binary_cross_entropy_with_logits(gate_logits.float(), gate_target, reduction="none")
        correct = ((gate_logits > 0) == (gate_target > 0.5)) & valid
        metrics_sums = metrics_sums + torch.stack([(ce * loss_pos).sum(), (bce * valid).sum(), correct.sum().float()])
        metric_counts = metric_counts + torch.stack([loss_pos.sum(), valid.sum()]).float()
    accept_mean = None
    if acceptance and b_rows.any() and cfg.gate_loss_weight > 0:  # weight 0: a trained gate kept as it is
        keep = ("gate_offset", "gate_state", "gumbel")
        bce_sum, correct_sum, target_sum, count = acceptance_gate_loss(
            forward, teacher, clean[b_rows], ends[b_rows], {k: d[k][b_rows] for k in keep}, cfg, special, autocast)
        metrics_sums = metrics_sums + torch.stack([bce_sum.new_zeros(()), bce_sum, correct_sum])
        metric_counts = metric_counts + torch.stack([count.new_zeros(()), count])
        accept_mean = global_sum(target_sum.detach()) / global_sum(count.detach()).clamp(min=1.0)
    n = global_sum(metric_counts).clamp(min=1.0)
    ce_mean, bce_mean = metrics_sums[0] / n[0], metrics_sums[1] / n[1]
    loss = ce_mean + cfg.gate_loss_weight * bce_mean
    stats = global_sum(metrics_sums.detach())
    metrics = {"loss": stats[0] / n[0] + cfg.gate_loss_weight * stats[1] / n[1], "ce": stats[0] / n[0],
               "gate_bce": stats[1] / n[1], "gate_acc": stats[2] / n[1], "tokens": n[0]}
    if verify:
        loss = loss + cfg.verify_loss_weight * verify_sum / n[0]
        verify_ce = global_sum(verify_sum.detach()) / n[0]
        metrics["verify_ce"] = verify_ce
        metrics["loss"] = metrics["loss"] + cfg.verify_loss_weight * verify_ce
    if accept_mean is not None:
        metrics["gate_target"] = accept_mean  # the mean target: how often parallel commits agree
    return loss * world, metrics

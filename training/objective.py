"""The Imadarem V training objective (docs/ARCHITECTURE.md, "Training objective").

Per sequence a step t ~ U{0..K-1} sets mask_rate(t) (1 - t/K, or cosine). Corrupted positions become
[MASK]; for t > 0 some are refilled with the EMA teacher's own samples or random tokens, so inputs hold
realistic wrong tokens, as they do at inference after step 0. The teacher's pass (no grad) also gives
the self-conditioning state (on a ``self_condition_rate`` share of batches) and the previous gate.

loss = CE(corrupted positions) + diversity_weight * relu(0.5 - entropy)[masked]
       + gate BCE against 1[input token != target] + sparsity * mean(gate)
       + smoothness * mean((gate - previous gate)^2) (+ critic BCE on committed tokens)

All randomness is drawn for the whole global batch from a generator seeded by (seed, step), then sliced
by rank, and every mean is taken over global counts: N processes under DDP compute the same loss as one
process with the whole batch, and a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from imadarem.runtime import rules
from imadarem.runtime.tokenizer import SpecialIds
from imadarem.training.config import ImplicitRefinementConfig
from imadarem.training.distributed import global_sum

__all__ = ["Corrupted", "Noise", "corrupt", "corrupt_mixture", "draw_noise", "refinement_loss", "targets_of"]


@dataclass
class Noise:
    """All random draws of one training step (rows of the global batch)."""

    t: torch.Tensor  # [B] step index
    u_corrupt: torch.Tensor  # [B, L]
    u_replace: torch.Tensor  # [B, L]
    random_tokens: torch.Tensor  # [B, L]
    gumbel: torch.Tensor  # [B, L, V]
    self_condition: bool
    u_row: torch.Tensor | None = None  # [B, 4] the mixture's per-row draws: mode, rate, start, span length

    def rows(self, sl: slice) -> Noise:
        return Noise(self.t[sl], self.u_corrupt[sl], self.u_replace[sl], self.random_tokens[sl], self.gumbel[sl],
                     self.self_condition, None if self.u_row is None else self.u_row[sl])


def draw_noise(gen: torch.Generator, batch: int, length: int, cfg: ImplicitRefinementConfig,
               special: SpecialIds, device: torch.device) -> Noise:
    K, V = cfg.max_refinement_steps, cfg.vocab_size
    kw = {"generator": gen, "device": device}
    t = torch.randint(0, K, (batch,), **kw)
    u_corrupt = torch.rand(batch, length, **kw)
    u_replace = torch.rand(batch, length, **kw)
    # random replacement tokens: anything but MASK and PAD
    allowed = torch.tensor([i for i in range(V) if i not in (special.mask, special.pad)], device=device)
    random_tokens = allowed[torch.randint(0, len(allowed), (batch, length), **kw)]
    gumbel = rules.gumbel(torch.rand(batch, length, V, **kw))
    self_condition = bool(torch.rand(1, **kw).item() < cfg.self_condition_rate)
    # drawn last, and only for the mixture: Imadarem V's draws (and runs) stay as they were
    u_row = torch.rand(batch, 4, **kw) if cfg.objective == "mixture" else None
    return Noise(t, u_corrupt, u_replace, random_tokens, gumbel, self_condition, u_row)


def mask_rate(t: torch.Tensor, cfg: ImplicitRefinementConfig) -> torch.Tensor:
    """Share of positions corrupted at step t: the unmasking selectors' schedule, so training and decoding
    agree on how many masks step t sees."""
    return rules.mask_schedule(cfg.corruption_schedule, t.float() / cfg.max_refinement_steps)


def targets_of(clean: torch.Tensor, special: SpecialIds) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (EOS repeated after the end, so the length is learned) and the end position of each row."""
    if special.eos is None:
        ends = (clean != special.pad).sum(-1) - 1
        return clean, ends
    ends = rules.first_eos(clean, special.eos)
    targets = torch.where(rules.after_first_eos(ends, clean.shape[1]), special.eos, clean)
    return targets, ends


def tail_with_eos(corrupted: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The positions after EOS are one unit with it: masked iff the EOS is (committing EOS pads the rest)."""
    L = corrupted.shape[1]
    at_eos = corrupted.gather(1, ends.clamp(max=L - 1)[:, None])
    return torch.where(rules.after_first_eos(ends, L), at_eos, corrupted)


def sample_tokens(logits: torch.Tensor, gumbel: torch.Tensor, special: SpecialIds) -> torch.Tensor:
    """Gumbel-max samples of ``logits`` (never MASK or PAD): the tokens a refill or a gate target uses."""
    logits = logits.float().clone()
    logits[..., [special.mask, special.pad]] = float("-inf")
    return (logits + gumbel).argmax(-1)


@dataclass
class Corrupted:
    inputs: torch.Tensor
    targets: torch.Tensor
    step: torch.Tensor
    cond: torch.Tensor
    prev_gate: torch.Tensor
    loss_positions: torch.Tensor  # corrupted and not padding
    valid: torch.Tensor  # not padding
    gate_target: torch.Tensor | None = None  # the mixture's: 1 where the position should take a new token


@torch.no_grad()
def corrupt(clean: torch.Tensor, noise: Noise, teacher, cfg: ImplicitRefinementConfig, special: SpecialIds,
            autocast=None) -> Corrupted:
    B, L = clean.shape
    targets, ends = targets_of(clean, special)
    corrupted = noise.u_corrupt < mask_rate(noise.t, cfg)[:, None]
    # the tail after EOS is one unit with the EOS: PAD if the EOS is kept, masked if it is not
    corrupted = tail_with_eos(corrupted, ends)
    inputs = torch.where(corrupted, torch.full_like(clean, special.mask), clean)

    prev_step = (noise.t - 1).clamp(min=0)
    zeros = torch.zeros(B, L, cfg.hidden_size, device=clean.device)
    with autocast() if autocast else contextlib.nullcontext():
        first = teacher.forward_train(inputs, prev_step, zeros)
    samples = sample_tokens(first["logits"], noise.gumbel, special)
    later = (noise.t > 0)[:, None]
    cond = first["cond_next"].float() * later[..., None] if noise.self_condition else zeros
    prev_gate = torch.sigmoid(first["gate_logits"].float())

    replaceable = corrupted & later
    p_s, p_r = cfg.sample_replace_rate, cfg.random_replace_rate
    use_sample = replaceable & (noise.u_replace < p_s)
    use_random = replaceable & (noise.u_replace >= p_s) & (noise.u_replace < p_s + p_r)
    inputs = torch.where(use_sample, samples, inputs)
    inputs = torch.where(use_random, noise.random_tokens, inputs)
    inputs = rules.pad_after_eos(inputs, special.eos, special.pad)  # what committing EOS does at run time
    valid = inputs != special.pad
    return Corrupted(inputs, targets, noise.t, cond, prev_gate, corrupted & valid, valid)


@torch.no_grad()
def corrupt_mixture(clean: torch.Tensor, noise: Noise, teacher, cfg: ImplicitRefinementConfig, special: SpecialIds,
                    autocast=None) -> Corrupted:
    """The mixture objective's inputs: per row one of three masks, the ones the samplers show the model.

    - semi-autoregressive (``semi_ar_weight``): a clean prefix of random length, a block of ``block_size``
      positions masked at a random rate (at least its first), every position after it masked;
    - one span (``span_weight``): a random span masked at a random rate, the suffix after it clean (filling a
      middle blank, linking two fragments);
    - uniform (the rest): every position masked at a random rate (any order).

    Some masked positions (in the block, for the semi-autoregressive rows) are refilled with the EMA teacher's
    own samples or random tokens, as committed tokens that may be wrong. The gate is taught, per position,
    whether the position should take a new token: for a committed token, whether it is wrong; for a mask,
    whether the token the teacher samples there is right (so the gate selector commits the masks it trusts
    and re-predicts the tokens it doubts, with one threshold). The model takes no step: it is time-independent
    (its masks say how far along a row is), so any number of loop steps runs it."""
    B, L = clean.shape
    targets, ends = targets_of(clean, special)
    length = (ends + 1).clamp(max=L)  # positions up to and including EOS
    pos = torch.arange(L, device=clean.device)[None, :]
    u = noise.u_row
    rate = u[:, 1:2].clamp(min=1e-3)
    start = (u[:, 2:3] * length[:, None]).floor().long()  # the block's or the span's first position
    random_masks = noise.u_corrupt < rate
    block = (pos >= start) & (pos < start + cfg.block_size)
    semi = (block & random_masks) | (pos == start) | (pos >= start + cfg.block_size)
    span_len = 1 + (u[:, 3:4] * (length[:, None] - start)).floor().long()
    in_span = (pos >= start) & (pos < start + span_len)
    span = (in_span & random_masks) | (pos == start)
    mode = torch.where(u[:, 0:1] < cfg.semi_ar_weight, 0, torch.where(u[:, 0:1] < cfg.semi_ar_weight + cfg.span_weight,
                                                                      1, 2))
    corrupted = tail_with_eos(torch.where(mode == 0, semi, torch.where(mode == 1, span, random_masks)), ends)
    inputs = torch.where(corrupted, torch.full_like(clean, special.mask), clean)

    step = torch.zeros(B, dtype=torch.long, device=clean.device)  # the mixture's model is time-independent
    zeros = torch.zeros(B, L, cfg.hidden_size, device=clean.device)
    with autocast() if autocast else contextlib.nullcontext():
        first = teacher.forward_train(inputs, step, zeros)
    samples = sample_tokens(first["logits"], noise.gumbel, special)
    cond = first["cond_next"].float() if noise.self_condition else zeros
    prev_gate = torch.sigmoid(first["gate_logits"].float())

    refillable = corrupted & torch.where(mode == 0, block, True)
    p_s, p_r = cfg.sample_replace_rate, cfg.random_replace_rate
    use_sample = refillable & (noise.u_replace < p_s)
    use_random = refillable & (noise.u_replace >= p_s) & (noise.u_replace < p_s + p_r)
    inputs = torch.where(use_sample, samples, inputs)
    inputs = torch.where(use_random, noise.random_tokens, inputs)
    inputs = rules.pad_after_eos(inputs, special.eos, special.pad)  # what committing EOS does at run time
    valid = inputs != special.pad
    masked = inputs == special.mask
    gate_target = torch.where(masked, (samples == targets).float(), (inputs != targets).float())
    return Corrupted(inputs, targets, step, cond, prev_gate, corrupted & valid, valid, gate_target)


def refinement_loss(model_fn, batch: Corrupted, cfg: ImplicitRefinementConfig, special: SpecialIds,
                    world_size: int = 1, autocast=None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one (rank's share of a) batch; ``model_fn`` is the (DDP-wrapped) forward_train."""
    with autocast() if autocast else contextlib.nullcontext():
        out = model_fn(batch.inputs, batch.step, batch.cond)
    logits = out["logits"].float()
    V = logits.shape[-1]
    valid, loss_pos = batch.valid, batch.loss_positions
    masked = (batch.inputs == special.mask) & valid
    committed = valid & ~masked
    wrong = (batch.inputs != batch.targets) & valid
    gate_target = wrong.float() if batch.gate_target is None else batch.gate_target
    later = (batch.step > 0)[:, None] & valid

    ce = F.cross_entropy(logits.reshape(-1, V), batch.targets.reshape(-1), reduction="none").view_as(batch.targets)
    entropy = rules.entropy(logits)
    gate_logits = out["gate_logits"].float()
    gate = torch.sigmoid(gate_logits)
    bce = F.binary_cross_entropy_with_logits(gate_logits, gate_target, reduction="none")

    sums = {
        "ce": (ce * loss_pos).sum(),
        "diversity": (F.relu(0.5 - entropy) * masked).sum(),
        "gate_bce": (bce * valid).sum(),
        "gate_mean": (gate * valid).sum(),
        "smooth": ((gate - batch.prev_gate) ** 2 * later).sum(),
        "gate_correct": (((gate > 0.5) == (gate_target > 0.5)) & (committed if batch.gate_target is None else valid)
                         ).sum().float(),
    }
    counts = torch.stack([loss_pos.sum(), masked.sum(), valid.sum(), later.sum(), committed.sum()]).float()
    if "critic_logits" in out:
        critic = F.binary_cross_entropy_with_logits(out["critic_logits"].float(), wrong.float(), reduction="none")
        sums["critic"] = (critic * committed).sum()
    counts = global_sum(counts).clamp(min=1.0)
    n_loss, n_masked, n_valid, n_later, n_committed = counts.unbind()

    loss = sums["ce"] / n_loss + cfg.diversity_weight * sums["diversity"] / n_masked
    if cfg.use_refine_gate:
        loss = loss + cfg.gate_loss_weight * sums["gate_bce"] / n_valid
        loss = loss + cfg.gate_sparsity_weight * sums["gate_mean"] / n_valid
        loss = loss + cfg.gate_smoothness_weight * sums["smooth"] / n_later
    if "critic" in sums:
        loss = loss + cfg.critic_loss_weight * sums["critic"] / n_committed
    # DDP averages gradients over ranks; scaling by world size makes that the global-batch gradient
    loss = loss * world_size
    detached = {k: v.detach() for k, v in sums.items()}
    stats = torch.stack([detached["ce"], detached["gate_bce"], detached["gate_correct"], detached["diversity"]])
    stats = global_sum(stats)
    metrics = {  # tensors: the trainer reads them (a host sync) only when it logs
        "loss": global_sum(loss.detach()) / world_size,  # the global-batch loss
        "ce": stats[0] / n_loss,
        "gate_bce": stats[1] / n_valid,
        "gate_acc": stats[2] / (n_committed if batch.gate_target is None else n_valid),
        "diversity": stats[3] / n_masked,
        "tokens": n_valid,
    }
    return loss, metrics

"""The refinement loop written directly in PyTorch (gate or entropy selector).

What a PyTorch user would write: every tensor stays on the model's device. It is the reference the
onnxruntime loop is tested against (same seed, same tokens: both draw their Gumbel noise from the same
numpy generator in the same shapes) and the "PyTorch eager" row of ``imadarem bench``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from imadarem.runtime.generator import LoopTimings, banned_ids, model_step


@torch.no_grad()
def torch_refine(model, n: int, steps: int | None = None, temperature: float | None = None, seed: int | None = 0,
                 stop_threshold: float | None = None, selector: str = "gate", threshold: float | None = None,
                 return_stats: bool = False, timings: LoopTimings | None = None, autocast: str | None = None,
                 noise: str = "numpy"):
    """Generate ``n`` sequences; returns [n, max_seq_len] ids (and per-sequence steps used).

    With ``return_stats`` the second value is a dict: ``steps`` used, ``edits`` (changed tokens of
    each step, -1 once a row has left) and ``early`` stop flags. ``timings`` gets per-step wall times
    (the model call is the whole of ``run_seconds``). ``autocast="bf16"`` runs the model under bf16
    autocast (the fast PyTorch path on GPUs). ``noise="torch"`` draws the Gumbel noise with torch on
    the model's device instead of numpy on the host (what a PyTorch user would do on a GPU; the tokens
    then no longer match the onnxruntime loop's).
    """
    started = time.perf_counter()
    cfg, sp = model.config, model.special
    device = next(model.parameters()).device
    K = steps or cfg.max_refinement_steps
    temp = cfg.sampling_temperature if temperature is None else temperature
    stop = cfg.stop_threshold if stop_threshold is None else stop_threshold
    if selector == "gate":
        thr = 0.5 if threshold is None else threshold
    elif selector == "entropy":
        thr = cfg.min_refine_uncertainty if threshold is None else threshold
    else:
        raise ValueError(f"the PyTorch reference loop implements 'gate' and 'entropy', not {selector!r}")
    if noise not in ("numpy", "torch"):
        raise ValueError(f"noise must be 'numpy' or 'torch', not {noise!r}")
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    device_rng = (torch.Generator(device=device).manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
                  if noise == "torch" else None)
    L, H = cfg.max_seq_len, cfg.hidden_size
    tokens = torch.full((n, L), sp.mask, dtype=torch.long, device=device)
    frozen = torch.zeros(n, L, dtype=torch.bool, device=device)
    steps_used = torch.zeros(n, dtype=torch.long, device=device)
    edits = torch.full((n, K), -1, dtype=torch.long, device=device)
    early = torch.zeros(n, dtype=torch.bool, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if autocast == "bf16"
           else torch.autocast(device.type, enabled=False))
    active = torch.arange(n, device=device)
    cond = torch.zeros(n, L, H, device=device)
    pos = torch.arange(L, device=device)
    cut = L  # positions the model runs on
    banned = banned_ids(sp, getattr(model.tokenizer, "unk_token_id", None)).tolist()
    model.eval()
    for t in range(K):
        if active.numel() == 0:
            break
        step_started = time.perf_counter()
        x, fz = tokens[active], frozen[active]
        step = torch.full((x.shape[0],), model_step(t, K, cfg.max_refinement_steps), dtype=torch.long, device=device)
        if sp.eos is not None:  # as the runtime: run only up to the last committed EOS (the rest is padding)
            first_e = _first_eos(x, sp.eos)
            cut = min(cut, int(first_e.max()) + 1)
        if timings is not None:
            sync()
            run_started = time.perf_counter()
        with amp:
            logits, gate, cond_next = (o.float() for o in model(x[:, :cut], step, cond[:, :cut])[:3])
        if timings is not None:
            sync()
            run_seconds = time.perf_counter() - run_started
        if cut < L:
            logits = torch.nn.functional.pad(logits, (0, 0, 0, L - cut))
            gate = torch.nn.functional.pad(gate, (0, L - cut))
        logits[..., banned] = float("-inf")
        if sp.eos is not None:  # as the runtime: no EOS before a committed one
            ban = (pos[None] < first_e[:, None]) & (first_e < L)[:, None]
            logits[..., sp.eos] = torch.where(ban, float("-inf"), logits[..., sp.eos])
        if temp <= 1e-6:
            proposals = logits.argmax(-1)
        else:
            if noise == "torch":
                u = torch.rand(logits.shape, generator=device_rng, device=device)
            else:
                u = torch.from_numpy(rng.random(tuple(logits.shape), dtype=np.float32)).to(device)
            noise = torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
            proposals = (logits / temp - noise).argmax(-1)
        is_mask = x == sp.mask
        if selector == "gate":
            update = gate > thr
        else:
            logp = torch.log_softmax(logits.float(), -1)
            entropy = -(logp.exp() * torch.nan_to_num(logp, neginf=0.0)).sum(-1)
            update = is_mask | (entropy > thr)
        update &= ~fz
        if t == K - 1:
            update |= is_mask & ~fz
        new = torch.where(update, proposals, x)
        new_fz = fz.clone()
        if sp.eos is not None:
            first = _first_eos(new, sp.eos)
            after = pos[None] > first[:, None]
            new = torch.where(after, torch.full_like(new, sp.pad), new)
            new_fz |= after | (pos[None] == first[:, None])
        changed = ((new != x) & ~fz).sum(-1)
        ratio = changed.float() / (~fz).sum(-1).clamp(min=1).float()
        tokens[active], frozen[active] = new, new_fz
        steps_used[active] = t + 1
        masks_left = ((new == sp.mask) & ~new_fz).any(-1)
        done = new_fz.all(-1) | ((t > 0) & (ratio < stop) & ~masks_left)
        edits[active, t] = changed
        if t < K - 1:
            early[active[done]] = True
        keep = ~done
        rows_run = active.numel()
        active = active[keep]
        cond = cond_next[keep]
        if timings is not None:
            sync()
            timings.active_rows.append(int(rows_run))
            timings.run_lengths.append(cut)
            timings.run_seconds.append(run_seconds)
            timings.step_seconds.append(time.perf_counter() - step_started)
    out = tokens.cpu().numpy()
    if timings is not None:
        timings.total_seconds += time.perf_counter() - started
    if not return_stats:
        return out
    return out, {"steps": steps_used.cpu().numpy(), "edits": edits.cpu().numpy(), "early": early.cpu().numpy()}


def _first_eos(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """Position of the first EOS of each row (the row length when there is none), as the runtime's."""
    is_eos = tokens == eos
    return torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(tokens[:, 0], tokens.shape[1]))

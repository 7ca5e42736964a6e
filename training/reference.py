"""The refinement loop written directly in PyTorch (gate or entropy selector).

What a PyTorch user would write: every tensor stays on the model's device. It is the reference the
onnxruntime loop is tested against (same seed, same tokens: both draw their Gumbel noise from the same
numpy generator in the same shapes) and the "PyTorch eager" row of ``imadarem bench``. Its rules are the
runtime's own (``imadarem.runtime.rules``), applied to tensors; its phases are the runtime loop's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from imadarem.runtime import rules
from imadarem.runtime.generator import LoopTimings, banned_ids
from imadarem.runtime.randomness import SampleStreams

SELECTORS = ("gate", "entropy")
NOISE_SOURCES = ("numpy", "torch")


@dataclass
class _Knobs:
    """One call's settings, resolved against the model's config."""

    num_steps: int
    temperature: float
    stop_threshold: float
    selector: str
    threshold: float
    noise: str


def _resolve(cfg, steps, temperature, stop_threshold, selector, threshold, noise) -> _Knobs:
    if selector not in SELECTORS:
        raise ValueError(f"the PyTorch reference loop implements 'gate' and 'entropy', not {selector!r}")
    if noise not in NOISE_SOURCES:
        raise ValueError(f"noise must be 'numpy' or 'torch', not {noise!r}")
    default_threshold = 0.5 if selector == "gate" else cfg.min_refine_uncertainty
    return _Knobs(num_steps=steps or cfg.max_refinement_steps,
                  temperature=cfg.sampling_temperature if temperature is None else temperature,
                  stop_threshold=cfg.stop_threshold if stop_threshold is None else stop_threshold,
                  selector=selector, threshold=default_threshold if threshold is None else threshold,
                  noise=noise)


class _Uniforms:
    """The uniforms behind Gumbel sampling: from the runtime's per-sample streams (same seed, same tokens
    as the onnxruntime loop) or from a torch generator on the model's device (no host-to-device copy)."""

    def __init__(self, seed: int | None, n: int, source: str, device: torch.device):
        self.device = device
        self.streams = SampleStreams.for_request(seed, 0, n)
        self.torch = None
        if source == "torch":
            state = int(np.random.SeedSequence(seed).generate_state(1)[0])
            self.torch = torch.Generator(device=device).manual_seed(state)

    def __call__(self, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """[len(rows), *shape] uniforms for the active ``rows``."""
        if self.torch is not None:
            return torch.rand((rows.numel(), *shape), generator=self.torch, device=self.device)
        return torch.from_numpy(self.streams.uniforms(rows.cpu().numpy(), shape)).to(self.device)


def _sample(logits, first, banned: list[int], eos: int | None, temperature: float, uniforms: _Uniforms, rows):
    """Proposals from the logits with the runtime's bans (in place): banned ids, and no EOS before a
    row's committed EOS."""
    logits[..., banned] = float("-inf")
    if first is not None:
        logits[..., eos] = logits[..., eos].masked_fill(rules.eos_banned(first, logits.shape[1]), float("-inf"))
    if temperature <= rules.GREEDY_TEMPERATURE:
        return logits.argmax(-1)
    return rules.gumbel_max(logits, temperature, uniforms(rows, tuple(logits.shape[1:])))


def _select_and_apply(x, fz, proposals, logits, gate, knobs: _Knobs, mask_id: int, last: bool):
    """The gate or entropy rule; frozen positions never change, leftover masks resolve at the last step."""
    is_mask = x == mask_id
    if knobs.selector == "gate":
        update = rules.gate_update(gate, knobs.threshold)
    else:
        update = rules.entropy_update(is_mask, rules.entropy(logits), knobs.threshold)
    update &= ~fz
    if last:
        update |= is_mask & ~fz
    return torch.where(update, proposals, x)


@torch.no_grad()
def torch_refine(model, n: int, steps: int | None = None, temperature: float | None = None, seed: int | None = 0,
                 stop_threshold: float | None = None, selector: str = "gate", threshold: float | None = None,
                 return_stats: bool = False, timings: LoopTimings | None = None, autocast: str | None = None,
                 noise: str = "numpy"):
    """Generate ``n`` sequences; returns [n, max_seq_len] ids (and per-sequence steps used).

    With ``return_stats`` the second value is a dict: ``steps`` used, ``edits`` (changed tokens of
    each step, -1 once a row has left) and ``early`` stop flags. ``timings`` gets per-step wall times
    (the model call is the whole of ``run_seconds``). ``autocast="bf16"`` runs the model under bf16
    autocast (the fast PyTorch path on GPUs). ``noise="torch"`` draws the uniforms with torch on the
    model's device at every step instead of numpy on the host (what a PyTorch user would do on a GPU;
    the tokens then no longer match the onnxruntime loop's).
    """
    started = time.perf_counter()
    cfg, sp = model.config, model.special
    device = next(model.parameters()).device
    knobs = _resolve(cfg, steps, temperature, stop_threshold, selector, threshold, noise)
    K, L = knobs.num_steps, cfg.max_seq_len
    uniforms = _Uniforms(seed, n, knobs.noise, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if autocast == "bf16"
           else torch.autocast(device.type, enabled=False))
    banned = banned_ids(sp, getattr(model.tokenizer, "unk_token_id", None)).tolist()

    tokens = torch.full((n, L), sp.mask, dtype=torch.long, device=device)
    frozen = torch.zeros(n, L, dtype=torch.bool, device=device)
    steps_used = torch.zeros(n, dtype=torch.long, device=device)
    edits = torch.full((n, K), -1, dtype=torch.long, device=device)
    early = torch.zeros(n, dtype=torch.bool, device=device)
    active = torch.arange(n, device=device)
    cond = torch.zeros(n, L, cfg.hidden_size, device=device)
    cut = L  # positions the model runs on
    model.eval()
    for t in range(K):
        if active.numel() == 0:
            break
        step_started = time.perf_counter()
        x, fz = tokens[active], frozen[active]
        # run the model (only up to the last committed EOS of the active rows: the rest is padding)
        first = rules.first_eos(x, sp.eos) if sp.eos is not None else None
        if first is not None:
            cut = min(cut, int(first.max()) + 1)
        step = torch.full((x.shape[0],), rules.model_step(t, K, cfg.max_refinement_steps), dtype=torch.long,
                          device=device)
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
        proposals = _sample(logits, first, banned, sp.eos, knobs.temperature, uniforms, active)
        new = _select_and_apply(x, fz, proposals, logits, gate, knobs, sp.mask, last=t == K - 1)
        new_fz = fz
        if sp.eos is not None:
            new, new_fz = rules.freeze_after_eos(new, fz.clone(), sp.eos, sp.pad)
        # stop
        _, ratio = rules.change_ratio(new, x, fz)
        changed = rules.edits(new, x, fz, sp.pad)
        masks_left = ((new == sp.mask) & ~new_fz).any(-1)
        done = rules.finished(t, ratio, knobs.stop_threshold, masks_left, new_fz.all(-1))
        tokens[active], frozen[active] = new, new_fz
        steps_used[active] = t + 1
        edits[active, t] = changed
        if t < K - 1:
            early[active[done]] = True
        # compact
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


@torch.no_grad()
def torch_decode(model, n: int, drafts: int | None = None, temperature: float | None = None, seed: int | None = 0,
                 batch_size: int | None = None, timings: LoopTimings | None = None):
    """A causal model's fused decoder in PyTorch eager (``training/causal.py: DecodeStep``, caches written in
    place): draft-and-verify with ``drafts`` draft heads (default all), or left to right with 0. What a
    PyTorch user would write on a GPU: every tensor stays on the model's device, one host sync per call
    (the count of active rows). Each sample's noise is its counter noise (``rules.counter_gumbel``), so the
    molecules are the runtime's for the same seed. Returns [n, max_seq_len] ids and calls per molecule."""
    from imadarem.runtime.randomness import SampleStreams
    from imadarem.training.causal import DecodeStep, decode_with

    started = time.perf_counter()
    device = next(model.parameters()).device
    step = DecodeStep(model, drafts, inplace=True).to(device).eval()
    temp = model.config.sampling_temperature if temperature is None else temperature
    root = np.random.SeedSequence(seed)
    batch = batch_size or n
    ids, calls = [], []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for first in range(0, n, batch):
        size = min(batch, n - first)
        keys = torch.from_numpy(SampleStreams(root, first, size).keys()).to(device)
        clock = {"t": time.perf_counter(), "rows": size}

        def on_call(active: int, clock=clock) -> None:  # the call ends with the .item() sync in decode_with
            if timings is not None:
                now = time.perf_counter()
                timings.step_seconds.append(now - clock["t"])
                timings.run_seconds.append(now - clock["t"])
                timings.active_rows.append(clock["rows"])
                timings.run_lengths.append(0)
            clock["t"], clock["rows"] = time.perf_counter(), active

        sync()
        clock["t"] = time.perf_counter()
        state = decode_with(step, keys, temp, on_call=on_call)
        ids.append(state["ids"].cpu().numpy())
        calls.append(state["calls"].cpu().numpy())
    if timings is not None:
        timings.total_seconds += time.perf_counter() - started
    return np.concatenate(ids), np.concatenate(calls)

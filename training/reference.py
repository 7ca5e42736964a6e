"""The PyTorch loops: strategies that the runtime's one Generator drives (``imadarem bench``'s PyTorch rows).

What a PyTorch user would write: every tensor stays on the model's device, one call per step. They plug
into ``imadarem.runtime.Generator`` exactly as a model-file format does (``runtime/formats/base.py``:
:class:`Model` -> :class:`Plan` -> :class:`Decoding`), so batching, per-sample seeds and timings are the
runtime's own and only the per-call work is PyTorch:

- :class:`TorchRefinement`: the refinement loop of an ImplicitRefinementModel with the gate or entropy
  rule (the runtime's rules on tensors). With ``noise="numpy"`` it draws each sample's uniforms from the
  runtime's per-sample streams, so it samples the onnxruntime loop's tokens for the same seed: the
  reference the exported file is tested against.
- :class:`TorchDecode`: a causal model's fused decoder (``training/causal.py: DecodeStep``, caches written
  in place, SDPA attention): draft-and-verify, or left to right with ``drafts=0``; each sample's counter
  noise makes its molecules the runtime's.

``torch_refine`` and ``torch_decode`` are the thin drivers of those through the Generator.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from imadarem.runtime import rules
from imadarem.runtime.bans import banned_ids
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.generator import Generator
from imadarem.runtime.randomness import SampleStreams
from imadarem.runtime.request import Request
from imadarem.runtime.results import BatchResult, CallReport, LoopTimings
from imadarem.runtime.strategy import Decoding, Model, Plan

SELECTORS = ("gate", "entropy")
NOISE_SOURCES = ("numpy", "torch")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


class _TorchModel(Model):
    """A PyTorch model as the Generator sees it: its tokenizer, special ids, config and length."""

    def __init__(self, model):
        self.net = model
        self.tokenizer, self.special = model.tokenizer, model.special
        self.config = model.config.to_dict()

    @property
    def max_seq_len(self) -> int:
        return self.net.config.max_seq_len


# -- the refinement loop of an ImplicitRefinementModel ---------------------------------------------------
class TorchRefinement(_TorchModel):
    """An ImplicitRefinementModel as a Generator model: the gate or entropy rule, every step on its device.

    ``autocast="bf16"`` runs the model under bf16 autocast (the fast PyTorch path on GPUs); ``noise="torch"``
    draws the uniforms with torch on the model's device instead of from the host's per-sample streams
    (what a PyTorch user would do on a GPU; the tokens then no longer match the onnxruntime loop's)."""

    def __init__(self, model, noise: str = "numpy", autocast: str | None = None):
        if noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be 'numpy' or 'torch', not {noise!r}")
        super().__init__(model.eval())
        self.noise, self.autocast = noise, autocast

    def plan(self, request: Request) -> Plan:
        name = "gate" if request.selector is None else request.selector
        if name not in SELECTORS:
            raise ImadaremError(f"the PyTorch reference loop implements 'gate' and 'entropy', not {name!r}")
        unknown = set(request.selector_options) - {"threshold"}
        if unknown or request.prompt is not None or request.trajectory or request.drafts is not None:
            raise ImadaremError("the PyTorch reference loop takes no prompt, trajectory, drafts or selector "
                                f"option but threshold (got {sorted(unknown)})")
        cfg = self.net.config
        if cfg.objective == "block":
            raise ImadaremError("the PyTorch reference loop decodes all positions at once; a block model decodes "
                                "block by block: export it and run the file")
        threshold = request.selector_options.get("threshold")
        if threshold is None:
            threshold = 0.5 if name == "gate" else cfg.min_refine_uncertainty
        return _RefinePlan(self, name, float(threshold),
                           cfg.max_refinement_steps if request.steps is None else request.steps,
                           cfg.sampling_temperature if request.temperature is None else request.temperature,
                           cfg.stop_threshold if request.stop_threshold is None else request.stop_threshold)


class _RefinePlan(Plan):
    def __init__(self, owner: TorchRefinement, selector: str, threshold: float, steps: int, temperature: float,
                 stop_threshold: float):
        self.owner, self.selector, self.threshold = owner, selector, threshold
        self.steps, self.temperature, self.stop_threshold = steps, temperature, stop_threshold

    def start(self, size: int, streams: SampleStreams) -> Decoding:
        return _RefineDecoding(self, size, streams)


class _RefineDecoding(Decoding):
    """One batch: the runtime loop's phases on tensors (run, sample, select, apply, freeze EOS, stop,
    compact), the model only up to the last committed EOS of the active rows."""

    def __init__(self, plan: _RefinePlan, n: int, streams: SampleStreams):
        owner = plan.owner
        self.plan, self.net, self.sp = plan, owner.net, owner.special
        cfg = self.net.config
        self.device = _device(self.net)
        self.sync = _sync(self.device)
        self.streams = streams
        self.generator = None
        if owner.noise == "torch":
            state = int(np.random.SeedSequence(streams.root.entropy, spawn_key=(*streams.root.spawn_key, streams.first,
                                                                                streams.count, 1)).generate_state(1)[0])
            self.generator = torch.Generator(device=self.device).manual_seed(state)
        self.amp = (torch.autocast(self.device.type, dtype=torch.bfloat16) if owner.autocast == "bf16"
                    else torch.autocast(self.device.type, enabled=False))
        self.banned = banned_ids(self.sp, getattr(owner.tokenizer, "unk_token_id", None)).tolist()
        L, K = cfg.max_seq_len, plan.steps
        d = self.device
        self.tokens = torch.full((n, L), self.sp.mask, dtype=torch.long, device=d)
        self.frozen = torch.zeros(n, L, dtype=torch.bool, device=d)
        self.steps_used = torch.zeros(n, dtype=torch.long, device=d)
        self.edits = torch.full((n, K), -1, dtype=torch.long, device=d)
        self.early = torch.zeros(n, dtype=torch.bool, device=d)
        self.rows = torch.arange(n, device=d)
        self.cond = torch.zeros(n, L, cfg.hidden_size, device=d)
        self.cut, self.t = L, 0

    @property
    def active(self) -> int:
        return int(self.rows.numel()) if self.t < self.plan.steps else 0

    def _uniforms(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.generator is not None:
            return torch.rand((self.rows.numel(), *shape), generator=self.generator, device=self.device)
        return torch.from_numpy(self.streams.uniforms(self.rows.cpu().numpy(), shape)).to(self.device)

    @torch.no_grad()
    def step(self) -> CallReport:
        p, sp, cfg = self.plan, self.sp, self.net.config
        t, K, L = self.t, p.steps, cfg.max_seq_len
        x, fz = self.tokens[self.rows], self.frozen[self.rows]
        first = rules.first_eos(x, sp.eos) if sp.eos is not None else None
        if first is not None:  # the model runs up to the last committed EOS: the rest is padding
            self.cut = min(self.cut, int(first.max()) + 1)
        step = torch.full((x.shape[0],), rules.model_step(t, K, cfg.max_refinement_steps), dtype=torch.long,
                          device=self.device)
        self.sync()
        started = time.perf_counter()
        with self.amp:
            logits, gate, cond_next = (o.float() for o in self.net(x[:, : self.cut], step, self.cond[:, : self.cut])[:3])
        self.sync()
        seconds = time.perf_counter() - started
        if self.cut < L:
            logits = torch.nn.functional.pad(logits, (0, 0, 0, L - self.cut))
            gate = torch.nn.functional.pad(gate, (0, L - self.cut))
        # sample, with the runtime's bans: banned ids, no EOS before a row's committed EOS
        logits[..., self.banned] = float("-inf")
        if first is not None:
            logits[..., sp.eos] = logits[..., sp.eos].masked_fill(rules.eos_banned(first, L), float("-inf"))
        if p.temperature <= rules.GREEDY_TEMPERATURE:
            proposals = logits.argmax(-1)
        else:
            proposals = rules.gumbel_max(logits, p.temperature, self._uniforms(tuple(logits.shape[1:])))
        # select and apply: frozen positions never change, leftover masks resolve at the last step
        is_mask = x == sp.mask
        if p.selector == "gate":
            update = rules.gate_update(gate, p.threshold)
        else:
            update = rules.entropy_update(is_mask, rules.entropy(logits), p.threshold)
        update &= ~fz
        if t == K - 1:
            update |= is_mask & ~fz
        new, new_fz = torch.where(update, proposals, x), fz
        if sp.eos is not None:
            new, new_fz = rules.freeze_after_eos(new, fz.clone(), sp.eos, sp.pad)
        # stop, record, compact
        _, ratio = rules.change_ratio(new, x, fz)
        changed = rules.edits(new, x, fz, sp.pad)
        masks_left = ((new == sp.mask) & ~new_fz).any(-1)
        done = rules.finished(t, ratio, p.stop_threshold, masks_left, new_fz.all(-1))
        self.tokens[self.rows], self.frozen[self.rows] = new, new_fz
        self.steps_used[self.rows] = t + 1
        self.edits[self.rows, t] = changed
        if t < K - 1:
            self.early[self.rows[done]] = True
        ran = int(self.rows.numel())
        keep = ~done
        self.rows, self.cond = self.rows[keep], cond_next[keep]
        self.sync()
        self.t += 1
        return CallReport(ran, seconds, self.cut)

    def result(self) -> BatchResult:
        edits = self.edits.cpu().numpy()
        return BatchResult(self.tokens.cpu().numpy(), self.steps_used.cpu().numpy(),
                           [[int(e) for e in row if e >= 0] for row in edits], self.early.cpu().numpy())


def torch_refine(model, n: int, steps: int | None = None, temperature: float | None = None, seed: int | None = 0,
                 stop_threshold: float | None = None, selector: str = "gate", threshold: float | None = None,
                 return_stats: bool = False, timings: LoopTimings | None = None, autocast: str | None = None,
                 noise: str = "numpy"):
    """Generate ``n`` sequences in one batch; returns [n, max_seq_len] ids, and with ``return_stats`` a
    dict of ``steps`` used, ``edits`` (per row, per step run) and ``early`` stop flags."""
    options: dict[str, Any] = {} if threshold is None else {"threshold": threshold}
    gen = Generator(TorchRefinement(model, noise, autocast))
    result = _one(gen.iter_results(n, selector=selector, steps=steps, temperature=temperature,
                                   stop_threshold=stop_threshold, seed=seed, batch_size=n, timings=timings, **options))
    if not return_stats:
        return result.ids
    return result.ids, {"steps": result.steps, "edits": result.edits, "early": result.early}


# -- a causal model's fused decoder -------------------------------------------------------------------
class TorchDecode(_TorchModel):
    """A CausalLM's DecodeStep in PyTorch eager as a Generator model (``drafts`` heads; 0: left to right)."""

    #: torch.compile modes a TorchDecode may run its step with (None: eager)
    COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")

    def __init__(self, model, drafts: int | None = None, compile_mode: str | None = None):
        """``compile_mode``: run the step through ``torch.compile`` (inductor) in that mode, the strongest
        PyTorch peer of our engines (issue #26); one compilation per batch size, the state's shapes being
        fixed for a batch."""
        from imadarem.training.causal import DecodeStep

        super().__init__(model)
        self.step_module = DecodeStep(model, drafts, inplace=True).to(_device(model)).eval()
        if compile_mode is not None and compile_mode not in self.COMPILE_MODES:
            raise ImadaremError(f"compile mode must be one of {', '.join(self.COMPILE_MODES)}, got {compile_mode!r}")
        self.compile_mode = compile_mode
        self.step_fn = self.step_module if compile_mode is None else torch.compile(
            self.step_module, mode=None if compile_mode == "default" else compile_mode, dynamic=False)

    def plan(self, request: Request) -> Plan:
        name = getattr(request.selector, "name", request.selector)
        if name not in (None, "gate") or request.prompt is not None or request.steps is not None \
                or request.trajectory or request.selector_options \
                or request.drafts not in (None, self.step_module.drafts):
            raise ImadaremError("the PyTorch decode loop runs its drafts as the gate selector does: it takes no "
                                "selector, prompt, steps, trajectory or other draft count")
        temp = self.net.config.sampling_temperature if request.temperature is None else request.temperature
        return _DecodePlan(self, temp)


class _DecodePlan(Plan):
    def __init__(self, owner: TorchDecode, temperature: float):
        self.owner, self.temperature = owner, temperature

    def start(self, size: int, streams: SampleStreams) -> Decoding:
        return _TorchDecoding(self.owner, streams.keys(), self.temperature)


class _TorchDecoding(Decoding):
    """One batch: the state on the device, one host sync per call (the count of active rows). In flight
    (``refills``), rows are taken and restarted as the CUDA loop does (``runtime/formats/decode.py``:
    ``CudaDecoding``): the small state read back only once an eighth of the rows have ended."""

    refills = True

    def __init__(self, owner: TorchDecode, keys: np.ndarray, temperature: float):
        from imadarem.runtime.formats.decode import state_names

        step = owner.step_module
        self.step_module, self.temperature = step, temperature
        self.step_fn, self.device = owner.step_fn, _device(owner.net)
        self.dtype = owner.net.tok.weight.dtype
        self.sync = _sync(self.device)
        self.keys = torch.from_numpy(keys).to(self.device)
        self.state = step.started_state(self.keys, temperature, self.dtype)
        self.names = state_names(owner.net.config.num_layers)
        self.temp = torch.tensor([temperature], dtype=torch.float32, device=self.device)
        self.left = int((~self.state["done"]).sum().item())
        self.calls, self.limit, self.length = 0, owner.net.config.max_seq_len + 1, owner.net.config.max_seq_len
        self.idle = np.zeros(keys.shape[0], bool)  # rows taken and not restarted
        self.live, self.since_look, self.refilled = keys.shape[0], 0, False

    @property
    def active(self) -> int:
        return self.left if self.calls < self.limit or self.refilled else 0

    @torch.no_grad()
    def step(self) -> CallReport:
        started = time.perf_counter()
        out = self.step_fn(*(self.state[n] for n in self.names), self.keys, self.temp)
        rows = self.left
        self.state = dict(zip(self.names, out[:-1]))
        self.left = int(out[-1].item())  # the call's one host sync
        self.calls, self.since_look = self.calls + 1, self.since_look + 1
        seconds = time.perf_counter() - started
        return CallReport(rows, seconds, 0)

    def result(self) -> BatchResult:
        return BatchResult(self.state["ids"].cpu().numpy(), self.state["calls"].cpu().numpy())

    def finished(self) -> np.ndarray:
        from imadarem.runtime.formats.decode import CudaDecoding

        ended = self.live - self.left
        if not (self.left == 0 or ended >= max(1, int(self.idle.size * CudaDecoding.look_every))
                or self.since_look >= self.length):
            return np.zeros(0, np.int64)
        self.since_look = 0
        done, calls = self.state["done"].cpu().numpy(), self.state["calls"].cpu().numpy()
        return np.flatnonzero((done | (calls >= self.length)) & ~self.idle)

    @torch.no_grad()
    def take(self, rows: np.ndarray) -> BatchResult:
        self.idle[rows] = True
        self.live -= rows.size
        at = torch.from_numpy(rows).to(self.device)
        cut = at[~self.state["done"][at]]  # out of positions but not done (the safety net): stop them
        if cut.numel():
            self.state["done"][cut] = True
            self.left -= int(cut.numel())
        return BatchResult(self.state["ids"][at].cpu().numpy(), self.state["calls"][at].cpu().numpy())

    @torch.no_grad()
    def restart(self, rows: np.ndarray, streams: SampleStreams) -> None:
        """The rows' small state as ``started_state`` sets it (cache slot 0, BOS, is every row's)."""
        from imadarem.runtime.formats.decode import STATE

        keys = torch.from_numpy(streams.keys()).to(self.device)
        fresh = self.step_module.started_state(keys, self.temperature, self.dtype)
        at = torch.from_numpy(rows).to(self.device)
        for name in STATE:
            self.state[name][at] = fresh[name]
        self.keys[at] = keys
        self.idle[rows] = False
        self.live += rows.size
        self.left += int((~fresh["done"]).sum().item())
        self.refilled = True


def torch_decode(model, n: int, drafts: int | None = None, temperature: float | None = None, seed: int | None = 0,
                 batch_size: int | None = None, timings: LoopTimings | None = None):
    """Draft-and-verify (``drafts`` heads, default all; 0: left to right) in PyTorch eager through the
    Generator; returns [n, max_seq_len] ids and calls per molecule."""
    gen = Generator(TorchDecode(model, drafts))
    results = list(gen.iter_results(n, temperature=temperature, seed=seed, batch_size=batch_size or n, timings=timings))
    return np.concatenate([r.ids for r in results]), np.concatenate([r.steps for r in results])


def _one(results) -> BatchResult:
    (result,) = list(results)
    return result

"""``imadarem bench``: the exported step against the real alternatives, in one process, side by side.

Every engine generates the same number of sequences at the same model size, step budget and batch
size, after one untimed warm-up run, ``repeats`` times. Rows:

- ``ort-fp32`` / ``ort-int8`` / ``ort-fp16``: the runtime's numpy + onnxruntime loop over the model
  file variants (fp16 on CUDA only), sampling on the host;
- ``ort-fp32-head`` / ``ort-fp16-head``: the same files with the sampling head (``export --sampling``):
  proposals and uncertainty measures come out of the graph, no [batch, length, vocab] copy;
- ``torch``: the same model's PyTorch eager loop (``imadarem.training.reference.torch_refine``),
  which gives the same tokens as ``ort-fp32`` for the same seed on the CPU (on CUDA it draws its noise
  with torch on the GPU, as a PyTorch user would); ``torch-bf16`` runs it under bf16 autocast on CUDA;
- ``xt-nar``: x-transformers' NonAutoregressiveWrapper.generate at equal size and steps;
- ``xt-ar-kv``: an equal-size x-transformers decoder generating left to right with a KV cache.

The torch and ORT rows share one set of weights: a checkpoint's EMA weights, or the weights rebuilt
from a model file (dequantised when it is int8, so ``ort-fp32`` is then the exact float twin of the
shipped int8 file). Results: ``bench.json`` (everything) and ``bench.md`` (the table, with speed
ratios against the PyTorch eager loop on the same device and batch size).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from imadarem.bench.report import _fmt, _machine, machine_line
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.files import write_text
from imadarem.runtime.generator import Generator
from imadarem.runtime.results import LoopTimings

ENGINES = ("ort-fp32", "ort-int8", "ort-fp16", "ort-fp32-head", "ort-fp16-head", "torch", "torch-bf16", "xt-nar",
           "xt-ar-kv")
CUDA_ONLY = {"ort-fp16", "ort-fp16-head", "torch-bf16"}
CPU_ONLY = {"ort-int8"}  # onnxruntime's CUDA provider has no MatMulInteger fast path


@dataclass
class BenchArgs:
    model: str | None = None  # a model file (default: the bundled model) ...
    checkpoint: str | None = None  # ... or a training run / checkpoint
    batch_sizes: tuple[int, ...] = (1, 16, 64, 256)
    providers: tuple[str, ...] = ("cpu",)
    engines: tuple[str, ...] | None = None  # None: every engine that runs on the provider
    steps: int | None = None
    selector: str = "gate"
    repeats: int = 3
    threads: int | None = None
    seed: int = 0
    agreement_n: int = 256
    out_dir: str = "bench-results"
    samples: int = 0  # causal models: molecules per engine written as SMILES (and scored, with the extras)
    reference: str | None = None  # causal models: another model file timed as it is, beside the rows
    torch_compile_mode: str = "default"  # causal models' torch-compile rows: torch.compile's mode


@dataclass
class Row:
    engine: str
    provider: str
    batch: int
    wall_s: float  # median over repeats of one generate call
    seq_per_s: float
    step_p50_ms: float
    step_p95_ms: float
    steps_used: float  # mean over sequences
    edits_per_step: float | None  # mean tokens changed per sequence and step
    early_stop: float | None  # fraction of sequences that stopped before the last step
    outside_run: float | None  # share of the wall time spent outside the model call
    repeats: int
    speedup_vs_torch: float | None = None
    model_tflops: float | None = None  # achieved FLOP rate inside the model call
    notes: list[str] = field(default_factory=list)


def step_flops(config, batch: int, length: int) -> float:
    """Matrix-product FLOPs of one step on [batch, length] (what a roofline counts): the linear
    layers, the attention products and the tied output projection plus the self-conditioning
    product with the embedding."""
    h, layers, vocab = config.hidden_size, config.num_layers, config.vocab_size
    tokens = batch * length
    linear = layers * (4 * h * h + 2 * config.mlp_ratio * h * h) + h * h + h  # blocks, self_cond, gate
    attention = layers * 2 * length * h  # QK^T and AV, per token
    heads = 2 * h * vocab  # logits and soft-prediction @ embedding
    return 2.0 * tokens * (linear + attention + heads)


def _summarise(engine: str, provider: str, batch: int, runs: list[tuple[LoopTimings, dict]], config=None) -> Row:
    walls = [t.total_seconds for t, _ in runs]
    steps = np.concatenate([t.step_seconds for t, _ in runs]) * 1e3
    stats = [s for _, s in runs]
    steps_used = float(np.mean(np.concatenate([s["steps"] for s in stats])))
    edits = [np.mean(e) for s in stats if s.get("edits") is not None for e in s["edits"] if len(e)]
    early = [float(np.mean(s["early"])) for s in stats if s.get("early") is not None]
    outside = [t.outside_run_fraction() for t, _ in runs]
    wall = float(np.median(walls))
    tflops = None
    if config is not None and all(t.run_lengths for t, _ in runs):
        flops = sum(step_flops(config, b, n) for t, _ in runs for b, n in zip(t.active_rows, t.run_lengths))
        tflops = flops / sum(sum(t.run_seconds) for t, _ in runs) / 1e12
    return Row(engine, provider, batch, wall, batch / wall, float(np.percentile(steps, 50)),
               float(np.percentile(steps, 95)), steps_used, float(np.mean(edits)) if edits else None,
               float(np.mean(early)) if early else None, float(np.median(outside)), len(runs), model_tflops=tflops)


class Bench:
    def __init__(self, args: BenchArgs):
        self.args = args
        kind = "refine" if args.checkpoint else _model_kind(args.model)
        from imadarem.runtime.registry import create_selector

        create_selector(args.selector)  # an unknown selector: one line before minutes of exports
        self.causal = kind == "causal"
        self.block = kind == "block"
        if self.block:  # a block refine file (the bundled refine model): bench/block.py
            from imadarem.bench.block import BlockBench

            for p in args.providers:
                if p not in ("cpu", "cuda"):
                    raise ImadaremError(f"unknown provider {p!r} (choose from: cpu, cuda)")
            if args.reference:
                raise ImadaremError("--reference times another causal model file beside a causal model; this model "
                                    "is a block refine model")
            self.threads = args.threads or os.cpu_count() or 1
            self.block_bench = BlockBench(args, self.threads)  # checks the engine names
            return
        if not self.causal:
            unknown = sorted(set(args.engines or ()) - set(ENGINES))
            if unknown:
                raise ImadaremError(f"unknown engine {unknown[0]!r} (choose from: {', '.join(ENGINES)})")
        if any(b < 1 for b in args.batch_sizes) or args.repeats < 1:
            raise ImadaremError("batch sizes and --repeats must be >= 1")
        for p in args.providers:
            if p not in ("cpu", "cuda"):
                raise ImadaremError(f"unknown provider {p!r} (choose from: cpu, cuda)")
            if p == "cuda" and not torch.cuda.is_available():
                raise ImadaremError("provider 'cuda' asked for, but PyTorch sees no CUDA device")
        self.threads = args.threads or os.cpu_count() or 1
        torch.set_num_threads(self.threads)
        if args.reference:
            if not self.causal:
                raise ImadaremError("--reference times another causal model file beside a causal model; this model "
                                    "is a refinement model")
            from imadarem.runtime.formats import open_model
            from imadarem.runtime.models import resolve_model

            args.reference = str(resolve_model(args.reference))
            open_model(args.reference)  # a file that is no model file: one line now, not after the other rows
        if self.causal:
            from imadarem.bench.causal import CausalBench

            args.model = str(args.model or _default_model())
            self.causal_bench = CausalBench(args, self.threads)  # checks the engine names
        elif args.engines is None:
            args.engines = ENGINES
        self.out_dir = Path(args.out_dir)
        self.notes: list[str] = []
        self._generators: dict[tuple[str, str], Generator] = {}  # one session per model variant and provider
        self._tokens: dict[tuple, np.ndarray | None] = {}  # first run's tokens per row, for identity checks

    # -- the model in every form ------------------------------------------------------------------
    def prepare(self, work: Path) -> None:
        from imadarem.export.onnx_export import add_sampling_head, convert_fp16, export_model, quantize_int8

        a = self.args
        files: dict[str, Path] = {}
        if a.checkpoint:
            from imadarem.training.checkpoint import build_model, load_checkpoint

            ckpt = load_checkpoint(a.checkpoint)
            model = build_model(ckpt, "ema").eval()
            self.source = f"checkpoint {ckpt.path} (step {ckpt.step}, EMA weights)"
            files["fp32"] = export_model(model, work / "fp32.onnx", {"variant": "fp32", "source": str(ckpt.path)},
                                         device_state="cuda" in a.providers)
        else:
            from imadarem.export.onnx_import import model_from_onnx
            from imadarem.runtime.models import resolve_model

            path = resolve_model(a.model)
            if path is None:
                raise ImadaremError("no --model or --checkpoint given and there is no bundled model")
            model, report = model_from_onnx(path)
            self.source = f"model file {path}" + (" (int8; PyTorch and fp32 rows use its dequantised weights)"
                                                 if report.quantized else "")
            if report.quantized:
                files["int8"] = path
                files["fp32"] = export_model(model, work / "fp32.onnx", {"variant": "fp32", "rebuilt_from": str(path)},
                                             device_state="cuda" in a.providers)
            else:
                files["fp32"] = path
        if "int8" not in files and "ort-int8" in a.engines:
            files["int8"] = quantize_int8(files["fp32"], work / "int8.onnx")
        if "cuda" in a.providers and {"ort-fp16", "ort-fp16-head"} & set(a.engines):
            files["fp16"] = convert_fp16(files["fp32"], work / "fp16.onnx")
        for variant in ("fp32", "fp16"):
            if f"ort-{variant}-head" in a.engines and variant in files:
                files[f"{variant}-head"] = add_sampling_head(files[variant], work / f"{variant}-head.onnx", model)
        self.model, self.files = model, files
        self.config = model.config
        self.steps = a.steps or self.config.max_refinement_steps

    # -- one engine at one batch size -------------------------------------------------------------
    def _runner(self, engine: str, provider: str, batch: int) -> Callable[[LoopTimings, int], dict] | None:
        a = self.args
        device = torch.device("cuda" if provider == "cuda" else "cpu")
        if engine.startswith("ort-"):
            gen = self._generator(engine[4:], provider)

            def run(tm: LoopTimings, seed: int) -> dict:
                samples = gen.generate(batch, selector=a.selector, steps=self.steps, seed=seed, batch_size=batch,
                                       timings=tm, decode=False)  # ids, as the PyTorch loop returns
                return {"steps": np.array([s.steps for s in samples]), "edits": [s.edits for s in samples],
                        "early": np.array([s.early_stop for s in samples]), "tokens": _pad_ids(samples, self.config)}
            return run
        if engine in ("torch", "torch-bf16"):
            from imadarem.training.reference import torch_refine

            if a.selector not in ("gate", "entropy"):
                return None
            model = self.model.to(device)
            noise = "torch" if provider == "cuda" else "numpy"

            def run(tm: LoopTimings, seed: int) -> dict:
                tokens, stats = torch_refine(model, batch, steps=self.steps, seed=seed, selector=a.selector,
                                             return_stats=True, timings=tm, noise=noise,
                                             autocast="bf16" if engine == "torch-bf16" else None)
                return {"steps": stats["steps"], "edits": stats["edits"], "early": stats["early"], "tokens": tokens}
            return run
        from imadarem.bench.baselines import AutoregressiveBaseline, NonAutoregressiveBaseline

        sp = self.model.special
        base = (NonAutoregressiveBaseline(self.config, sp.mask, self.steps, device) if engine == "xt-nar"
                else AutoregressiveBaseline(self.config, sp.eos if sp.eos is not None else sp.mask, device))
        self.notes.append(f"{engine}: {base.parameters():,} parameters (ours: {self.model.num_parameters():,})")
        per_run = self.steps if engine == "xt-nar" else self.config.max_seq_len - 1

        def run(tm: LoopTimings, seed: int) -> dict:
            torch.manual_seed(seed)
            base.generate(batch, tm)
            return {"steps": np.full(batch, per_run)}
        return run

    def _generator(self, variant: str, provider: str) -> Generator:
        key = (variant, provider)
        if key not in self._generators:
            self._generators[key] = Generator(self.files[variant], provider=provider, threads=self.threads)
        return self._generators[key]

    def measure(self, engine: str, provider: str, batch: int) -> Row | None:
        run = self._runner(engine, provider, batch)
        if run is None:
            return None
        run(LoopTimings(), self.args.seed + 10_000)  # warm-up: allocations, kernel selection, caches
        runs = []
        for r in range(self.args.repeats):
            tm = LoopTimings()
            stats = run(tm, self.args.seed + r)
            runs.append((tm, stats))
        row = _summarise(engine, provider, batch, runs, self.config)
        self._tokens[(engine, provider, batch)] = runs[0][1].get("tokens")
        return row

    # -- all of it --------------------------------------------------------------------------------
    def run(self, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
        a = self.args
        if self.causal:  # e.g. the bundled model: bench/causal.py
            return self.causal_bench.run(progress)
        if self.block:  # e.g. the bundled refine model: bench/block.py
            return self.block_bench.run(progress)
        from imadarem.export.onnx_export import _quiet_exporters

        with tempfile.TemporaryDirectory() as tmp:
            with _quiet_exporters():  # torch.onnx's per-op notes are not the reader's business
                self.prepare(Path(tmp))
            rows: list[Row] = []
            for provider in a.providers:
                for batch in a.batch_sizes:
                    for engine in a.engines:
                        if (engine in CUDA_ONLY and provider != "cuda") or (engine in CPU_ONLY and provider != "cpu"):
                            continue
                        if engine.startswith("ort-") and engine[4:] not in self.files:
                            continue
                        progress(f"{provider} batch {batch}: {engine}")
                        row = self.measure(engine, provider, batch)
                        if row is not None:
                            rows.append(row)
                    self._ratios(rows, provider, batch)
            agreement = self._agreement()
        result = {"machine": _machine(self.threads), "source": self.source, "steps": self.steps,
                  "selector": a.selector, "max_seq_len": self.config.max_seq_len,
                  "parameters": self.model.num_parameters(), "repeats": a.repeats, "agreement": agreement,
                  "notes": sorted(set(self.notes)), "rows": [asdict(r) for r in rows]}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.out_dir / "bench.json", json.dumps(result, indent=2))
        write_text(self.out_dir / "bench.md", markdown(result))
        return result

    def _ratios(self, rows: list[Row], provider: str, batch: int) -> None:
        here = [r for r in rows if r.provider == provider and r.batch == batch]
        ref = next((r for r in here if r.engine == "torch"), None)
        for r in here:
            if ref is not None:
                r.speedup_vs_torch = ref.wall_s / r.wall_s
            if r.engine == "torch" and provider == "cpu":  # on CUDA the PyTorch loop draws its own noise
                ort = self._tokens.get(("ort-fp32", provider, batch))
                mine = self._tokens.get(("torch", provider, batch))
                if ort is not None and mine is not None:
                    r.notes.append(f"tokens identical to ort-fp32: {float(np.mean((ort == mine).all(-1))):.3f}")

    def _agreement(self) -> dict[str, float]:
        """Greedy decoding of each variant against fp32 on the CPU: token and sequence agreement."""
        out: dict[str, float] = {}
        n = self.args.agreement_n
        if n < 1 or "fp32" not in self.files:
            return out
        want = self._greedy("fp32", n)
        for variant in ("int8", "fp16"):
            if variant in self.files:
                provider = "cuda" if variant == "fp16" else "cpu"
                got = self._greedy(variant, n, provider)
                out[f"{variant}_token_agreement"] = float(np.mean(got == want))
                out[f"{variant}_sequence_agreement"] = float(np.mean((got == want).all(-1)))
        return out

    def _greedy(self, variant: str, n: int, provider: str = "cpu") -> np.ndarray:
        samples = self._generator(variant, provider).generate(n, selector=self.args.selector, steps=self.steps,
                                                              temperature=0.0, seed=0)
        return _pad_ids(samples, self.config)


def _pad_ids(samples, config) -> np.ndarray:
    pad = 0
    out = np.full((len(samples), config.max_seq_len), pad, dtype=np.int64)
    for i, s in enumerate(samples):
        out[i, : len(s.ids)] = s.ids
    return out


def _default_model() -> Path:
    from imadarem.runtime.models import resolve_model

    return resolve_model(None)


def _model_kind(model: str | None) -> str:
    """The format of the file benched (the bundled default's when none is given): each has its bench."""
    from imadarem.runtime.formats import open_model

    opened = open_model(model)
    kind = opened.format_name
    if kind == "refine":
        from imadarem.runtime.formats.refine import decode_block

        return "block" if decode_block(opened.config) else kind
    if kind == "decode":
        raise ImadaremError(f"{model} is a decode file: bench the step file it was exported from (the decode "
                            "files are built from it)")
    return kind


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["# imadarem bench", "", machine_line(m),
             f"- model: {result['source']}; {result['parameters']:,} parameters, length {result['max_seq_len']}, "
             f"{result['steps']} steps, selector `{result['selector']}`, median of {result['repeats']} runs",
             ]
    for key, value in result["agreement"].items():
        lines.append(f"- {key.replace('_', ' ')} with fp32 (greedy): {value:.4f}")
    for note in result["notes"]:
        lines.append(f"- {note}")
    lines += ["", "| provider | batch | engine | seq/s | × torch eager | step p50 ms | step p95 ms | steps used "
              "| edits/step | early stop | outside model call | model TFLOP/s |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['provider']} | {r['batch']} | {r['engine']} | {_fmt(r['seq_per_s'], '.1f')} | "
                     f"{_fmt(r['speedup_vs_torch'], '.2f')} | {_fmt(r['step_p50_ms'], '.2f')} | "
                     f"{_fmt(r['step_p95_ms'], '.2f')} | {_fmt(r['steps_used'], '.1f')} | "
                     f"{_fmt(r['edits_per_step'], '.1f')} | {_fmt(r['early_stop'], '.2f')} | "
                     f"{_fmt(None if r['outside_run'] is None else 100 * r['outside_run'], '.1f')}% | "
                     f"{_fmt(r['model_tflops'], '.3g')} |")
    notes = [f"- {r['engine']} ({r['provider']}, batch {r['batch']}): {n}" for r in result["rows"] for n in r["notes"]]
    return "\n".join(lines + ([""] + notes if notes else []) + [""])

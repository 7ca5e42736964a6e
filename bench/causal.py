"""``imadarem bench`` of a causal model file (format 2; the bundled model): the refinement loop against the
left-to-right decoder of the same model, on the same engine, side by side in one process.

Every file is built here from the one model (an int8 file is dequantised first), so both sides have the
same weights and the same engineering:

- ``ort-loop-<p>``: the refinement loop (``Generator``, ``--selector``, default gate: draft-and-verify) over
  the step file, sampling and verification in numpy; ``ort-l2r-<p>``: the left-to-right decoder (one token
  per call) over the same model's step file without draft heads (the baseline);
- ``ort-decode-<p>``: the decode file (``export/decode_export.py``): draft-and-verify with every step inside
  one graph; ``ort-decode-l2r-<p>``: the decode file of the left-to-right decoder (the baseline). On CUDA
  they run with IO binding and CUDA graphs; ``-nograph`` the same without CUDA graphs;
- ``ort-gqa-l2r-<p>`` (fp32, int8; CPU): the left-to-right decode file with onnxruntime's GroupQueryAttention
  (``export_decode(attention="gqa")``), beside ``ort-decode-l2r-<p>``, its baseline: the same molecules;
- ``torch-decode-<p>`` / ``torch-decode-l2r-<p>``: the same fused step in PyTorch eager
  (``training/reference.py: TorchDecode``), caches written in place: the PyTorch loop;
- ``ctranslate2-<p>`` (int8, fp32; only with ``--engines``): the trunk converted for CTranslate2 and
  sampled by its own loop, beside ``ort-decode-l2r-<p>`` (``bench/ct2.py`` says how and why).

Every engine but CTranslate2, the PyTorch one included, is driven by the runtime's one Generator loop.

``<p>`` is the precision: int8 and int4 (weight-only ``MatMulNBits``) on the CPU, fp16 on CUDA, fp32 on both.
For the same seed all of them but CTranslate2 (its own RNG) give the same molecules, up to the rounding of
their precision (every exact token is drawn with its sample's counter noise): each row reports how many of
its molecules are its baseline's, and with ``--samples N`` writes N SMILES per row and scores them (FCD/Test with MOSES's
reference statistics, when the ``eval`` and ``fcd`` extras are installed; else ``imadarem eval molecules
--samples FILE`` scores them later).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.files import write_text
from imadarem.runtime.results import LoopTimings

#: a timed run generates at least this many molecules (in batches of the row's batch size)
MIN_MOLECULES = 32
#: ... and at least this many batches' worth: a stream of requests, as a user generating a library runs it,
#: so that in-flight batching (a finished row takes the next molecule) shows, and only the run's last
#: molecules wait for a batch's longest one (model_calls within ~5% of calls_per_molecule)
BATCHES_PER_RUN = 16
#: the row of ``--reference FILE`` (another model file, e.g. the previous bundled model, run as it is)
REFERENCE = "reference"
FAMILIES = ("ort-loop", "ort-l2r", "ort-decode", "ort-decode-l2r", "ort-gqa-l2r", "torch-decode", "torch-decode-l2r",
            "torch-compile", "torch-compile-l2r", "ctranslate2")
#: int8 is static (calibrated) quantisation, as `imadarem export --dtype int8` writes; int8dyn the dynamic
#: quantisation files had before (not batch-invariant), for comparison
PRECISIONS = {"cpu": ("int8", "fp32", "int4", "int8dyn"), "cuda": ("fp16", "fp32")}
DEFAULT_ENGINES = {
    "cpu": ("ort-loop-int8", "ort-l2r-int8", "ort-decode-int8", "ort-decode-l2r-int8", "ort-loop-fp32", "ort-l2r-fp32",
            "ort-decode-fp32", "ort-decode-l2r-fp32", "ort-decode-int4", "ort-decode-l2r-int4", "torch-decode-fp32",
            "torch-decode-l2r-fp32"),
    "cuda": ("ort-decode-fp16", "ort-decode-l2r-fp16", "ort-decode-fp16-nograph", "ort-decode-l2r-fp16-nograph",
             "torch-decode-fp16", "torch-decode-l2r-fp16", "torch-decode-fp32", "torch-decode-l2r-fp32"),
}


@dataclass(frozen=True)
class Engine:
    family: str
    precision: str
    graphs: bool = True  # CUDA graphs (decode files on CUDA)

    @classmethod
    def parse(cls, name: str) -> Engine:
        graphs = not name.endswith("-nograph")
        base = name[: -len("-nograph")] if not graphs else name
        family, _, precision = base.rpartition("-")
        if family not in FAMILIES or precision not in {"int8", "int8dyn", "int4", "fp32", "fp16"}:
            raise ImadaremError(f"unknown engine {name!r} for a causal model (families: {', '.join(FAMILIES)}; "
                                "precisions: int8, int8dyn, int4, fp32 on cpu, fp16, fp32 on cuda; -nograph on decode "
                                "rows)")
        if not graphs and family not in ("ort-decode", "ort-decode-l2r"):
            raise ImadaremError(f"unknown engine {name!r}: only decode rows run with and without CUDA graphs")
        if family.startswith("torch") and precision in ("int8", "int8dyn", "int4"):
            raise ImadaremError(f"unknown engine {name!r}: the PyTorch loop runs fp32 or fp16")
        if family == "ctranslate2" and precision not in ("int8", "fp32"):
            raise ImadaremError(f"unknown engine {name!r}: the CTranslate2 rows run int8 or fp32 on the cpu")
        if family == "ort-gqa-l2r" and precision not in ("int8", "fp32"):
            raise ImadaremError(f"unknown engine {name!r}: the GroupQueryAttention rows run int8 or fp32 on the cpu")
        return cls(family, precision, graphs)

    @property
    def name(self) -> str:
        return f"{self.family}-{self.precision}" + ("" if self.graphs else "-nograph")

    @property
    def left_to_right(self) -> bool:
        return self.family in ("ort-l2r", "ort-decode-l2r", "ort-gqa-l2r", "torch-decode-l2r", "torch-compile-l2r",
                               "ctranslate2")

    @property
    def coupled(self) -> bool:
        """Whether every token is drawn with our per-sample counter noise, so that the same seed gives the
        baseline's molecules (CTranslate2 samples with its own RNG)."""
        return self.family != "ctranslate2"

    @property
    def baseline(self) -> Engine:
        """The left-to-right row this row is measured against (itself for one of ours; CTranslate2's,
        one token per call with a KV cache, is our one-token decode file's)."""
        pair = {"ort-loop": "ort-l2r", "ort-decode": "ort-decode-l2r", "torch-decode": "torch-decode-l2r",
                "torch-compile": "torch-compile-l2r", "ctranslate2": "ort-decode-l2r", "ort-gqa-l2r": "ort-decode-l2r"}
        return Engine(pair.get(self.family, self.family), self.precision, self.graphs)

    def runs_on(self, provider: str) -> bool:
        if self.precision not in PRECISIONS[provider]:
            return False
        if provider != "cpu" and self.family in ("ctranslate2", "ort-gqa-l2r"):
            return False
        if provider == "cuda" and self.family in ("ort-loop", "ort-l2r"):
            return False  # the host loops copy the KV cache every call: no GPU rows
        return self.graphs or provider == "cuda"


@dataclass
class CausalRow:
    engine: str
    provider: str
    batch: int
    wall_s: float  # median over repeats of one run (BATCHES_PER_RUN batches, at least MIN_MOLECULES molecules)
    seq_per_s: float
    step_p50_ms: float
    step_p95_ms: float
    model_calls: float  # sequential model calls of a run / (molecules / batch) (mean over repeats)
    calls_per_molecule: float
    outside_run: float | None  # share of the wall time outside the model call
    repeats: int
    vs_baseline: float | None = None  # seq/s over this row's left-to-right baseline's, same provider and batch
    vs_torch: float | None = None  # seq/s over the fastest PyTorch eager loop of the same kind
    identical_to_baseline: float | None = None  # share of molecules equal to the baseline's (same seeds)
    quality: dict[str, Any] = field(default_factory=dict)  # with --samples: n, file, valid, FCD/Test ...
    notes: list[str] = field(default_factory=list)


class CausalBench:
    def __init__(self, args, threads: int):
        self.args, self.threads = args, threads
        self.engines: dict[str, list[Engine]] = {}
        for provider in args.providers:
            names = DEFAULT_ENGINES[provider] if args.engines is None else args.engines
            engines = [Engine.parse(n) for n in names]
            self.engines[provider] = [e for e in engines if e.runs_on(provider)]
        if args.engines is not None and not any(self.engines.values()):  # each one skipped: an empty table
            name = args.engines[0]
            where = [p for p in PRECISIONS if Engine.parse(name).runs_on(p)]
            raise ImadaremError(f"no engine of --engines runs on --providers {','.join(args.providers)}: "
                                f"{name!r} runs on {' and '.join(where) or 'no provider'}")
        if self._ctranslate2:
            from imadarem.bench import ct2

            ct2.require()  # one line now, not after minutes of exports
        self._generators: dict[tuple[str, str, str], Any] = {}
        self._ids: dict[tuple[str, str, int], np.ndarray] = {}
        self.files: dict[str, Path] = {}

    @property
    def _ctranslate2(self) -> bool:
        return any(e.family == "ctranslate2" for engines in self.engines.values() for e in engines)

    # -- the model in every form ------------------------------------------------------------------
    def prepare(self, work: Path, progress: Callable[[str], None]) -> None:
        from imadarem.export.onnx_import import causal_from_onnx

        self.model, report = causal_from_onnx(self.args.model)
        self.source = f"model file {self.args.model}" + (" (int8; the other files are built from its dequantised "
                                                         "weights)" if report.quantized else "")
        self.quantized = report.quantized
        # the engine that runs the model file as it is (an int8 file is its own ort-loop-int8 row)
        self.shipped = "ort-loop-int8" if report.quantized else "ort-loop-fp32"
        self.trunk = self.model.without_drafts()
        needed = {(e.family, e.precision) for engines in self.engines.values() for e in engines}
        for family, precision in sorted(needed):
            if family.startswith("torch"):
                continue
            key = f"{family}-{precision}"
            progress(f"building {key}")
            if family == "ctranslate2":
                from imadarem.bench import ct2

                self.files[key] = ct2.convert(self.trunk, precision, work)
            else:
                self.files[key] = self._build(family, precision, work)

    def _build(self, family: str, precision: str, work: Path) -> Path:
        from imadarem.export.onnx_export import _quiet_exporters

        with _quiet_exporters():  # the quantisers' per-node INFO lines are not the reader's business
            return self._export(family, precision, work)

    def _export(self, family: str, precision: str, work: Path) -> Path:
        from imadarem.export.causal_export import calibration_feeds, export_causal
        from imadarem.export.decode_export import export_decode
        from imadarem.export.onnx_export import quantize_int4, quantize_int8, quantize_int8_static

        out = work / f"{family}-{precision}.onnx"
        if family in ("ort-loop", "ort-l2r"):
            model = self.model if family == "ort-loop" else self.trunk
            if family == "ort-loop" and precision == "int8" and self.quantized:
                return Path(self.args.model)  # the shipped file itself
            fp32 = work / f"{family}-fp32.onnx"
            if not fp32.is_file():
                export_causal(model, fp32, {"variant": "fp32", "bench": family})
            if precision == "fp32":
                return fp32
            if precision == "int8":
                return quantize_int8_static(fp32, out, calibration_feeds(fp32))
            return (quantize_int8 if precision == "int8dyn" else quantize_int4)(fp32, out)
        drafts = 0 if family in ("ort-decode-l2r", "ort-gqa-l2r") else None
        attention = "gqa" if family == "ort-gqa-l2r" else "matmul"
        if precision in ("fp32", "fp16", "int8", "int8dyn"):
            return export_decode(self.model, out, drafts, precision, {"bench": family}, attention)
        fp32 = work / f"{family}-fp32.onnx"
        if not fp32.is_file():
            export_decode(self.model, fp32, drafts, "fp32", {"bench": family}, attention)
        return quantize_int4(fp32, out)

    # -- one engine at one batch size -------------------------------------------------------------
    def _runner(self, engine: Engine, provider: str, batch: int) -> Callable[[LoopTimings, int, int], tuple]:
        """Every engine runs through the runtime's one Generator: the onnxruntime files as they are, the
        PyTorch loop as a strategy (``training/reference.py: TorchDecode``). Each returns ids arrays and
        calls per molecule, before any Sample is built."""
        gen = self._generator(engine, provider)
        if engine.family == "ctranslate2":
            from imadarem.bench import ct2

            return ct2.sampler(gen, self.model, batch)
        options = {"selector": self.args.selector} if engine.family == "ort-loop" else {}

        def run(tm: LoopTimings, seed: int, n: int) -> tuple:
            parts = list(gen.iter_results(n, seed=seed, batch_size=batch, timings=tm, **options))
            return np.concatenate([p.ids for p in parts]), np.concatenate([p.steps for p in parts])
        return run

    def _generator(self, engine: Engine, provider: str):
        from imadarem.runtime.generator import Generator

        key = (engine.family, engine.precision, provider, engine.graphs)
        if key not in self._generators:
            if engine.family.startswith("torch"):
                from imadarem.training.reference import TorchDecode

                dtype = torch.float16 if engine.precision == "fp16" else torch.float32
                model = _copy_to(self.model, torch.device(provider), dtype)
                mode = self.args.torch_compile_mode if engine.family.startswith("torch-compile") else None
                gen = Generator(TorchDecode(model, 0 if engine.left_to_right else None, compile_mode=mode))
            elif engine.family == "ctranslate2":
                from imadarem.bench import ct2

                gen = ct2.load(self.files[engine.name], engine.precision, self.threads)
            else:
                gen = Generator(self.files[f"{engine.family}-{engine.precision}"], provider=provider,
                                threads=self.threads)
                gen.model.cuda_graphs = engine.graphs  # decode files on CUDA (-nograph: kernels one by one)
            self._generators[key] = gen
        return self._generators[key]

    def _reference_runner(self, provider: str, batch: int) -> Callable[[LoopTimings, int, int], tuple]:
        """``--reference FILE`` as a user runs it (its own format and precision, the bench's selector)."""
        from imadarem.runtime.generator import Generator

        key = (REFERENCE, "", provider, False)
        if key not in self._generators:
            self._generators[key] = Generator(self.args.reference, provider=provider, threads=self.threads)
        gen = self._generators[key]

        def run(tm: LoopTimings, seed: int, n: int) -> tuple:
            parts = list(gen.iter_results(n, seed=seed, batch_size=batch, timings=tm, selector=self.args.selector))
            return np.concatenate([p.ids for p in parts]), np.concatenate([p.steps for p in parts])
        return run

    def measure(self, engine: Engine | None, provider: str, batch: int) -> CausalRow:
        """Warm-up, then ``repeats`` timed runs of ``BATCHES_PER_RUN`` batches of ``batch`` molecules (at
        least ``MIN_MOLECULES``, so a batch-1 row averages over many molecules' lengths). ``engine`` None:
        the ``--reference`` file."""
        run = self._runner(engine, provider, batch) if engine is not None else self._reference_runner(provider, batch)
        name = engine.name if engine is not None else REFERENCE
        n = batch * max(BATCHES_PER_RUN, -(-MIN_MOLECULES // batch))
        ours = engine is None or engine.coupled  # our loop: ids comparable token for token, calls timed
        run(LoopTimings(), self.args.seed + 10_000, batch)  # warm-up: sessions, CUDA graph capture, caches
        runs = []
        for r in range(self.args.repeats):
            tm = LoopTimings()
            ids, calls = run(tm, self.args.seed + r, n)
            runs.append((tm, calls))
            if r == 0 and ours:
                self._ids[(name, provider, batch)] = ids
        walls = [t.total_seconds for t, _ in runs]
        steps = np.concatenate([t.step_seconds for t, _ in runs]) * 1e3
        wall = float(np.median(walls))
        row = CausalRow(name, provider, batch, wall, n / wall, float(np.percentile(steps, 50)),
                        float(np.percentile(steps, 95)),
                        float(np.mean([len(t.step_seconds) for t, _ in runs])) * batch / n,
                        float(np.mean(np.concatenate([c for _, c in runs]))),
                        float(np.median([t.outside_run_fraction() for t, _ in runs])) if ours else None,
                        len(runs))
        if not ours:
            from imadarem.bench import ct2

            row.notes += ct2.notes(self.model, engine.precision, self.threads)
        return row

    # -- all of it --------------------------------------------------------------------------------
    def run(self, progress: Callable[[str], None]) -> dict[str, Any]:
        a = self.args
        rows: list[CausalRow] = []
        with tempfile.TemporaryDirectory() as tmp:
            self.prepare(Path(tmp), progress)
            for provider in a.providers:
                for batch in a.batch_sizes:
                    for engine in self.engines[provider]:
                        progress(f"{provider} batch {batch}: {engine.name}")
                        rows.append(self.measure(engine, provider, batch))
                    if a.reference:
                        progress(f"{provider} batch {batch}: {REFERENCE} ({a.reference})")
                        rows.append(self.measure(None, provider, batch))
                    _compare(rows, provider, batch, self._ids)
                if a.samples:
                    self._quality(rows, provider, progress)
        c = self.model.config
        result = {"machine": _machine_info(self.threads), "source": self.source, "selector": a.selector,
                  "max_seq_len": c.max_seq_len, "drafts": c.num_drafts, "parameters": self.model.num_parameters(),
                  "repeats": a.repeats, "seed": a.seed, "rows": [asdict(r) for r in rows],
                  "summary": summary(rows, self.shipped)}
        if a.reference:
            result["reference"] = {"file": str(a.reference), "bytes": Path(a.reference).stat().st_size,
                                   "compared": self.shipped}
        if any(e.family.startswith("torch-compile") for engines in self.engines.values() for e in engines):
            result["torch_compile"] = {"mode": a.torch_compile_mode, "backend": "inductor", "dynamic": False,
                                       "torch": torch.__version__}
        if self._ctranslate2:
            from imadarem.bench import ct2

            result["ctranslate2"] = ct2.settings(self.model, self.threads)
        return write_result(a.out_dir, result, markdown(result))

    def _quality(self, rows: list[CausalRow], provider: str, progress: Callable[[str], None]) -> None:
        """N molecules per engine (seed ``--seed``, batches of the largest batch size), written as SMILES,
        compared with the baseline's and, when the evaluation extras are installed, scored."""
        a = self.args
        n, batch = a.samples, max(a.batch_sizes)
        out = Path(a.out_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        scorer = _scorer()
        ids: dict[str, np.ndarray] = {}
        for engine in self.engines[provider]:
            progress(f"{provider}: {n} molecules from {engine.name}")
            got, _ = self._runner(engine, provider, batch)(LoopTimings(), a.seed, n)
            ids[engine.name] = got
            quality = sample_quality(self.model, got, out / f"{provider}-{engine.name}.smi", a.out_dir, scorer)
            for row in rows:
                if row.engine == engine.name and row.provider == provider:
                    row.quality = dict(quality)
        for row in rows:
            if row.provider == provider and row.engine in ids and Engine.parse(row.engine).coupled:
                base = ids.get(Engine.parse(row.engine).baseline.name)
                if base is not None:
                    row.quality["identical_to_baseline"] = float(np.mean((ids[row.engine] == base).all(-1)))


def write_result(out_dir: str, result: dict[str, Any], md: str) -> dict[str, Any]:
    """``bench.json`` and ``bench.md`` under ``out_dir`` (made if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "bench.json", json.dumps(result, indent=2))
    write_text(out / "bench.md", md)
    return result


def sample_quality(model, ids: np.ndarray, path: Path, out_dir: str, scorer) -> dict[str, Any]:
    """Write one row's molecules as SMILES to ``path`` and score them (``scorer`` None: unscored)."""
    smiles = [model.tokenizer.decode(_trim(row, model.special)) for row in ids]
    write_text(path, "\n".join(smiles) + "\n")
    quality: dict[str, Any] = {"n": len(smiles), "file": str(path.relative_to(out_dir))}
    if scorer is not None:
        quality.update(scorer(smiles))
    return quality


def _compare(rows: list[CausalRow], provider: str, batch: int, ids: dict) -> None:
    here = {r.engine: r for r in rows if r.provider == provider and r.batch == batch and r.engine != REFERENCE}
    torch_best: dict[bool, float] = {}
    for r in here.values():
        e = Engine.parse(r.engine)
        if e.family.startswith("torch-decode"):  # the eager loop
            torch_best[e.left_to_right] = max(torch_best.get(e.left_to_right, 0.0), r.seq_per_s)
    for r in here.values():
        e = Engine.parse(r.engine)
        base = here.get(e.baseline.name)
        if base is not None:
            r.vs_baseline = r.seq_per_s / base.seq_per_s
            mine, theirs = ids.get((r.engine, provider, batch)), ids.get((base.engine, provider, batch))
            if mine is not None and theirs is not None:
                r.identical_to_baseline = float(np.mean((mine == theirs).all(-1)))
        if e.left_to_right in torch_best:
            r.vs_torch = r.seq_per_s / torch_best[e.left_to_right]


def summary(rows: list[CausalRow], shipped: str | None = None) -> list[dict[str, Any]]:
    """Per provider and batch: the fastest refinement row against the fastest left-to-right row, and the
    fastest onnxruntime refinement row against the fastest PyTorch one; with a ``--reference`` row, the
    ``shipped`` engine (the model file as it is run) and the fastest refinement row against it."""
    out = []
    for provider, batch in dict.fromkeys((r.provider, r.batch) for r in rows):
        here = [r for r in rows if r.provider == provider and r.batch == batch and r.engine != REFERENCE]
        reference = next((r for r in rows if r.provider == provider and r.batch == batch and r.engine == REFERENCE),
                         None)

        def best(pick, here=here):
            chosen = [r for r in here if pick(Engine.parse(r.engine))]
            return max(chosen, key=lambda r: r.seq_per_s) if chosen else None

        refine = best(lambda e: not e.left_to_right and e.family.startswith("ort"))
        l2r = best(lambda e: e.left_to_right and e.family.startswith("ort"))
        torch_refine = best(lambda e: not e.left_to_right and e.family.startswith("torch-decode"))
        compiled = best(lambda e: not e.left_to_right and e.family.startswith("torch-compile"))
        ctranslate2 = best(lambda e: e.family == "ctranslate2")
        ours = best(lambda e: e.coupled and e.family.startswith("ort"))  # our fastest row, either decoding
        item = {"provider": provider, "batch": batch}
        if refine and compiled:  # the same draft-and-verify algorithm under torch.compile (issue #26)
            item.update(torch_compile=compiled.engine, vs_torch_compile=refine.seq_per_s / compiled.seq_per_s)
        if ours and ctranslate2:  # CTranslate2's one-token decoder of the same trunk (issue #26: our best row)
            item.update(ctranslate2=ctranslate2.engine, ours=ours.engine,
                        vs_ctranslate2=ours.seq_per_s / ctranslate2.seq_per_s)
        if refine and l2r:
            item.update(refinement=refine.engine, baseline=l2r.engine, vs_baseline=refine.seq_per_s / l2r.seq_per_s)
        if refine and torch_refine:
            item.update(torch=torch_refine.engine, vs_torch=refine.seq_per_s / torch_refine.seq_per_s)
        if reference is not None:
            as_shipped = next((r for r in here if r.engine == shipped), None)
            item.update(reference_mol_s=reference.seq_per_s,
                        best_vs_reference=refine.seq_per_s / reference.seq_per_s if refine else None,
                        shipped=shipped if as_shipped else None,
                        shipped_vs_reference=as_shipped.seq_per_s / reference.seq_per_s if as_shipped else None)
        out.append(item)
    return out


def _scorer():
    """MOSES metrics and FCD/Test of a list of SMILES, or None without the evaluation extras."""
    import importlib.util

    if importlib.util.find_spec("rdkit") is None or importlib.util.find_spec("fcd") is None:
        return None
    from imadarem.training.evaluation.molecules import score_smiles

    return score_smiles


def _copy_to(model, device: torch.device, dtype: torch.dtype):
    import copy

    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def _trim(row: np.ndarray, special) -> list[int]:
    ids = row.tolist()
    if special.eos is not None and special.eos in ids:
        return ids[: ids.index(special.eos) + 1]
    while ids and ids[-1] == special.pad:
        ids.pop()
    return ids


def _machine_info(threads: int) -> dict[str, Any]:
    from imadarem.bench.report import _machine

    return _machine(threads)


def markdown(result: dict[str, Any]) -> str:
    from imadarem.bench.report import _fmt, machine_line

    lines = ["# imadarem bench (causal model)", "", machine_line(result["machine"]),
             f"- model: {result['source']}; {result['parameters']:,} parameters, {result['drafts']} draft heads, "
             f"length {result['max_seq_len']}, selector `{result['selector']}`, median of {result['repeats']} runs",
             "", "| provider | batch | engine | molecules/s | × baseline | × torch eager | calls per batch "
             "| calls per molecule | step p50 ms | step p95 ms | outside model call | same molecules as baseline "
             "| FCD/Test |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        q = r.get("quality") or {}
        lines.append(f"| {r['provider']} | {r['batch']} | {r['engine']} | {_fmt(r['seq_per_s'], '.1f')} | "
                     f"{_fmt(r['vs_baseline'], '.2f')} | {_fmt(r['vs_torch'], '.2f')} | {_fmt(r['model_calls'], '.1f')} | "
                     f"{_fmt(r['calls_per_molecule'], '.1f')} | {_fmt(r['step_p50_ms'], '.3f')} | "
                     f"{_fmt(r['step_p95_ms'], '.3f')} | "
                     f"{'–' if r['outside_run'] is None else _fmt(100 * r['outside_run'], '.1f') + '%'} | "
                     f"{_fmt(r['identical_to_baseline'], '.3f')} | {_fmt(q.get('fcd'), '.3f')} |")
    if result.get("summary"):
        lines += ["", "| provider | batch | refinement | baseline | × baseline | PyTorch loop | × PyTorch | "
                      "torch.compile | × torch.compile | CTranslate2 | our best row | × CTranslate2 |",
                  "|---|---:|---|---|---:|---|---:|---|---:|---|---|---:|"]
        for s in result["summary"]:
            lines.append(f"| {s['provider']} | {s['batch']} | {s.get('refinement', '–')} | {s.get('baseline', '–')} | "
                         f"{_fmt(s.get('vs_baseline'), '.2f')} | {s.get('torch', '–')} | {_fmt(s.get('vs_torch'), '.2f')} | "
                         f"{s.get('torch_compile', '–')} | {_fmt(s.get('vs_torch_compile'), '.2f')} | "
                         f"{s.get('ctranslate2', '–')} | {s.get('ours', '–')} | {_fmt(s.get('vs_ctranslate2'), '.2f')} |")
    if result.get("ctranslate2"):
        c = result["ctranslate2"]
        lines += ["", f"`ctranslate2-*` rows: CTranslate2 {c['version']} on the trunk converted through `export --to "
                      f"transformers`, {c['intra_threads']} intra threads, its own loop and RNG (sampling_topk "
                      f"{c['sampling']['sampling_topk']}, temperature {c['sampling']['sampling_temperature']:g}): "
                      "the baseline's distribution, not its molecules token for token."]
    if result.get("reference"):
        ref = result["reference"]
        lines += ["", f"Against `--reference {ref['file']}` ({ref['bytes'] / 1e6:.1f} MB), run as it is, same seeds:", "",
                  "| provider | batch | reference molecules/s | this model as shipped | × reference | fastest row × reference |",
                  "|---|---:|---:|---|---:|---:|"]
        for s in result["summary"]:
            if s.get("reference_mol_s") is not None:
                lines.append(f"| {s['provider']} | {s['batch']} | {_fmt(s['reference_mol_s'], '.1f')} | "
                             f"{s.get('shipped') or '–'} | {_fmt(s.get('shipped_vs_reference'), '.2f')} | "
                             f"{_fmt(s.get('best_vs_reference'), '.2f')} |")
    quality = [r for r in result["rows"] if r.get("quality")]
    if quality:
        lines += ["", "Quality (`--samples`): one set of molecules per engine and provider, same seed.", "",
                  "| provider | engine | n | valid | Unique@1k | FCD/Test | same molecules as baseline | SMILES |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        seen = set()
        for r in quality:
            q = r["quality"]
            if (r["provider"], r["engine"]) in seen:
                continue
            seen.add((r["provider"], r["engine"]))
            lines.append(f"| {r['provider']} | {r['engine']} | {q['n']} | {_fmt(q.get('valid'), '.4f')} | "
                         f"{_fmt(q.get('unique@1k'), '.4f')} | {_fmt(q.get('fcd'), '.3f')} | "
                         f"{_fmt(q.get('identical_to_baseline'), '.3f')} | {q['file']} |")
    return "\n".join(lines + [""])


__all__ = ["CausalBench", "CausalRow", "DEFAULT_ENGINES", "Engine", "markdown", "summary"]

"""``imadarem bench`` of a block refine file (``objective: "block"``; the bundled ``refine``): its decodings
against the same file decoded one exact token per call, side by side in one process (issue #24, point 6).

A row is a *decoding* of the one file, run by the runtime's one Generator:

- ``l2r``: one exact token per call (``drafts=0``): the model's left-to-right samples, the baseline;
- ``recommended``: what the file recommends (``imadarem.decoding``; what ``imadarem-run FILE`` does);
- ``SELECTOR`` (e.g. ``confidence``, ``gate``): that selector with its default options, committing in
  parallel inside the current block;
- ``SELECTOR+dN`` (e.g. ``gate+d3``): draft-and-verify with N drafts (formats/block_verify.py), the selector
  placing the drafts: the l2r molecules, token for token, in fewer calls and more rows. On a file with a verifier
  (formats/self_verify.py) one row a call, the selector playing no part, and the verifier's samples, which are
  not l2r's token for token (the identical share says how far they are).

Every row reports molecules/s, calls, *rows* and *positions* a molecule (the sequences a call runs, and their
rows x length: on a CPU, where a call's cost grows with its positions, they set the speed; on a GPU at small
batch, calls do; draft-and-verify packs a row's states into one sequence where it can,
``block_verify.PackedStates``), its speed over ``l2r``'s at
the same batch size, and the share of its molecules that are ``l2r``'s. With ``--samples N`` each row writes N
SMILES and scores them (FCD/Test against MOSES's reference statistics, with the ``eval`` and ``fcd`` extras).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from imadarem.bench.causal import MIN_MOLECULES, _machine_info, _scorer, sample_quality, write_result
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.results import LoopTimings

BASELINE = "l2r"
DEFAULT_ROWS = ("l2r", "recommended", "confidence", "gate+d3")


@dataclass(frozen=True)
class Decoding:
    """One row's decoding: a selector (None: the file's choice) and drafts (None: none, or the file's)."""

    name: str
    selector: str | None
    drafts: int | None

    @classmethod
    def parse(cls, name: str, selectors: list[str], block: int) -> Decoding:
        if name == BASELINE:
            return cls(name, None, 0)
        if name == "recommended":
            return cls(name, None, None)
        selector, _, drafts = name.partition("+d")
        if selector not in selectors or (drafts and not drafts.isdigit()):
            raise ImadaremError(f"unknown engine {name!r} for a block refine model (choose from: l2r, recommended, "
                                f"a selector ({', '.join(selectors)}), or SELECTOR+dN for N drafts)")
        n = int(drafts) if drafts else None
        if n is not None and n > block - 1:
            raise ImadaremError(f"engine {name!r}: this model drafts inside its blocks of {block}, at most {block - 1}")
        return cls(name, selector, n)

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.selector is not None:
            out["selector"] = self.selector
        if self.drafts is not None:
            out["drafts"] = self.drafts
        return out


@dataclass
class BlockRow:
    engine: str
    provider: str
    batch: int
    wall_s: float  # median over repeats of one run (MIN_MOLECULES molecules or one batch, whichever is more)
    seq_per_s: float
    calls_per_molecule: float
    rows_per_molecule: float  # the sequences the model ran for a molecule, summed over its calls
    positions_per_molecule: float  # their positions (rows x length): what a CPU pays for
    step_p50_ms: float
    repeats: int
    vs_baseline: float | None = None  # seq/s over l2r's, same provider and batch
    identical_to_baseline: float | None = None  # share of molecules equal to l2r's (same seeds)
    quality: dict[str, Any] = field(default_factory=dict)  # with --samples: n, file, valid, FCD/Test ...


class BlockBench:
    def __init__(self, args, threads: int):
        from imadarem.runtime.formats.refine import decode_block
        from imadarem.runtime.generator import Generator
        from imadarem.runtime.registry import default_registry

        self.args, self.threads = args, threads
        self.generators = {p: Generator(args.model, provider=p, threads=threads) for p in args.providers}
        model = next(iter(self.generators.values())).model
        self.model, self.block = model, decode_block(model.config)
        names = DEFAULT_ROWS if args.engines is None else args.engines
        self.rows = [Decoding.parse(n, default_registry().names("selector"), self.block) for n in names]
        if BASELINE not in [d.name for d in self.rows]:
            self.rows.insert(0, Decoding.parse(BASELINE, [], self.block))
        self._ids: dict[tuple[str, str, int], np.ndarray] = {}
        self._count = [0, 0]
        for gen in self.generators.values():  # count the rows and positions of every call
            session, count = gen.model.session, self._count
            original = session.run

            def run(names, feed, *rest, _original=original, _count=count):
                _count[0] += len(feed["tokens"])
                _count[1] += feed["tokens"].size
                return _original(names, feed, *rest)
            session.run = run

    def _run(self, decoding: Decoding, provider: str, batch: int, tm: LoopTimings, seed: int, n: int):
        gen = self.generators[provider]
        parts = list(gen.iter_results(n, seed=seed, batch_size=batch, timings=tm, **decoding.options()))
        return np.concatenate([p.ids for p in parts]), np.concatenate([p.steps for p in parts])

    def measure(self, decoding: Decoding, provider: str, batch: int) -> BlockRow:
        n = batch * max(1, -(-MIN_MOLECULES // batch))
        self._run(decoding, provider, batch, LoopTimings(), self.args.seed + 10_000, batch)  # warm-up
        walls, calls, rows, positions, steps = [], [], [], [], []
        for r in range(self.args.repeats):
            tm = LoopTimings()
            self._count[:] = [0, 0]
            ids, used = self._run(decoding, provider, batch, tm, self.args.seed + r, n)
            walls.append(tm.total_seconds)
            calls.append(float(np.mean(used)))
            rows.append(self._count[0] / n)
            positions.append(self._count[1] / n)
            steps.append(np.asarray(tm.step_seconds))
            if r == 0:
                self._ids[(decoding.name, provider, batch)] = ids
        wall = float(np.median(walls))
        return BlockRow(decoding.name, provider, batch, wall, n / wall, float(np.mean(calls)), float(np.mean(rows)),
                        float(np.mean(positions)), float(np.percentile(np.concatenate(steps), 50) * 1e3), len(walls))

    def run(self, progress: Callable[[str], None]) -> dict[str, Any]:
        a = self.args
        rows: list[BlockRow] = []
        for provider in a.providers:
            for batch in a.batch_sizes:
                here = []
                for decoding in self.rows:
                    progress(f"{provider} batch {batch}: {decoding.name}")
                    here.append(self.measure(decoding, provider, batch))
                base = next(r for r in here if r.engine == BASELINE)
                for r in here:
                    r.vs_baseline = r.seq_per_s / base.seq_per_s
                    mine, theirs = self._ids[(r.engine, provider, batch)], self._ids[(BASELINE, provider, batch)]
                    r.identical_to_baseline = float(np.mean((mine == theirs).all(-1)))
                rows += here
            if a.samples:
                self._quality(rows, provider, progress)
        decoding = self.model.common.decoding
        result = {"machine": _machine_info(self.threads), "source": f"model file {a.model}",
                  "recommended": decoding or None, "block": self.block, "max_seq_len": self.model.typed.max_seq_len,
                  "repeats": a.repeats, "seed": a.seed, "rows": [asdict(r) for r in rows]}
        return write_result(a.out_dir, result, markdown(result))

    def _quality(self, rows: list[BlockRow], provider: str, progress: Callable[[str], None]) -> None:
        a = self.args
        n, batch = a.samples, max(a.batch_sizes)
        out = Path(a.out_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        scorer = _scorer()
        ids: dict[str, np.ndarray] = {}
        for decoding in self.rows:
            progress(f"{provider}: {n} molecules from {decoding.name}")
            got, _ = self._run(decoding, provider, batch, LoopTimings(), a.seed, n)
            ids[decoding.name] = got
            quality = sample_quality(self.model, got, out / f"{provider}-{decoding.name}.smi", a.out_dir, scorer)
            quality["identical_to_baseline"] = float(np.mean((got == ids[BASELINE]).all(-1))) if BASELINE in ids \
                else None
            for row in rows:
                if row.engine == decoding.name and row.provider == provider:
                    row.quality = dict(quality)


def markdown(result: dict[str, Any]) -> str:
    from imadarem.bench.report import _fmt, machine_line

    rec = result.get("recommended") or {}
    options = ", ".join(f"{k}={v}" for k, v in (rec.get("options") or {}).items())
    said = (f"`{rec.get('selector')}`" + (f" ({options})" if options else "")
            + (f", {rec['drafts']} drafts" if rec.get("drafts") is not None else "") if rec else "none")
    lines = ["# imadarem bench (block refine model)", "", machine_line(result["machine"]),
             f"- model: {result['source']}; blocks of {result['block']}, length {result['max_seq_len']}; "
             f"recommended decoding: {said}; median of {result['repeats']} runs",
             "", "| provider | batch | decoding | molecules/s | × l2r | calls per molecule | rows per molecule "
             "| positions per molecule | step p50 ms | same molecules as l2r | FCD/Test |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        q = r.get("quality") or {}
        lines.append(f"| {r['provider']} | {r['batch']} | {r['engine']} | {_fmt(r['seq_per_s'], '.1f')} | "
                     f"{_fmt(r['vs_baseline'], '.2f')} | {_fmt(r['calls_per_molecule'], '.1f')} | "
                     f"{_fmt(r['rows_per_molecule'], '.1f')} | {_fmt(r.get('positions_per_molecule'), '.0f')} | "
                     f"{_fmt(r['step_p50_ms'], '.2f')} | "
                     f"{_fmt(r['identical_to_baseline'], '.3f')} | {_fmt(q.get('fcd'), '.3f')} |")
    return "\n".join(lines + [""])


__all__ = ["BlockBench", "BlockRow", "DEFAULT_ROWS", "Decoding", "markdown"]

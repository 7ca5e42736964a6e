"""GenMol's fragment tasks and metrics (``imadarem eval fragments``): linker design, motif extension, scaffold
decoration and superstructure generation, scored as GenMol's ``scripts/exps/frag/run.py`` scores them.

For each prompt of a suite (``imadarem.chem.suites``), ``samples`` molecules per seed; of them GenMol keeps
the valid molecules that hold the prompt's fragments (its sampler's ``filter_by_substructure``; ours is
``fragments.keeps``) and reports, per prompt:

- ``validity``: kept molecules / samples (so a molecule that lost its fragment counts as invalid);
- ``uniqueness``: distinct kept molecules / kept molecules;
- ``quality``: distinct kept molecules with QED >= 0.6 and SA <= 4 / samples;
- ``diversity``: mean pairwise Tanimoto distance of the distinct kept molecules (Morgan radius 2, 2,048 bits,
  TDC's ``diversity``; 0 for a single molecule);
- ``distance``: mean Tanimoto distance of the distinct kept molecules to the molecule the prompt was cut from
  (Morgan radius 2, 1,024 bits);

then the mean over prompts (and seeds) per task; a prompt without a kept molecule (or one the model cannot
write, e.g. an atom outside its vocabulary) adds 0 to validity, uniqueness and quality and nothing to
diversity and distance, as GenMol's loop does. We add ``kept`` (valid molecules that hold the fragments /
valid molecules), ``valid`` (RDKit-valid / samples, before the fragment check) and ``calls`` (mean model
calls per molecule).

A left-to-right model sees only a prefix, so it gets each prompt as SAFE-GPT gets it, with the fragment first:
a linker's first fragment, or a decoration's scaffold with one attachment point (the others become hydrogens),
and its molecules are checked against the whole prompt (``fragments.prefix_prompt``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from imadarem.chem import fragments
from imadarem.chem.suites import TASKS, FragmentCase, load_suite
from imadarem.runtime.errors import ImadaremError, PromptError

METRICS = ("validity", "uniqueness", "quality", "diversity", "distance", "kept", "valid", "calls")
#: kept in the JSON beside METRICS, not in the table (GenMol reports neither): quality's two halves, each over
#: samples as quality is (distinct kept molecules with QED >= 0.6; with SA <= 4), and the share of the distinct
#: kept molecules with a ring over 8 atoms (MOSES holds none; each costs SA). They say why quality moved: the
#: refine model lost motif extension on SA, with twice the causal model's macrocycles (PLAN.md, twelfth finding)
DIAGNOSTICS = ("qed_ok", "sa_ok", "macrocycles")
#: GenMol's quality thresholds
QED_MIN, SA_MAX = 0.6, 4.0

#: published rows on GenMol's 10-drug suite: GenMol, arXiv 2501.06158v3, Table 2 (means of 3 runs of 100
#: molecules per drug; validity, uniqueness and quality printed in %, stored here as fractions). GenMol's
#: "scaffold morphing" row equals its linker row there and is left out.
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "GenMol": {
        "linker_design": {"validity": 1.000, "uniqueness": 0.837, "quality": 0.219, "diversity": 0.547, "distance": 0.563},
        "motif_extension": {"validity": 0.829, "uniqueness": 0.775, "quality": 0.301, "diversity": 0.617, "distance": 0.682},
        "scaffold_decoration": {"validity": 0.966, "uniqueness": 0.827, "quality": 0.318, "diversity": 0.591,
                                "distance": 0.651},
        "superstructure_generation": {"validity": 0.975, "uniqueness": 0.836, "quality": 0.348, "diversity": 0.599,
                                      "distance": 0.762},
    },
    "SAFE-GPT": {
        "linker_design": {"validity": 0.766, "uniqueness": 0.825, "quality": 0.217, "diversity": 0.545, "distance": 0.541},
        "motif_extension": {"validity": 0.961, "uniqueness": 0.668, "quality": 0.186, "diversity": 0.562, "distance": 0.665},
        "scaffold_decoration": {"validity": 0.977, "uniqueness": 0.747, "quality": 0.100, "diversity": 0.575,
                                "distance": 0.625},
        "superstructure_generation": {"validity": 0.957, "uniqueness": 0.830, "quality": 0.143, "diversity": 0.573,
                                      "distance": 0.776},
    },
}


def _rdkit():
    from rdkit import Chem, DataStructs, RDLogger
    from rdkit.Chem import QED, rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")
    return Chem, DataStructs, QED, rdFingerprintGenerator


class PromptScorer:
    """GenMol's per-prompt metrics of one prompt's samples (module docstring)."""

    def __init__(self, sa_path: Path):
        from imadarem.training.evaluation import moses_reference as mr

        self.Chem, self.DataStructs, self.QED, fpgen = _rdkit()
        self.fscores = mr.load_sa_scores(sa_path)
        self.sa_score = mr.sa_score
        self.fp2048 = fpgen.GetMorganGenerator(radius=2, fpSize=2048)
        self.fp1024 = fpgen.GetMorganGenerator(radius=2, fpSize=1024)

    def __call__(self, task: fragments.FragmentTask, original: str, texts: Sequence[str | None],
                 num_samples: int) -> dict[str, float]:
        Chem = self.Chem
        mols = [Chem.MolFromSmiles(t) if t else None for t in texts]
        valid = [(t, m) for t, m in zip(texts, mols) if m is not None and m.GetNumAtoms() > 0]
        kept = [(t, m) for t, m in valid if fragments.keeps_mol(task, m)]
        row = {"valid": len(valid) / num_samples, "kept": len(kept) / len(valid) if valid else 0.0,
               "validity": len(kept) / num_samples}
        distinct: dict[str, Any] = {}
        for _, mol in kept:
            distinct.setdefault(Chem.MolToSmiles(mol), mol)
        if not distinct:
            return {**row, "uniqueness": 0.0, "quality": 0.0, "qed_ok": 0.0, "sa_ok": 0.0}
        qed_ok = [self.QED.qed(m) >= QED_MIN for m in distinct.values()]
        sa_ok = [self.sa_score(m, self.fscores) <= SA_MAX for m in distinct.values()]
        row.update(uniqueness=len(distinct) / len(kept), quality=sum(q and s for q, s in zip(qed_ok, sa_ok)) / num_samples,
                   qed_ok=sum(qed_ok) / num_samples, sa_ok=sum(sa_ok) / num_samples,
                   macrocycles=float(np.mean([any(len(r) > 8 for r in m.GetRingInfo().AtomRings())
                                              for m in distinct.values()])))
        fps = [self.fp2048.GetFingerprint(m) for m in distinct.values()]
        pairs = [d for i in range(1, len(fps)) for d in self.DataStructs.BulkTanimotoSimilarity(fps[i], fps[:i], returnDistance=True)]
        row["diversity"] = float(np.mean(pairs)) if pairs else 0.0
        reference = self.fp1024.GetFingerprint(Chem.MolFromSmiles(original))
        row["distance"] = float(np.mean(self.DataStructs.BulkTanimotoSimilarity(
            reference, [self.fp1024.GetFingerprint(m) for m in distinct.values()], returnDistance=True)))
        return row


def left_to_right(generator) -> bool:
    """Whether the model sees only a prefix (a causal or decode file): it then gets prompts in prefix form."""
    return getattr(generator.model, "format_name", "") in ("causal", "decode")


def evaluate(model: str | None, suite: str, tasks: Sequence[str], samples: int, seeds: Sequence[int],
             sa_path: Path, selector: str | None = None, batch_size: int = 500, threads: int | None = None,
             progress: Callable[[str], None] | None = None, grid_dir: str | None = None,
             retries: int | None = None) -> dict[str, Any]:
    """One model on one suite: per-task means of :data:`METRICS` over prompts and seeds, plus every prompt's
    own row. ``grid_dir``: one drawing per task (the first prompt's first seed); ``retries``: the
    Generator's redraws of a sample that lost its fragments (None: its default; 0: one draw, as GenMol)."""
    from imadarem.runtime.generator import Generator

    gen = Generator(model, threads=threads)
    prefix = left_to_right(gen)
    scorer = PromptScorer(sa_path)
    cases = [c for c in load_suite(suite) if c.task in tasks]
    per_prompt: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for case in cases:
        for seed in seeds:
            first = not any(p["task"] == case.task for p in per_prompt)
            row = evaluate_case(gen, scorer, case, seed, samples, selector=selector, batch_size=batch_size,
                                retries=retries)
            per_prompt.append(row)
            if grid_dir and seed == seeds[0] and first and "samples" in row:
                _draw(grid_dir, case, fragments.parse_fragment_prompt(_as_prompt(case)), row["samples"])
        if progress:
            progress(f"{case.task} {case.name}: {per_prompt[-1].get('quality', 0.0):.2f} quality")
    summary = {task: _mean(per_prompt, task) for task in tasks}
    return {"model": model or "default", "suite": suite, "prefix_prompts": prefix, "samples": samples,
            "retries": retries,
            "seeds": list(seeds), "selector": selector or "default", "seconds": round(time.perf_counter() - t0, 1),
            "tasks": summary, "prompts": per_prompt}


def evaluate_case(gen, scorer: PromptScorer, case: FragmentCase, seed: int, samples: int, *,
                  selector: str | None = None, batch_size: int = 500, retries: int | None = None) -> dict[str, Any]:
    """One prompt's row for one seed: ``samples`` molecules from the Generator ``gen`` (a left-to-right model
    gets the prompt in prefix form), scored by ``scorer``. Its own function so that a caller can spread a
    suite's prompts over processes, each holding one Generator (experiments/device/fragments.py)."""
    prompt = _as_prompt(case)
    task = fragments.parse_fragment_prompt(prompt)
    asked = fragments.prefix_prompt(task) if left_to_right(gen) else prompt
    row: dict[str, Any] = {"task": case.task, "name": case.name, "prompt": case.prompt, "asked": asked,
                           "seed": seed}
    try:
        out = gen.generate(samples, selector=selector, seed=seed, prompt=asked, batch_size=batch_size,
                           retries=retries)
    except PromptError as exc:  # e.g. a symbol outside the model's vocabulary: no molecule, as GenMol counts
        row.update({"error": str(exc), **{m: 0.0 for m in ("validity", "uniqueness", "quality", "valid", "kept")}})
        return row
    texts = [s.text for s in out]
    row.update(scorer(task, case.original, texts, samples))
    row["calls"] = float(np.mean([s.steps for s in out]))  # every attempt's calls
    row["attempts"] = float(np.mean([s.attempts or 1 for s in out]))
    row["samples"] = texts
    return row


def _as_prompt(case: FragmentCase) -> str:
    if case.task == "superstructure_generation":
        return fragments.SUPERSTRUCTURE + case.prompt
    return case.prompt


def _mean(rows: list[dict[str, Any]], task: str) -> dict[str, float]:
    mine = [r for r in rows if r["task"] == task]
    out = {"prompts": len({r["name"] for r in mine}), "runs": len(mine)}
    for metric in METRICS + DIAGNOSTICS:
        values = [r[metric] for r in mine if metric in r]
        out[metric] = float(np.mean(values)) if values else float("nan")
    return out


def _draw(grid_dir: str, case: FragmentCase, task, texts: list[str | None]) -> None:
    from imadarem.chem.drawing import draw_grid

    Path(grid_dir).mkdir(parents=True, exist_ok=True)
    draw_grid([t for t in texts if t][:12], Path(grid_dir) / f"{case.task}.svg", task=task,
              legend=f"{case.name}: {case.prompt}")


def table(results: list[dict[str, Any]], published: bool = True) -> list[str]:
    """Markdown rows: one per task and model (ours), then the published rows where the suite is GenMol's."""
    head = ["task", "model", *[m for m in METRICS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in TASKS:
        for result in results:
            row = result["tasks"].get(task)
            if row is None:
                continue
            name = Path(str(result["model"])).stem + (" (fragment as prefix)" if result["prefix_prompts"] else "")
            cells = [_cell(m, row[m]) for m in METRICS]
            lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
        if published and any(r["suite"] == "genmol" and task in r["tasks"] for r in results):
            for source, rows in PUBLISHED.items():
                if task in rows:
                    cells = [_cell(m, rows[task].get(m)) for m in METRICS]
                    lines.append(f"| {task} | {source} (published) | " + " | ".join(cells) + " |")
    return lines


def _cell(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if metric == "calls":
        return f"{value:.1f}"
    if metric in ("validity", "uniqueness", "quality", "kept", "valid"):
        return f"{100 * value:.1f}"
    return f"{value:.3f}"


def write(results: list[dict[str, Any]], path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=1) + "\n")


def check_tasks(tasks: Sequence[str]) -> list[str]:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ImadaremError(f"unknown fragment task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    return list(tasks) or list(TASKS)

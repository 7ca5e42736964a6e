"""``imadarem eval molecules``: the MOSES benchmark's metrics of generated molecules (needs the ``eval`` extra).

The full set that MOSES's ``get_all_metrics`` reports (Polykovskiy et al. 2020; molsets 0.3.1), with its
names and definitions, checked against MOSES's own code by ``tests/test_moses_metrics.py``:

- ``valid``: the fraction of SMILES that RDKit parses and sanitises. Everything below is of the valid
  molecules' canonical SMILES, parsed again (MOSES's ``remove_invalid`` then ``get_mol``), duplicates kept.
- ``unique@1000``, ``unique@10000``: distinct canonical SMILES among the first k valid molecules (reported
  when at least k SMILES were given; MOSES warns and reports fewer).
- ``FCD/Test``, ``FCD/TestSF``: Fréchet ChemNet Distance to **MOSES's own statistics** of its test and
  scaffold-test splits (``test_stats.npz``, ``test_scaffolds_stats.npz``), the valid molecules' activations
  from the ``fcd`` package's ChemNet (MOSES uses fcd_torch's; same network and weights). Needs the
  ``fcd`` extra (it brings PyTorch).
- ``SNN/Test``, ``SNN/TestSF``: mean over molecules of the largest Tanimoto similarity to the reference
  set (Morgan fingerprints, radius 2, 1024 bits).
- ``Frag/…``, ``Scaf/…``: cosine similarity of BRICS fragment counts / Bemis-Murcko scaffold counts
  (scaffolds with at least 2 rings) with the reference set's, in float64 (MOSES's int64 overflows).
- ``IntDiv``, ``IntDiv2``: 1 - mean over molecules of the mean (p = 1) / root mean square (p = 2)
  Tanimoto similarity to all of them, itself included; on all valid molecules as MOSES, unless
  ``intdiv_sample`` asks for a random subset (``IntDiv_molecules`` says how many were used).
- ``Filters``: MOSES's ``mol_passes_filters`` (MCF and PAINS SMARTS of the molsets wheel matched with
  explicit hydrogens, atoms C N S O F Cl Br H only, no charge, no ring of 8 or more atoms).
- ``Novelty``: distinct canonical SMILES not in MOSES's train split.
- ``logP``, ``SA``, ``QED``, ``weight``: Wasserstein distance of the property's values to the test set's.

The reference sets' descriptors are computed once from MOSES's SMILES and cached
(:mod:`imadarem.training.evaluation.moses_reference`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from imadarem.runtime.errors import ImadaremError
from imadarem.training.data import read_smiles
from imadarem.training.evaluation import moses_reference as mr
from imadarem.training.evaluation.moses_reference import ALLOWED_ATOMS, passes_filters  # noqa: F401

#: MOSES's metric names, in the order they are reported
MOSES_METRICS = ("valid", "unique@1000", "unique@10000", "FCD/Test", "FCD/TestSF", "SNN/Test", "SNN/TestSF",
                 "Frag/Test", "Frag/TestSF", "Scaf/Test", "Scaf/TestSF", "IntDiv", "IntDiv2", "Filters",
                 "Novelty", "logP", "SA", "QED", "weight")
#: the names this module used before it reported MOSES's full set (``legacy_keys=True`` adds them)
LEGACY_KEYS = {"unique@1k": "unique@1000", "unique@10k": "unique@10000", "novelty": "Novelty",
               "intdiv": "IntDiv", "filters": "Filters", "fcd": "FCD/Test"}


def _rdkit():
    try:
        from rdkit import Chem, DataStructs, RDLogger
        from rdkit.Chem import rdFingerprintGenerator
    except ImportError:
        raise ImadaremError("molecule metrics need RDKit: pip install 'imadarem[eval]'") from None
    RDLogger.DisableLog("rdApp.*")
    return Chem, DataStructs, rdFingerprintGenerator


def load_filters(moses_files: dict[str, Path]) -> list[str]:
    """The SMARTS of MOSES's filters: the ``smarts`` column of ``mcf.csv`` and the first column of
    ``wehi_pains.csv`` (read as CSV: many SMARTS hold commas inside quotes), 502 in all."""
    import csv

    with open(moses_files["mcf"], newline="") as fh:
        smarts = [row["smarts"].strip() for row in csv.DictReader(fh)]
    with open(moses_files["pains"], newline="") as fh:
        smarts += [row[0].strip() for row in csv.reader(fh) if row]
    return smarts


def _smarts(patterns) -> list[str]:
    Chem, _, _ = _rdkit()
    return [p if isinstance(p, str) else Chem.MolToSmarts(p) for p in patterns]


def molecule_metrics(smiles: list[str], train: set[str], patterns, intdiv_sample: int | None = None,
                     seed: int = 0, fcd: FrechetChemNet | None = None,
                     references: Sequence[mr.Reference] = (), ks: Sequence[int] = (1000, 10000),
                     n_jobs: int = 1, sa_path: Path | None = None, legacy_keys: bool = True) -> dict[str, Any]:
    """MOSES's metrics of ``smiles`` (see the module's doc). ``patterns``: the filters' SMARTS (or RDKit
    query molecules); ``references``: MOSES's reference sets (:func:`moses_reference.moses_references`),
    for FCD (with ``fcd``: a ChemNet), SNN, Frag and Scaf against each, and the property distances against
    "Test" (``sa_path``: the SA fragment scores, :func:`moses_reference.sa_scores_file`).
    ``intdiv_sample``: IntDiv on that many random valid molecules (``seed``) instead of all of them.
    ``legacy_keys`` adds this module's earlier names (``LEGACY_KEYS``) beside MOSES's."""
    _rdkit()
    t0 = time.perf_counter()
    references = list(references)
    with_props = any(r.name == "Test" for r in references) and sa_path is not None
    d = mr.describe(smiles, generated=True, filter_smarts=_smarts(patterns), sa_path=sa_path if with_props else None,
                    with_sets=bool(references), n_jobs=n_jobs)
    n, m = len(smiles), d.size
    # MOSES's unique@k, Novelty and FCD read the canonical SMILES of the re-parsed molecules
    canon = d.smiles if d.lost == 0 else d.canonical
    out: dict[str, Any] = {"n": n, "valid": float(d.valid.mean()) if n else 0.0}
    for k in ks:
        if n >= k:
            head = canon[:k]
            out[f"unique@{k}"] = len(set(head)) / max(len(head), 1)
    if fcd is not None:
        stats = fcd.stats(d.smiles)
        refs = [r for r in references if r.fcd is not None]
        if refs:
            for r in refs:
                out[f"FCD/{r.name}"] = frechet_of_stats(stats, r.fcd)
        else:  # a ChemNet with a reference of its own
            out["FCD/Test"] = frechet_of_stats(stats, (fcd.mu, fcd.sigma))
    for r in references:
        out[f"SNN/{r.name}"] = float(np.mean(mr.nearest_similarity(d.fps, r.fps))) if m else float("nan")
    for r in references:
        out[f"Frag/{r.name}"] = mr.cosine_similarity(r.frag, d.frag)
    for r in references:
        out[f"Scaf/{r.name}"] = mr.cosine_similarity(r.scaf, d.scaf)
    fps = d.fps
    if intdiv_sample and intdiv_sample < m:
        fps = fps[np.sort(np.random.default_rng(seed).permutation(m)[:intdiv_sample])]
    div = mr.internal_diversities(fps, (1, 2))
    out["IntDiv"], out["IntDiv2"], out["IntDiv_molecules"] = div[1], div[2], len(fps)
    out["Filters"] = float(np.mean(d.filters)) if m else 0.0
    unique = set(d.smiles)
    out["Novelty"] = sum(c not in train for c in unique) / max(len(unique), 1) if train else float("nan")
    if with_props:
        test = next(r for r in references if r.name == "Test")
        for name in mr.PROPERTIES:
            out[name] = mr.wasserstein(test.props[name], d.props[name])
    out["heavy_atoms"] = float(np.mean(d.atoms)) if m else 0.0
    if d.lost:
        out["lost"] = d.lost  # valid molecules whose canonical SMILES does not parse again (MOSES fails)
    if legacy_keys:
        out.update({old: out[new] for old, new in LEGACY_KEYS.items() if new in out})
    out["score_seconds"] = round(time.perf_counter() - t0, 2)
    return out


def frechet_of_stats(stats, ref) -> float:
    """FCD of two (mu, sigma) pairs; nan when the first is None (fewer than 2 molecules, as MOSES)."""
    if stats is None:
        return float("nan")
    return frechet_distance(stats[0], stats[1], ref[0], ref[1])


def _fcd():
    try:
        import fcd
    except ImportError:
        raise ImadaremError("FCD needs the fcd package: pip install 'imadarem[fcd]' (or pass --no-fcd)") from None
    return fcd


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance of two Gaussians, as fcd and MOSES compute it (scipy's ``sqrtm``, with a small
    diagonal offset when the product is singular); written here because fcd 1.2.2 passes ``sqrtm`` an
    argument newer scipy removes."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(np.real(covmean)))


class FrechetChemNet:
    """The ``fcd`` package's ChemNet, loaded once, and one reference's statistics (for MOSES's FCD/Test,
    ``MosesScorer`` gives every reference set its own: ``moses_reference.Reference.fcd``).

    ``reference_stats`` (an npz of ``mu`` and ``sigma``, e.g. MOSES's own from ``moses_fcd_reference``)
    is used as it is; otherwise the reference SMILES' statistics are computed once and cached.
    """

    def __init__(self, reference: Path, cache_dir: Path, device: str | None = None,
                 reference_stats: Path | None = None):
        fcd = _fcd()
        if not hasattr(np, "row_stack"):  # fcd 1.2.2 calls np.row_stack, which numpy 2.5 removed
            np.row_stack = np.vstack
        self.fcd, self.device = fcd, device
        self.model = fcd.load_ref_model()
        stats = reference_stats or Path(cache_dir) / f"fcd-{fcd.__version__}-{reference.name.split('.')[0]}-stats.npz"
        if stats.is_file():
            with np.load(stats) as saved:  # plain float arrays: no pickle
                self.mu, self.sigma = saved["mu"], saved["sigma"]
        else:
            print(f"FCD: computing ChemNet statistics of {reference.name} once (about 15 min on 2 CPU cores, "
                  f"seconds on a GPU); cached as {stats}", file=sys.stderr, flush=True)
            self.mu, self.sigma = self._stats(read_smiles(reference))
            tmp = stats.with_name(stats.stem + ".part.npz")
            np.savez(tmp, mu=self.mu, sigma=self.sigma)
            os.replace(tmp, stats)

    def _stats(self, smiles: list[str]) -> tuple[np.ndarray, np.ndarray]:
        act = self.fcd.get_predictions(self.model, smiles, device=self.device)
        return act.mean(0), np.cov(act.T)

    def stats(self, smiles: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """Mean and covariance of the ChemNet activations of ``smiles``; None for fewer than 2 (as MOSES)."""
        return self._stats(smiles) if len(smiles) >= 2 else None

    def __call__(self, smiles: list[str]) -> float:
        return frechet_of_stats(self.stats(smiles), (self.mu, self.sigma))


def read_train_set(path: Path) -> set[str]:
    return set(read_smiles(path))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class MosesScorer:
    """MOSES metrics of any list of SMILES against the MOSES splits (loaded once): what ``imadarem eval
    molecules`` and ``imadarem bench --samples`` report. The reference sets' descriptors are computed on
    first use (about 5 minutes per set on 2 CPU cores) and cached next to the MOSES files.

    ``intdiv_sample``: None for IntDiv on all valid molecules (MOSES), else on that many; ``n_jobs``:
    processes for RDKit's per-molecule work [default: all cores]."""

    def __init__(self, moses_cache: str | None = None, with_fcd: bool | None = None,
                 intdiv_sample: int | None = None, n_jobs: int | None = None, legacy_keys: bool = False):
        from imadarem.training.data import fetch_moses, moses_fcd_reference

        _rdkit()
        files = fetch_moses(moses_cache)
        self.n_jobs = n_jobs or os.cpu_count() or 1
        self.train = read_train_set(files["train"])
        self.patterns = load_filters(files)
        if with_fcd is None:
            import importlib.util

            with_fcd = importlib.util.find_spec("fcd") is not None
        self.fcd = FrechetChemNet(files["test"], files["test"].parent, reference_stats=moses_fcd_reference(files)) \
            if with_fcd else None
        self.references = mr.moses_references(files, self.n_jobs, with_fcd=bool(with_fcd), log=_log)
        self.sa_path = mr.sa_scores_file(files["test"].parent)
        self.intdiv_sample = intdiv_sample
        self.legacy_keys = legacy_keys

    def __call__(self, smiles: list[str], seed: int = 0) -> dict[str, Any]:
        return molecule_metrics(smiles, self.train, self.patterns, self.intdiv_sample, seed, self.fcd,
                                self.references, n_jobs=self.n_jobs, sa_path=self.sa_path,
                                legacy_keys=self.legacy_keys)


_SCORER: MosesScorer | None = None


def score_smiles(smiles: list[str]) -> dict[str, Any]:
    """MOSES's metrics of ``smiles``, FCD included, under MOSES's names and this module's earlier ones
    (``LEGACY_KEYS``: "unique@1k", "fcd", ...); the scorer is built on the first call and kept."""
    global _SCORER
    if _SCORER is None:
        _SCORER = MosesScorer(with_fcd=True, legacy_keys=True)
    return _SCORER(smiles)


def _check_looks_like_smiles(path, lines: list[str], probe: int = 200) -> None:
    """A file of something else (names, a table, a log) is refused in one line instead of being scored as
    invalid molecules: the first ``probe`` non-empty lines must hold at least one SMILES that RDKit reads."""
    Chem = _rdkit()[0]
    head = [line.strip() for line in lines if line.strip()][:probe]
    if not any(Chem.MolFromSmiles(line.split()[0]) is not None for line in head):
        raise ImadaremError(f"{path}: none of its first {len(head)} lines is a SMILES that RDKit reads "
                            "(expected one molecule per line)")


def evaluate_samples(paths: list[str], moses_cache: str | None, intdiv_sample: int | None, progress=None,
                     with_fcd: bool | None = None, n_jobs: int | None = None) -> list[dict[str, Any]]:
    """One row per SMILES file (one molecule per line; an empty line is an invalid molecule). Every file
    is read before MOSES is loaded, so a bad path costs no minutes."""
    sets = []
    for path in paths:
        try:
            smiles = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ImadaremError(f"cannot read samples {path}: {exc.strerror if isinstance(exc, OSError) else exc}") \
                from None
        if not smiles:
            raise ImadaremError(f"{path} holds no molecules")
        _check_looks_like_smiles(path, smiles)
        sets.append((path, smiles))
    scorer = MosesScorer(moses_cache, with_fcd, intdiv_sample, n_jobs)
    rows = []
    for path, smiles in sets:
        row: dict[str, Any] = {"samples": str(path)}
        row.update(scorer(smiles))
        rows.append(row)
        if progress:
            progress(row)
    return rows


def evaluate(model: str | None, n: int, selectors: list[str], steps_list: list[int | None], seed: int,
             temperature: float | None, batch_size: int, moses_cache: str | None, intdiv_sample: int | None,
             threads: int | None = None, progress=None, with_fcd: bool | None = None,
             n_jobs: int | None = None, selector_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per selector and step count. ``with_fcd``: True needs the fcd package, None uses it
    when installed, False skips FCD; ``selector_options`` go to every row's selector (and into its row)."""
    from imadarem.runtime.generator import Generator

    gen = Generator(model, threads=threads)
    if not selectors:
        selectors = [None]  # the model's default
    for selector in selectors:  # every request checked (one line) before MOSES's reference, which takes minutes
        for steps in steps_list:
            gen.iter_generate(n, selector=selector, steps=steps, temperature=temperature, seed=seed,
                              batch_size=batch_size, **(selector_options or {}))
    scorer = MosesScorer(moses_cache, with_fcd, intdiv_sample, n_jobs)
    rows = []
    for selector in selectors:
        for steps in steps_list:
            t0 = time.perf_counter()
            samples = gen.generate(n, selector=selector, steps=steps, temperature=temperature, seed=seed,
                                   batch_size=batch_size, **(selector_options or {}))
            elapsed = time.perf_counter() - t0
            row: dict[str, Any] = {"selector": selector or "default", "steps": steps or "default"}
            if selector_options:
                row["options"] = dict(selector_options)
            row.update(scorer([s.text for s in samples], seed))
            row["steps_used"] = float(np.mean([s.steps for s in samples]))
            row["edits_per_step"] = float(np.mean([np.mean(s.edits) for s in samples]))
            row["early_stop"] = float(np.mean([s.early_stop for s in samples]))
            row["seconds"] = round(elapsed, 2)
            rows.append(row)
            if progress:
                progress(row)
    return rows


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("valid", "unique@10000", "unique@1000", "Novelty", "IntDiv", "Filters", "FCD/Test",
                           "SNN/Test", "Frag/Test", "Scaf/Test") if m in rows[0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for selector in dict.fromkeys(r["selector"] for r in rows):
            pts = sorted((r["steps"], r[metric]) for r in rows if r["selector"] == selector)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=selector)
        ax.set_title(metric)
        ax.set_xlabel("steps K")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    from imadarem.runtime.files import check_output, replace_atomically, temporary_beside

    tmp = temporary_beside(check_output(path, "plot"), ".png")
    try:
        fig.savefig(tmp, dpi=120, format="png")
        replace_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write(rows, json_path: str | None) -> None:
    if json_path:
        from imadarem.runtime.files import write_text

        write_text(json_path, json.dumps(rows, indent=1))

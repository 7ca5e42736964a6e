"""``imadarem eval molecules``: MOSES-style quality of generated molecules (needs the ``eval`` extra).

Metrics follow the MOSES benchmark (Polykovskiy et al. 2020): validity (RDKit sanitisation), Unique@1k
and @10k, Novelty against the MOSES train split, IntDiv1 (1 - mean pairwise Tanimoto of Morgan radius-2,
1024-bit fingerprints; computed on at most ``intdiv_sample`` molecules, because all pairs of 30k are
9e8), and Filters (MOSES's medicinal-chemistry filters: the MCF and PAINS SMARTS shipped in the
molsets wheel matched on the molecule with explicit hydrogens, allowed atoms C N S O F Cl Br H, no
charges, no ring of 8 or more atoms: ``moses.metrics.mol_passes_filters`` exactly), and FCD/Test (Fréchet
ChemNet Distance of the valid molecules to **MOSES's own reference statistics**, ``test_stats.npz`` of the
molsets wheel, with the ``fcd`` package's ChemNet; MOSES train scores 0.136 at n = 10,000 with it).
FCD needs the ``fcd`` extra (it brings PyTorch).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from imadarem.runtime.errors import ImadaremError
from imadarem.training.data import read_smiles

ALLOWED_ATOMS = {"C", "N", "S", "O", "F", "Cl", "Br", "H"}


def _rdkit():
    try:
        from rdkit import Chem, DataStructs, RDLogger
        from rdkit.Chem import rdFingerprintGenerator
    except ImportError:
        raise ImadaremError("molecule metrics need RDKit: pip install 'imadarem[eval]'") from None
    RDLogger.DisableLog("rdApp.*")
    return Chem, DataStructs, rdFingerprintGenerator


def load_filters(moses_files: dict[str, Path]):
    Chem, _, _ = _rdkit()
    patterns = []
    for key in ("mcf", "pains"):
        lines = Path(moses_files[key]).read_text().splitlines()[1:] if key == "mcf" else \
            Path(moses_files[key]).read_text().splitlines()
        for line in lines:
            smarts = line.split(",")[1 if key == "mcf" else 0].strip().strip('"').strip()
            pat = Chem.MolFromSmarts(smarts)
            if pat is not None:
                patterns.append(pat)
    return patterns


def passes_filters(mol, patterns) -> bool:
    """MOSES's ``mol_passes_filters``: no ring of 8 or more atoms, no charge, only the allowed atoms, and
    no MCF/PAINS match on the molecule with explicit hydrogens (some SMARTS count hydrogens)."""
    Chem, _, _ = _rdkit()
    if any(len(r) >= 8 for r in mol.GetRingInfo().AtomRings()):
        return False
    for atom in mol.GetAtoms():
        if atom.GetSymbol() not in ALLOWED_ATOMS or atom.GetFormalCharge() != 0:
            return False
    h_mol = Chem.AddHs(mol)
    return not any(h_mol.HasSubstructMatch(p) for p in patterns)


def molecule_metrics(smiles: list[str], train: set[str], patterns, intdiv_sample: int = 5000,
                     seed: int = 0, fcd: FrechetChemNet | None = None) -> dict[str, float]:
    Chem, DataStructs, fpgen = _rdkit()
    mols = []
    for smi in smiles:
        mol = Chem.MolFromSmiles(smi) if smi else None
        mols.append(mol if mol is not None and mol.GetNumAtoms() > 0 else None)
    valid = [m for m in mols if m is not None]
    canon = [Chem.MolToSmiles(m) for m in valid]
    out: dict[str, float] = {"n": len(smiles), "valid": len(valid) / max(len(smiles), 1)}
    for k in (1000, 10000):
        if len(smiles) >= k:  # as MOSES: the first k valid molecules, or all valid ones if fewer
            head = canon[:k]
            out[f"unique@{k // 1000}k"] = len(set(head)) / max(len(head), 1)
    unique = list(dict.fromkeys(canon))
    out["novelty"] = sum(c not in train for c in unique) / max(len(unique), 1) if train else float("nan")
    gen = fpgen.GetMorganGenerator(radius=2, fpSize=1024)
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(valid))[:intdiv_sample]
    fps = [gen.GetFingerprint(valid[i]) for i in pick]
    if len(fps) > 1:
        sims = [np.mean(DataStructs.BulkTanimotoSimilarity(f, fps)) for f in fps]
        out["intdiv"] = float(1 - np.mean(sims))
    out["filters"] = float(np.mean([passes_filters(m, patterns) for m in valid])) if valid else 0.0
    out["heavy_atoms"] = float(np.mean([m.GetNumAtoms() for m in valid])) if valid else 0.0
    if fcd is not None:
        out["fcd"] = fcd(canon)
    return out


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
    """FCD against one reference (MOSES: FCD/Test), ChemNet loaded once.

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
            import sys

            print(f"FCD: computing ChemNet statistics of {reference.name} once (about 15 min on 2 CPU cores, "
                  f"seconds on a GPU); cached as {stats}", file=sys.stderr, flush=True)
            self.mu, self.sigma = self._stats(read_smiles(reference))
            tmp = stats.with_name(stats.stem + ".part.npz")
            np.savez(tmp, mu=self.mu, sigma=self.sigma)
            os.replace(tmp, stats)

    def _stats(self, smiles: list[str]) -> tuple[np.ndarray, np.ndarray]:
        act = self.fcd.get_predictions(self.model, smiles, device=self.device)
        return act.mean(0), np.cov(act.T)

    def __call__(self, smiles: list[str]) -> float:
        if len(smiles) < 2:
            return float("nan")
        mu, sigma = self._stats(smiles)
        return frechet_distance(mu, sigma, self.mu, self.sigma)


def read_train_set(path: Path) -> set[str]:
    return set(read_smiles(path))


class MosesScorer:
    """MOSES metrics of any list of SMILES against the MOSES splits (loaded once): what ``imadarem eval
    molecules --samples`` and ``imadarem bench --samples`` report."""

    def __init__(self, moses_cache: str | None = None, with_fcd: bool | None = None, intdiv_sample: int = 5000):
        from imadarem.training.data import fetch_moses, moses_fcd_reference

        files = fetch_moses(moses_cache)
        self.train = read_train_set(files["train"])
        self.patterns = load_filters(files)
        if with_fcd is None:
            import importlib.util

            with_fcd = importlib.util.find_spec("fcd") is not None
        self.fcd = FrechetChemNet(files["test"], files["test"].parent, reference_stats=moses_fcd_reference(files)) \
            if with_fcd else None
        self.intdiv_sample = intdiv_sample

    def __call__(self, smiles: list[str], seed: int = 0) -> dict[str, float]:
        return molecule_metrics(smiles, self.train, self.patterns, self.intdiv_sample, seed, self.fcd)


_SCORER: MosesScorer | None = None


def score_smiles(smiles: list[str]) -> dict[str, float]:
    """MOSES metrics with FCD/Test of ``smiles`` (the scorer is built on the first call and kept)."""
    global _SCORER
    if _SCORER is None:
        _SCORER = MosesScorer(with_fcd=True)
    return _SCORER(smiles)


def evaluate_samples(paths: list[str], moses_cache: str | None, intdiv_sample: int, progress=None,
                     with_fcd: bool | None = None) -> list[dict[str, Any]]:
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
        sets.append((path, smiles))
    scorer = MosesScorer(moses_cache, with_fcd, intdiv_sample)
    rows = []
    for path, smiles in sets:
        row: dict[str, Any] = {"samples": str(path)}
        row.update(scorer(smiles))
        rows.append(row)
        if progress:
            progress(row)
    return rows


def evaluate(model: str | None, n: int, selectors: list[str], steps_list: list[int | None], seed: int,
             temperature: float | None, batch_size: int, moses_cache: str | None, intdiv_sample: int,
             threads: int | None = None, progress=None, with_fcd: bool | None = None) -> list[dict[str, Any]]:
    """One row per selector and step count. ``with_fcd``: True needs the fcd package, None uses it
    when installed, False skips FCD."""
    from imadarem.runtime.generator import open_generator

    scorer = MosesScorer(moses_cache, with_fcd, intdiv_sample)
    gen = open_generator(model, threads=threads)
    if not selectors:
        selectors = ["gate"]
    rows = []
    for selector in selectors:
        for steps in steps_list:
            t0 = time.perf_counter()
            samples = gen.generate(n, selector=selector, steps=steps, temperature=temperature, seed=seed,
                                   batch_size=batch_size)
            elapsed = time.perf_counter() - t0
            row: dict[str, Any] = {"selector": selector, "steps": steps or gen.model_config.max_refinement_steps}
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

    metrics = [m for m in ("valid", "unique@10k", "unique@1k", "novelty", "intdiv", "filters", "fcd")
               if m in rows[0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for selector in dict.fromkeys(r["selector"] for r in rows):
            pts = sorted((r["steps"], r[metric]) for r in rows if r["selector"] == selector)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=selector)
        ax.set_title(metric)
        ax.set_xlabel("steps K")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(rows, json_path: str | None) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))

"""What MOSES's metrics are computed from: per-molecule descriptors, MOSES's reference sets, and the set
comparisons (max / mean Tanimoto, cosine of counts, 1-D Wasserstein distance).

Ported from MOSES (``moses/metrics/metrics.py`` and ``utils.py`` of molsets 0.3.1, MIT; Polykovskiy et al.
2020) and checked against MOSES's own code by ``tests/test_moses_metrics.py``. Per molecule:

- fingerprint: Morgan, radius 2, 1024 bits (MOSES's ``fingerprint(mol, 'morgan')``), kept packed (128 bytes);
- fragments: the SMILES pieces of ``FragmentOnBRICSBonds`` (MOSES's ``fragmenter``), counted with multiplicity;
- scaffold: the Bemis-Murcko scaffold's SMILES when it has at least 2 rings (MOSES's ``compute_scaffold``);
- logP (Crippen), SA (Ertl & Schuffenhauer, with the fragment scores ``fpscores.pkl.gz`` shipped in the
  wheel), QED and molecular weight (MOSES's ``logP``, ``SA``, ``QED``, ``weight``);
- for generated molecules only: MOSES's ``mol_passes_filters``.

A reference set (MOSES's test split "Test", or its scaffold split "TestSF") is those descriptors of all its
molecules, computed once from the split's SMILES in the sha256-checked wheel (minutes on 2 cores) and cached
as plain arrays (npz, no pickle) keyed by the file's sha256 and the RDKit version; its FCD statistics are
MOSES's own (``test_stats.npz`` / ``test_scaffolds_stats.npz``), likewise kept as plain arrays.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from imadarem.runtime.errors import DataError

#: MOSES's names of its two reference sets, and the split each is
REFERENCE_SPLITS = {"Test": "test", "TestSF": "test_scaffolds"}
PROPERTIES = ("logP", "SA", "QED", "weight")
FP_BITS = 1024
#: bump when what a cached reference holds changes
REFERENCE_FORMAT = 1
SA_MEMBER = "moses/metrics/SA_Score/fpscores.pkl.gz"
STATS_MEMBERS = {"test": "moses/dataset/data/test_stats.npz",
                 "test_scaffolds": "moses/dataset/data/test_scaffolds_stats.npz"}
ALLOWED_ATOMS = {"C", "N", "S", "O", "F", "Cl", "Br", "H"}


# -- the wheel -------------------------------------------------------------------------------------
_CHECKED: set[Path] = set()


def moses_wheel(cache: Path) -> Path:
    """The molsets 0.3.1 wheel that ``fetch_moses`` downloads into its cache folder (fetched the same way,
    ``pip download --no-deps``, when it is not there), sha256-checked once per process."""
    from imadarem.training.data import MOSES_WHEEL, MOSES_WHEEL_SHA256, sha256_file

    whl = Path(cache) / MOSES_WHEEL
    if not whl.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "-d", str(cache), "molsets==0.3.1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not whl.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"could not download molsets==0.3.1 with pip: {last}")
    if whl not in _CHECKED:
        digest = sha256_file(whl)
        if digest != MOSES_WHEEL_SHA256:
            raise DataError(f"{whl}: sha256 {digest} does not match the expected {MOSES_WHEEL_SHA256}")
        _CHECKED.add(whl)
    return whl


def wheel_member(cache: Path, member: str) -> Path:
    """``member`` of the MOSES wheel, extracted into ``cache`` (once)."""
    out = Path(cache) / Path(member).name
    if not out.is_file():
        with zipfile.ZipFile(moses_wheel(cache)) as zf, zf.open(member) as src:
            tmp = out.with_name(out.name + ".part")
            tmp.write_bytes(src.read())
        os.replace(tmp, out)
    return out


class _PlainUnpickler(pickle.Unpickler):
    """Lists, numbers and strings only: any class or function in the stream is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def sa_scores_file(cache: Path) -> Path:
    """The SA score's fragment contributions (the wheel's ``fpscores.pkl.gz``, a pickled list of
    ``[score, id, id, ...]``) as two plain arrays; as MOSES's ``readFragmentScores``, a later row wins."""
    cache = Path(cache)
    out = cache / "sa_fpscores.npz"
    if out.is_file():
        return out
    with gzip.open(wheel_member(cache, SA_MEMBER)) as fh:
        rows = _PlainUnpickler(fh).load()
    scores: dict[int, float] = {}
    for row in rows:
        for frag_id in row[1:]:
            scores[int(frag_id)] = float(row[0])
    tmp = out.with_name("sa_fpscores.part.npz")
    np.savez(tmp, ids=np.fromiter(scores, dtype=np.int64, count=len(scores)),
             scores=np.fromiter(scores.values(), dtype=np.float64, count=len(scores)))
    os.replace(tmp, out)
    return out


def load_sa_scores(path: Path) -> dict[int, float]:
    with np.load(path) as saved:
        return dict(zip(saved["ids"].tolist(), saved["scores"].tolist()))


def fcd_reference(cache: Path, split: str) -> Path:
    """MOSES's own FCD statistics of ``split`` (``<split>_stats.npz['stats']['FCD']``: mu, sigma, computed
    by MOSES with fcd_torch's ChemNet) as a plain-array npz; read once from the sha256-checked wheel."""
    cache = Path(cache)
    out = cache / f"{split}_fcd_reference.npz"
    if out.is_file():
        return out
    member = wheel_member(cache, STATS_MEMBERS[split])
    with np.load(member, allow_pickle=True) as raw:  # MOSES's own file, from the sha256-checked wheel
        fcd = raw["stats"].item()["FCD"]
    tmp = out.with_name(out.stem + ".part.npz")
    np.savez(tmp, mu=np.asarray(fcd["mu"], dtype=np.float64), sigma=np.asarray(fcd["sigma"], dtype=np.float64))
    os.replace(tmp, out)
    return out


# -- per molecule ----------------------------------------------------------------------------------
def _rdkit():
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    return Chem


def get_mol(smiles: str):
    """MOSES's ``get_mol``: RDKit's molecule of a non-empty SMILES that parses and sanitises, else None
    (and, beyond MOSES, None for a molecule without atoms, on which MOSES's later steps fail)."""
    Chem = _rdkit()
    if not smiles:
        return None
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    try:
        Chem.SanitizeMol(mol)
    except ValueError:
        return None
    return mol if mol.GetNumAtoms() > 0 else None


def passes_filters(mol, patterns) -> bool:
    """MOSES's ``mol_passes_filters``: no ring of 8 or more atoms, no charge, only the allowed atoms, no
    MCF/PAINS match on the molecule with explicit hydrogens (some SMARTS count hydrogens), and a SMILES
    (non-isomeric) that is not empty and parses again."""
    Chem = _rdkit()
    if any(len(r) >= 8 for r in mol.GetRingInfo().AtomRings()):
        return False
    for atom in mol.GetAtoms():
        if atom.GetFormalCharge() != 0 or atom.GetSymbol() not in ALLOWED_ATOMS:
            return False
    h_mol = Chem.AddHs(mol)
    if any(h_mol.HasSubstructMatch(p) for p in patterns):
        return False
    smiles = Chem.MolToSmiles(mol, isomericSmiles=False)
    return bool(smiles) and Chem.MolFromSmiles(smiles) is not None


_GENERATORS: dict[str, object] = {}


def _generator(kind: str):
    if kind not in _GENERATORS:
        from rdkit.Chem import rdFingerprintGenerator

        _GENERATORS[kind] = (rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=FP_BITS) if kind == "bits"
                             else rdFingerprintGenerator.GetMorganGenerator(radius=2))
    return _GENERATORS[kind]


def fingerprint_bits(mol) -> np.ndarray:
    """MOSES's Morgan fingerprint (radius 2, 1024 bits) as 0/1 uint8."""
    return _generator("bits").GetFingerprintAsNumPy(mol).astype(np.uint8)


def sa_score(mol, fscores: dict[int, float]) -> float:
    """MOSES's ``SA`` (``SA_Score/sascorer.calculateScore``, Ertl & Schuffenhauer 2009, RDKit Contrib)."""
    Chem = _rdkit()
    from rdkit.Chem import rdMolDescriptors

    fps = _generator("counts").GetSparseCountFingerprint(mol).GetNonzeroElements()  # = GetMorganFingerprint(m, 2)
    score1, nf = 0.0, 0
    for bit, v in fps.items():
        nf += v
        score1 += fscores.get(bit, -4) * v
    score1 /= nf
    n_atoms = mol.GetNumAtoms()
    n_chiral = len(Chem.FindMolChiralCenters(mol, includeUnassigned=True))
    n_bridgeheads = rdMolDescriptors.CalcNumBridgeheadAtoms(mol)
    n_spiro = rdMolDescriptors.CalcNumSpiroAtoms(mol)
    n_macrocycles = sum(len(r) > 8 for r in mol.GetRingInfo().AtomRings())
    score2 = (0.0 - (n_atoms ** 1.005 - n_atoms) - math.log10(n_chiral + 1) - math.log10(n_spiro + 1)
              - math.log10(n_bridgeheads + 1) - (math.log10(2) if n_macrocycles > 0 else 0.0))
    score3 = math.log(float(n_atoms) / len(fps)) * 0.5 if n_atoms > len(fps) else 0.0
    sascore = 11.0 - (score1 + score2 + score3 + 4.0 + 1) / 6.5 * 9.0
    if sascore > 8.0:
        sascore = 8.0 + math.log(sascore + 1.0 - 9.0)
    return min(max(sascore, 1.0), 10.0)


def properties(mol, fscores: dict[int, float]) -> tuple[float, float, float, float]:
    """logP, SA, QED, weight (MOSES's ``logP``, ``SA``, ``QED``, ``weight``)."""
    from rdkit.Chem import Crippen, Descriptors
    from rdkit.Chem.QED import qed

    return Crippen.MolLogP(mol), sa_score(mol, fscores), qed(mol), Descriptors.MolWt(mol)


def fragments(mol) -> list[str]:
    """MOSES's ``fragmenter``: the SMILES of the pieces left by breaking the BRICS bonds."""
    Chem = _rdkit()
    return Chem.MolToSmiles(Chem.FragmentOnBRICSBonds(mol)).split(".")  # = AllChem.FragmentOnBRICSBonds


def scaffold(mol, min_rings: int = 2) -> str | None:
    """MOSES's ``compute_scaffold``: the Bemis-Murcko scaffold's SMILES, None when it has fewer than
    ``min_rings`` rings (or is empty, or RDKit cannot build it)."""
    Chem = _rdkit()
    from rdkit.Chem.Scaffolds import MurckoScaffold

    try:
        scaf = MurckoScaffold.GetScaffoldForMol(mol)
    except (ValueError, RuntimeError):
        return None
    smiles = Chem.MolToSmiles(scaf)
    if smiles == "" or scaf.GetRingInfo().NumRings() < min_rings:
        return None
    return smiles


@dataclass
class Described:
    """Descriptors of a list of SMILES, as MOSES's metrics use them.

    ``valid`` is per given SMILES. For generated molecules (``generated=True``), MOSES works on the valid
    molecules' canonical SMILES (``canonical``, its ``remove_invalid``) parsed again (its ``mols``); every
    per-molecule field below is of those re-parsed molecules, and ``smiles`` is their canonical SMILES (what
    MOSES's unique@k, Novelty and FCD read). A reference set's molecules are parsed as given.
    """

    valid: np.ndarray  # bool, one per SMILES given
    canonical: list[str] = field(default_factory=list)
    smiles: list[str] = field(default_factory=list)
    lost: int = 0  # valid, but the canonical SMILES does not parse again (MOSES fails on those)
    fps: np.ndarray = field(default_factory=lambda: np.zeros((0, FP_BITS // 8), np.uint8))  # packed bits
    atoms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # heavy atoms per molecule
    props: dict[str, np.ndarray] = field(default_factory=dict)
    frag: Counter = field(default_factory=Counter)
    scaf: Counter = field(default_factory=Counter)
    filters: np.ndarray | None = None  # bool per molecule, when filter patterns were given

    @property
    def size(self) -> int:
        return len(self.fps)


_WORKER: dict[str, object] = {}


def _init_worker(filter_smarts: Sequence[str] | None, sa_path: str | None) -> None:
    Chem = _rdkit()
    _WORKER["patterns"] = None if filter_smarts is None else [Chem.MolFromSmarts(s) for s in filter_smarts]
    _WORKER["sa"] = load_sa_scores(Path(sa_path)) if sa_path else None


def _describe_chunk(task: tuple[list[str], bool, bool]) -> Described:
    smiles, generated, with_sets = task
    Chem = _rdkit()
    patterns, fscores = _WORKER.get("patterns"), _WORKER.get("sa")
    out = Described(valid=np.zeros(len(smiles), dtype=bool))
    bits, atoms, props, passes = [], [], [], []
    for k, smi in enumerate(smiles):
        mol = get_mol(smi)
        if mol is None:
            continue
        out.valid[k] = True
        if generated:
            canon = Chem.MolToSmiles(mol)
            out.canonical.append(canon)
            mol = get_mol(canon)
            if mol is None:
                out.lost += 1
                continue
            out.smiles.append(Chem.MolToSmiles(mol))
        bits.append(fingerprint_bits(mol))
        atoms.append(mol.GetNumAtoms())
        if patterns is not None:
            passes.append(passes_filters(mol, patterns))
        if with_sets:
            out.frag.update(fragments(mol))
            scaf = scaffold(mol)
            if scaf is not None:
                out.scaf[scaf] += 1
        if fscores is not None:
            props.append(properties(mol, fscores))
    out.fps = np.packbits(np.asarray(bits, dtype=np.uint8).reshape(-1, FP_BITS), axis=1)
    out.atoms = np.asarray(atoms, dtype=np.int64)
    if fscores is not None:
        values = np.asarray(props, dtype=np.float64).reshape(-1, len(PROPERTIES))
        out.props = {name: values[:, i] for i, name in enumerate(PROPERTIES)}
    if patterns is not None:
        out.filters = np.asarray(passes, dtype=bool)
    return out


def _merge(parts: list[Described]) -> Described:
    out = Described(valid=np.concatenate([p.valid for p in parts]) if parts else np.zeros(0, bool))
    for p in parts:
        out.canonical += p.canonical
        out.smiles += p.smiles
        out.lost += p.lost
        out.frag.update(p.frag)
        out.scaf.update(p.scaf)
    if parts:
        out.fps = np.concatenate([p.fps for p in parts])
        out.atoms = np.concatenate([p.atoms for p in parts])
        if parts[0].props:
            out.props = {k: np.concatenate([p.props[k] for p in parts]) for k in PROPERTIES}
        if parts[0].filters is not None:
            out.filters = np.concatenate([p.filters for p in parts])
    return out


def describe(smiles: Sequence[str], *, generated: bool, filter_smarts: Sequence[str] | None = None,
             sa_path: Path | None = None, with_sets: bool = True, n_jobs: int = 1, chunk: int = 2000,
             progress: Callable[[int, int], None] | None = None) -> Described:
    """Descriptors of ``smiles`` (see :class:`Described`): filters when ``filter_smarts`` is given, the
    four properties when ``sa_path`` (see :func:`sa_scores_file`) is, fragments and scaffolds when
    ``with_sets``; in ``n_jobs`` processes (spawned) when there are more than ``chunk`` SMILES."""
    smiles = list(smiles)
    tasks = [(smiles[i:i + chunk], generated, with_sets) for i in range(0, len(smiles), chunk)]
    init = (list(filter_smarts) if filter_smarts is not None else None, str(sa_path) if sa_path else None)
    parts: list[Described] = []
    if n_jobs <= 1 or len(tasks) <= 1:
        saved = dict(_WORKER)
        _init_worker(*init)
        try:
            for task in tasks:
                parts.append(_describe_chunk(task))
                if progress:
                    progress(sum(len(p.valid) for p in parts), len(smiles))
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
    else:
        from multiprocessing import get_context

        with get_context("spawn").Pool(min(n_jobs, len(tasks)), initializer=_init_worker, initargs=init) as pool:
            for part in pool.imap(_describe_chunk, tasks):
                parts.append(part)
                if progress:
                    progress(sum(len(p.valid) for p in parts), len(smiles))
    return _merge(parts)


# -- reference sets --------------------------------------------------------------------------------
@dataclass
class Reference:
    """One MOSES reference set: ``name`` is MOSES's ("Test", "TestSF")."""

    name: str
    fps: np.ndarray  # packed Morgan bits, [N, 128] uint8
    props: dict[str, np.ndarray]
    frag: dict[str, int]
    scaf: dict[str, int]
    fcd: tuple[np.ndarray, np.ndarray] | None = None  # MOSES's ChemNet mu, sigma
    source: str = ""


def _counter_arrays(counts: dict[str, int], prefix: str) -> dict[str, np.ndarray]:
    keys = sorted(counts)
    return {f"{prefix}_keys": np.array(keys, dtype=np.str_),
            f"{prefix}_counts": np.array([counts[k] for k in keys], dtype=np.int64)}


def build_reference(name: str, smiles: Sequence[str], sa_path: Path, n_jobs: int = 1,
                    progress: Callable[[int, int], None] | None = None) -> Reference:
    """A reference set's descriptors from its SMILES, as MOSES's ``compute_intermediate_statistics``
    (molecules parsed as given; one that does not parse is left out)."""
    d = describe(smiles, generated=False, sa_path=sa_path, n_jobs=n_jobs, progress=progress)
    return Reference(name, d.fps, d.props, dict(d.frag), dict(d.scaf))


def save_reference(ref: Reference, path: Path) -> None:
    arrays = {"fps": ref.fps, **{f"prop_{k}": v for k, v in ref.props.items()},
              **_counter_arrays(ref.frag, "frag"), **_counter_arrays(ref.scaf, "scaf")}
    tmp = path.with_name(path.stem + ".part.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def read_reference(name: str, path: Path) -> Reference:
    with np.load(path) as saved:  # plain arrays: no pickle
        return Reference(
            name, saved["fps"], {k: saved[f"prop_{k}"] for k in PROPERTIES},
            dict(zip(saved["frag_keys"].tolist(), saved["frag_counts"].tolist())),
            dict(zip(saved["scaf_keys"].tolist(), saved["scaf_counts"].tolist())), source=str(path))


def reference_cache_path(cache: Path, source: Path) -> Path:
    import rdkit
    from imadarem.training.data import sha256_file

    stem = source.name.split(".")[0]
    return Path(cache) / f"{stem}-reference-{sha256_file(source)[:16]}-rdkit{rdkit.__version__}-v{REFERENCE_FORMAT}.npz"


def load_reference(name: str, source: Path, cache: Path, n_jobs: int = 1, fcd_stats: Path | None = None,
                   log: Callable[[str], None] | None = None) -> Reference:
    """The reference set ``name`` of the SMILES file ``source``: computed once (``n_jobs`` processes) and
    cached under ``cache`` keyed by the file's sha256 and the RDKit version."""
    from imadarem.training.data import read_smiles

    cache = Path(cache)
    path = reference_cache_path(cache, Path(source))
    if not path.is_file():
        smiles = read_smiles(source)
        if log:
            log(f"MOSES {name}: computing fingerprints, fragments, scaffolds and properties of "
                f"{len(smiles):,} molecules once (minutes on 2 CPU cores); cached as {path}")
        shown = [0.0]

        def progress(done: int, total: int) -> None:
            if log and (done == total or done / total >= shown[0] + 0.1):
                shown[0] = done / total
                log(f"MOSES {name}: {done:,} / {total:,} molecules")

        ref = build_reference(name, smiles, sa_scores_file(cache), n_jobs=n_jobs, progress=progress)
        save_reference(ref, path)
    ref = read_reference(name, path)
    if fcd_stats is not None:
        with np.load(fcd_stats) as saved:
            ref.fcd = (saved["mu"], saved["sigma"])
    return ref


def moses_references(files: dict[str, Path], n_jobs: int = 1, with_fcd: bool = True,
                     log: Callable[[str], None] | None = None) -> list[Reference]:
    """MOSES's two reference sets, Test and TestSF (``files`` from ``fetch_moses``)."""
    cache = files["test"].parent
    refs = []
    for name, split in REFERENCE_SPLITS.items():
        stats = fcd_reference(cache, split) if with_fcd else None
        refs.append(load_reference(name, files[split], cache, n_jobs, stats, log))
    return refs


# -- comparing sets --------------------------------------------------------------------------------
def _popcount(packed: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(packed).sum(1, dtype=np.int64)
    return np.unpackbits(packed, axis=1).sum(1, dtype=np.int64)


def _tanimoto_blocks(gen: np.ndarray, ref: np.ndarray, gen_chunk: int = 2048, ref_chunk: int = 16384):
    """Tanimoto similarities of every packed fingerprint in ``gen`` with every one in ``ref``, in blocks:
    yields (gen offset, float32 block [g, r], "torch" or "numpy"). Intersections by matrix product, exact:
    bfloat16 with PyTorch while no fingerprint has more than 256 bits set (products of 0/1 summed in
    float32, the result an integer of at most 256), else float32. 0/0 (two empty fingerprints) is 1, as
    in MOSES."""
    try:
        import torch
    except ImportError:
        torch = None
    a, b = _popcount(gen), _popcount(ref)
    both_empty = len(a) and len(b) and a.min() == 0 and b.min() == 0
    if torch is not None:
        dtype = torch.bfloat16 if max(a.max(initial=0), b.max(initial=0)) <= 256 else torch.float32
        G = torch.from_numpy(np.unpackbits(gen, axis=1)).to(dtype)
        a_t = torch.from_numpy(a.astype(np.float32))
        for j in range(0, len(ref), ref_chunk):
            R = torch.from_numpy(np.unpackbits(ref[j:j + ref_chunk], axis=1)).to(dtype).T
            b_t = torch.from_numpy(b[j:j + ref_chunk].astype(np.float32))
            for i in range(0, len(gen), gen_chunk):
                inter = (G[i:i + gen_chunk] @ R).float()
                den = torch.add(b_t[None, :], a_t[i:i + gen_chunk, None]).sub_(inter)
                sim = inter.div_(den)
                if both_empty:
                    sim[den == 0] = 1.0
                yield i, sim, "torch"
    else:
        G = np.unpackbits(gen, axis=1).astype(np.float32)
        a_f = a.astype(np.float32)
        for j in range(0, len(ref), ref_chunk):
            R = np.unpackbits(ref[j:j + ref_chunk], axis=1).astype(np.float32).T
            b_f = b[j:j + ref_chunk].astype(np.float32)
            for i in range(0, len(gen), gen_chunk):
                inter = G[i:i + gen_chunk] @ R
                den = (b_f[None, :] + a_f[i:i + gen_chunk, None]) - inter
                with np.errstate(invalid="ignore", divide="ignore"):
                    sim = inter / den
                if both_empty:
                    sim[den == 0] = 1.0
                yield i, sim, "numpy"


def nearest_similarity(gen: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per generated fingerprint, its largest Tanimoto similarity to the reference set (MOSES's
    ``average_agg_tanimoto(ref, gen, agg='max')`` before the mean)."""
    best = np.zeros(len(gen))
    for i, sim, kind in _tanimoto_blocks(gen, ref):
        top = sim.amax(1).numpy() if kind == "torch" else sim.max(1)
        np.maximum(best[i:i + len(top)], top, out=best[i:i + len(top)])
    return best


def internal_diversities(fps: np.ndarray, powers: Sequence[int] = (1, 2)) -> dict[int, float]:
    """MOSES's ``internal_diversity(gen, p)`` for each p: 1 - mean over molecules of (mean over all
    molecules, itself included, of Tanimoto^p)^(1/p)."""
    sums = {p: np.zeros(len(fps)) for p in powers}
    for i, sim, kind in _tanimoto_blocks(fps, fps):
        for p in powers:
            block = sim if p == 1 else sim ** p
            if kind == "torch":
                import torch

                s = block.sum(1, dtype=torch.float64).numpy()
            else:
                s = block.sum(1, dtype=np.float64)
            sums[p][i:i + len(s)] += s
    n = max(len(fps), 1)
    return {p: float(1 - np.mean((sums[p] / n) ** (1 / p))) if len(fps) else float("nan") for p in powers}


def cosine_similarity(ref: dict[str, int], gen: dict[str, int]) -> float:
    """MOSES's ``cos_similarity`` of two count dictionaries (absent keys count 0), in float64: MOSES passes
    int64 vectors to SciPy's ``cosine``, whose product of squared norms overflows on test-set fragment
    counts (and then gives 1.0)."""
    if not ref or not gen:
        return float("nan")
    keys = set(ref) | set(gen)
    r = np.array([ref.get(k, 0) for k in keys], dtype=np.float64)
    g = np.array([gen.get(k, 0) for k in keys], dtype=np.float64)
    return float(np.dot(r, g) / math.sqrt(np.dot(r, r) * np.dot(g, g)))


def wasserstein(u: np.ndarray, v: np.ndarray) -> float:
    """``scipy.stats.wasserstein_distance(u, v)`` of two samples (1-D, unweighted): the area between their
    empirical distribution functions."""
    u, v = np.sort(np.asarray(u, dtype=np.float64)), np.sort(np.asarray(v, dtype=np.float64))
    if not len(u) or not len(v):
        return float("nan")
    values = np.sort(np.concatenate([u, v]))
    deltas = np.diff(values)
    u_cdf = np.searchsorted(u, values[:-1], "right") / len(u)
    v_cdf = np.searchsorted(v, values[:-1], "right") / len(v)
    return float(np.sum(np.abs(u_cdf - v_cdf) * deltas))

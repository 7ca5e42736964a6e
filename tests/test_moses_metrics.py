"""``imadarem eval molecules`` reports MOSES's metrics as MOSES's own code computes them.

MOSES's code (``moses.metrics`` of the molsets 0.3.1 wheel, MIT) is extracted from the sha256-checked wheel
into a temporary folder, the traps of today's libraries patched there (pandas >= 2 has no
``DataFrame.append``, numpy 2 no ``np.NaN``, RDKit no ``rdkit.six``; fcd_torch 1.0.7, MOSES's FCD, needs
``torch.load(weights_only=False)`` and ``np.vstack``), and imported for these tests only. Both sides score the
same generated SMILES (``fixtures/moses_generated_sample.smi``: MOSES test molecules, other writings of them,
duplicates, invalid strings, charged, macrocyclic, PAINS-like and tiny molecules) against the same small
reference subsets of MOSES's test and scaffold-test splits.
"""

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import FIXTURES

pytest.importorskip("rdkit")

GENERATED = FIXTURES / "moses_generated_sample.smi"
FCD_TORCH_WHEEL = "fcd_torch-1.0.7-py3-none-any.whl"
FCD_TORCH_SHA256 = "63a24aae88c554a7ba6422cffdef3ad7c1befec73f835b70ead04097a1ebed6f"
TOL = 0.005  # absolute, every metric but FCD
FCD_RTOL = 0.01


def _patch(path, old, new):
    text = path.read_text()
    assert old in text, f"{path}: {old!r} not found (is this still molsets 0.3.1?)"
    path.write_text(text.replace(old, new))


def _rows(path, start, stop):
    with gzip.open(path, "rt") as fh:
        next(fh)  # SMILES
        rows = []
        for i, line in enumerate(fh):
            if i >= stop:
                break
            if i >= start:
                rows.append(line.strip())
    return rows


def _fcd_torch_wheel(cache):
    whl = cache / FCD_TORCH_WHEEL
    if not whl.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "-d", str(cache), "fcd_torch==1.0.7"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0 and whl.is_file(), f"could not download fcd_torch 1.0.7: {proc.stderr[-500:]}"
    assert hashlib.sha256(whl.read_bytes()).hexdigest() == FCD_TORCH_SHA256
    return whl


@pytest.fixture(scope="module")
def moses_files():
    from imadarem.training.data import fetch_moses

    return fetch_moses()


@pytest.fixture(scope="module")
def cache(moses_files):
    return moses_files["test"].parent


@pytest.fixture(scope="module")
def sa_path(cache):
    from imadarem.training.evaluation import moses_reference as mr

    return mr.sa_scores_file(cache)


@pytest.fixture(scope="module")
def moses(cache, tmp_path_factory):
    """MOSES's ``moses.metrics.metrics`` module, importable while this module's tests run."""
    pytest.importorskip("torch")
    pytest.importorskip("pandas")
    pytest.importorskip("scipy")
    from imadarem.training.evaluation import moses_reference as mr

    root = tmp_path_factory.mktemp("moses-code")
    wanted = ("moses/metrics/", "moses/dataset/__init__.py", "moses/dataset/dataset.py", "moses/utils.py",
              *mr.STATS_MEMBERS.values())
    with zipfile.ZipFile(mr.moses_wheel(cache)) as zf:
        zf.extractall(root, [n for n in zf.namelist() if n.startswith(wanted)])
    with zipfile.ZipFile(_fcd_torch_wheel(cache)) as zf:
        zf.extractall(root, [n for n in zf.namelist() if n.startswith("fcd_torch/")])
    (root / "moses" / "__init__.py").write_text("")  # MOSES's imports every model
    utils = root / "moses" / "metrics" / "utils.py"
    _patch(utils, "_mcf.append(_pains, sort=True)", "pd.concat([_mcf, _pains], sort=True)")
    _patch(utils, "np.NaN", "np.nan")
    _patch(root / "moses" / "metrics" / "SA_Score" / "sascorer.py", "from rdkit.six import iteritems",
           "iteritems = dict.items")
    _patch(root / "fcd_torch" / "fcd.py", "torch.load(model_path)", "torch.load(model_path, weights_only=False)")
    _patch(root / "fcd_torch" / "fcd.py", "np.row_stack", "np.vstack")
    _patch(root / "fcd_torch" / "utils.py", "covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)",
           "covmean = linalg.sqrtm(sigma1.dot(sigma2))")
    sys.path.insert(0, str(root))
    try:
        import moses.metrics.metrics as mm

        yield mm
    finally:
        sys.path.remove(str(root))
        for name in list(sys.modules):
            if name.split(".")[0] in ("moses", "fcd_torch"):
                del sys.modules[name]


@pytest.fixture(scope="module")
def sample(moses_files):
    """Generated SMILES, the two reference subsets and a train subset (MOSES's splits, disjoint rows)."""
    gen = GENERATED.read_text().splitlines()
    return {"gen": gen, "Test": _rows(moses_files["test"], 1000, 1500),
            "TestSF": _rows(moses_files["test_scaffolds"], 0, 500), "train": _rows(moses_files["train"], 0, 3000)}


@pytest.fixture(scope="module")
def references(sample, sa_path):
    from imadarem.training.evaluation import moses_reference as mr

    return [mr.build_reference(name, sample[name], sa_path) for name in ("Test", "TestSF")]


class _NoFCD:  # MOSES's FCD is compared on its own below (it needs ChemNet)
    def __init__(self, *args, **kwargs):
        pass

    def precalc(self, smiles):
        return {}

    def __call__(self, *args, **kwargs):
        return float("nan")


def test_every_metric_but_fcd_matches_moses(moses, moses_files, sample, references, sa_path, monkeypatch):
    from imadarem.training.evaluation.molecules import load_filters, molecule_metrics

    monkeypatch.setattr(moses, "FCDMetric", _NoFCD)
    theirs = moses.get_all_metrics(sample["gen"], k=[100, 250], n_jobs=1, device="cpu", test=sample["Test"],
                                   test_scaffolds=sample["TestSF"], train=sample["train"])
    ours = molecule_metrics(sample["gen"], set(sample["train"]), load_filters(moses_files), references=references,
                            ks=(100, 250), sa_path=sa_path, legacy_keys=False)
    compared = {k: v for k, v in theirs.items() if not k.startswith("FCD/")}
    assert set(compared) == {"valid", "unique@100", "unique@250", "SNN/Test", "SNN/TestSF", "Frag/Test",
                             "Frag/TestSF", "Scaf/Test", "Scaf/TestSF", "IntDiv", "IntDiv2", "Filters", "logP",
                             "SA", "QED", "weight", "Novelty"}
    off = {k: (ours.get(k), float(v)) for k, v in compared.items() if not abs(ours.get(k, np.inf) - v) <= TOL}
    assert not off, off
    # not a trivial sample: some molecules invalid, some repeated, some failing the filters, some known
    assert 0.9 < ours["valid"] < 1 and ours["unique@250"] < 1 and 0.8 < ours["Filters"] < 1 and ours["Novelty"] < 1
    assert ours["IntDiv_molecules"] == round(ours["valid"] * len(sample["gen"]))  # all of them, as MOSES


def test_reference_descriptors_match_moses(moses, sample, references):
    """What SNN, Frag, Scaf and the property distances read of a reference set, molecule by molecule."""
    from imadarem.training.evaluation import moses_reference as mr

    mols = [moses.get_mol(s) for s in sample["Test"]]
    ours = references[0]
    np.testing.assert_array_equal(np.unpackbits(ours.fps, axis=1), moses.SNNMetric().precalc(mols)["fps"])
    assert ours.frag == dict(moses.FragMetric().precalc(mols)["frag"])
    assert ours.scaf == dict(moses.ScafMetric().precalc(mols)["scaf"])
    for name, func in (("logP", moses.logP), ("SA", moses.SA), ("QED", moses.QED), ("weight", moses.weight)):
        np.testing.assert_allclose(ours.props[name], moses.WassersteinMetric(func).precalc(mols)["values"],
                                   rtol=0, atol=1e-9, err_msg=name)
    assert len(mr.PROPERTIES) == 4


def test_fcd_matches_moses_against_its_own_statistics(moses, moses_files, cache, sample, references):
    """FCD/Test and FCD/TestSF: the ``fcd`` package's ChemNet on our side, fcd_torch's (MOSES's) on theirs,
    both against MOSES's stored statistics of the full test and scaffold-test splits."""
    pytest.importorskip("fcd")
    from imadarem.training.data import moses_fcd_reference
    from imadarem.training.evaluation import moses_reference as mr
    from imadarem.training.evaluation.molecules import FrechetChemNet, molecule_metrics
    from moses.dataset import get_statistics

    valid = moses.remove_invalid(sample["gen"], canonize=True)
    theirs = {f"FCD/{name}": moses.FCDMetric(n_jobs=1, device="cpu")(gen=valid, pref=get_statistics(split)["FCD"])
              for name, split in mr.REFERENCE_SPLITS.items()}
    chemnet = FrechetChemNet(moses_files["test"], cache, device="cpu", reference_stats=moses_fcd_reference(moses_files))
    for ref in references:
        with np.load(mr.fcd_reference(cache, mr.REFERENCE_SPLITS[ref.name])) as saved:
            ref.fcd = (saved["mu"], saved["sigma"])
    ours = molecule_metrics(sample["gen"], set(), [], fcd=chemnet, references=references, legacy_keys=False)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=FCD_RTOL), (key, ours[key], value)
    assert theirs["FCD/TestSF"] > theirs["FCD/Test"] > 1  # a few hundred molecules: far from either split


def test_similarities_agree_three_ways(sample, references, monkeypatch):
    """SNN's and IntDiv's Tanimoto blocks: PyTorch bfloat16, numpy float32 and RDKit's own Tanimoto."""
    from imadarem.training.evaluation import moses_reference as mr
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    gen = [m for m in (mr.get_mol(s) for s in sample["gen"][:120]) if m is not None]
    fps = np.packbits(np.stack([mr.fingerprint_bits(m) for m in gen]), axis=1)
    ref = references[1].fps
    snn, div = mr.nearest_similarity(fps, ref), mr.internal_diversities(fps)
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024)
    gen_fp = [generator.GetFingerprint(m) for m in gen]
    ref_fp = [generator.GetFingerprint(Chem.MolFromSmiles(s)) for s in sample["TestSF"]]
    rd_snn = [max(DataStructs.BulkTanimotoSimilarity(f, ref_fp)) for f in gen_fp]
    rd_sims = np.array([DataStructs.BulkTanimotoSimilarity(f, gen_fp) for f in gen_fp])
    np.testing.assert_allclose(snn, rd_snn, atol=1e-6)
    assert div[1] == pytest.approx(1 - np.mean(rd_sims.mean(1)), abs=1e-6)
    assert div[2] == pytest.approx(1 - np.mean(np.sqrt((rd_sims ** 2).mean(1))), abs=1e-6)
    monkeypatch.setitem(sys.modules, "torch", None)  # the numpy path (no PyTorch)
    np.testing.assert_allclose(mr.nearest_similarity(fps, ref), snn, atol=1e-6)
    assert mr.internal_diversities(fps)[2] == pytest.approx(div[2], abs=1e-6)


def test_dense_fingerprints_stay_exact():
    """More than 256 bits set: bfloat16 could not hold the intersection, float32 is used."""
    from imadarem.training.evaluation import moses_reference as mr

    rng = np.random.default_rng(0)
    bits = (rng.random((40, 1024)) < 0.4).astype(np.uint8)
    bits[0] = 0  # an empty fingerprint: 0/0 is 1 with another empty one, as MOSES
    bits[1] = 0
    inter = bits.astype(np.int64) @ bits.T.astype(np.int64)
    counts = bits.sum(1)
    union = counts[:, None] + counts[None, :] - inter
    exact = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    packed = np.packbits(bits, axis=1)
    assert mr.internal_diversities(packed)[1] == pytest.approx(1 - exact.mean(1).mean(), abs=1e-6)
    np.testing.assert_allclose(mr.nearest_similarity(packed[:10], packed[10:]), exact[:10, 10:].max(1), atol=1e-6)


def test_count_cosine_does_not_overflow():
    """MOSES's test-set fragment counts reach 10^5 per fragment; int64 sums of squares times each other
    overflow (SciPy's ``cosine`` then says 1.0): counted in float64 here."""
    from imadarem.training.evaluation import moses_reference as mr

    ref = {f"f{i}": 90_000 + 7 * i for i in range(3000)}
    gen = {f"f{i}": 5_000 + (i % 13) for i in range(0, 3000, 2)} | {"new": 40_000}
    dot = sum(ref[k] * gen.get(k, 0) for k in ref)
    exact = dot / (sum(v * v for v in ref.values()) * sum(v * v for v in gen.values())) ** 0.5
    assert mr.cosine_similarity(ref, gen) == pytest.approx(exact, rel=1e-12)
    assert mr.cosine_similarity({}, gen) != mr.cosine_similarity({}, gen)  # nan, as MOSES


def test_wasserstein_is_scipys():
    scipy_stats = pytest.importorskip("scipy.stats")
    from imadarem.training.evaluation import moses_reference as mr

    rng = np.random.default_rng(1)
    u, v = rng.normal(size=300), np.round(rng.normal(0.3, 2, size=77), 1)  # ties too
    assert mr.wasserstein(u, v) == pytest.approx(scipy_stats.wasserstein_distance(u, v), rel=1e-12)


def test_processes_give_what_one_process_gives(moses_files, sa_path):
    from imadarem.training.evaluation import moses_reference as mr
    from imadarem.training.evaluation.molecules import load_filters

    smiles = GENERATED.read_text().splitlines() * 2
    kw = dict(generated=True, filter_smarts=load_filters(moses_files), sa_path=sa_path, chunk=150)
    one, two = mr.describe(smiles, n_jobs=1, **kw), mr.describe(smiles, n_jobs=2, **kw)
    np.testing.assert_array_equal(one.valid, two.valid)
    np.testing.assert_array_equal(one.fps, two.fps)
    np.testing.assert_array_equal(one.filters, two.filters)
    assert one.smiles == two.smiles and one.frag == two.frag and one.scaf == two.scaf
    for name in mr.PROPERTIES:
        np.testing.assert_array_equal(one.props[name], two.props[name])


def test_a_reference_is_computed_once_per_file_content(tmp_path, moses_files, sa_path, monkeypatch):
    from imadarem.training.evaluation import moses_reference as mr

    shutil.copy(sa_path, tmp_path / sa_path.name)
    source = tmp_path / "test.csv"
    source.write_text("SMILES\n" + "\n".join(_rows(moses_files["test"], 0, 60)) + "\n")
    first = mr.load_reference("Test", source, tmp_path)
    cached = list(tmp_path.glob("test-reference-*.npz"))
    assert len(cached) == 1 and first.fps.shape == (60, 128)
    monkeypatch.setattr(mr, "build_reference", lambda *a, **k: pytest.fail("recomputed"))
    again = mr.load_reference("Test", source, tmp_path)
    np.testing.assert_array_equal(again.fps, first.fps)
    assert again.frag == first.frag and again.scaf == first.scaf
    np.testing.assert_array_equal(again.props["QED"], first.props["QED"])
    monkeypatch.undo()
    source.write_text("SMILES\n" + "\n".join(_rows(moses_files["test"], 0, 50)) + "\n")
    assert mr.load_reference("Test", source, tmp_path).fps.shape == (50, 128)  # new content, new entry
    assert len(list(tmp_path.glob("test-reference-*.npz"))) == 2


def test_cli_scores_a_file_under_moses_names(tmp_path, moses_files, sa_path):
    """``imadarem eval molecules --samples``: MOSES's names in the table and the JSON (a small stand-in for
    the MOSES folder, so the reference sets take seconds)."""
    moses_dir = tmp_path / "moses"
    moses_dir.mkdir()
    for name in ("mcf", "pains"):
        shutil.copy(moses_files[name], moses_dir / moses_files[name].name)
    shutil.copy(sa_path, moses_dir / sa_path.name)
    (moses_dir / "test_stats.npz").write_bytes(b"")  # not read without FCD
    for split, (start, stop) in {"train": (0, 400), "test": (0, 150), "test_scaffolds": (0, 150)}.items():
        with gzip.open(moses_dir / f"{split}.csv.gz", "wt") as fh:
            fh.write("SMILES\n" + "\n".join(_rows(moses_files[split], start, stop)) + "\n")
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-c", "from imadarem.runtime.cli import main; main()", "eval", "molecules", "--samples",
           str(GENERATED), "--no-fcd", "--moses-cache", str(moses_dir), "--jobs", "1", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0]
    for name in ("valid", "unique@1000", "SNN/Test", "Frag/TestSF", "Scaf/Test", "IntDiv2", "Filters", "Novelty",
                 "logP", "SA", "QED", "weight"):
        assert f" {name} |" in header, name
    (row,) = json.loads(out.read_text())
    assert row["samples"] == str(GENERATED) and row["n"] == 304 and "unique@1000" not in row  # n < 1000
    assert 0 < row["SNN/TestSF"] < 1 and 0 < row["Frag/Test"] <= 1 and row["IntDiv_molecules"] > 250
    assert "fcd" not in row and "novelty" not in row  # MOSES's names only


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("IMADAREM_FULL_REFERENCES"),
                    reason="builds MOSES's full reference sets (~10 min on 2 cores): set IMADAREM_FULL_REFERENCES=1")
def test_full_references_match_the_statistics_moses_stored(moses_files, cache):
    """The reference sets computed from MOSES's SMILES with today's RDKit (cached; about 5 minutes each on
    2 cores the first time) against those MOSES stored in 2020 (``<split>_stats.npz``): 6 molecules of each
    176k split get other fingerprints and properties today, which moves no metric."""
    import os

    from imadarem.training.evaluation import moses_reference as mr

    for name, split in mr.REFERENCE_SPLITS.items():
        ref = mr.load_reference(name, moses_files[split], cache, n_jobs=os.cpu_count() or 1)
        with np.load(mr.wheel_member(cache, mr.STATS_MEMBERS[split]), allow_pickle=True) as raw:  # MOSES's own
            stored = raw["stats"].item()
        same = (np.unpackbits(ref.fps, axis=1) == stored["SNN"]["fps"]).all(1)
        assert len(same) > 170_000 and (~same).sum() <= 10, (name, (~same).sum())
        assert mr.cosine_similarity(ref.frag, stored["Frag"]["frag"]) > 0.99999
        assert mr.cosine_similarity(ref.scaf, stored["Scaf"]["scaf"]) > 0.99999
        for prop in mr.PROPERTIES:
            assert mr.wasserstein(ref.props[prop], stored[prop]["values"]) < 1e-4, (name, prop)

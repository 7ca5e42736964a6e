"""``imadarem eval fragments``: the suites (GenMol's 10 drugs, prompts cut from MOSES by the same rules), GenMol's
metrics as its code computes them (checked against an independent computation the way GenMol and TDC do it:
RDKit's Contrib SA scorer, ``AllChem`` Morgan bit vectors), superstructure prompts, the prefix form a
left-to-right model gets, and the grid pictures.
"""

import json
import os
import sys

import numpy as np
import pytest
from conftest import FIXTURES

Chem = pytest.importorskip("rdkit.Chem")

from imadarem.chem import fragments as fr  # noqa: E402  (after the RDKit skip)
from imadarem.chem import suites  # noqa: E402
from imadarem.runtime.cli import cli  # noqa: E402
from test_fragments import GENMOL_FRAGMENTS  # noqa: E402


@pytest.fixture(scope="module")
def sa_path():
    from imadarem.training.data import fetch_moses
    from imadarem.training.evaluation import moses_reference as mr

    return mr.sa_scores_file(fetch_moses()["test"].parent)


# -- suites ---------------------------------------------------------------------------------------------------

def test_the_shipped_genmol_suite_is_genmols_csv():
    cases = suites.load_suite("genmol")
    assert len(cases) == 40
    for name, smiles, *prompts in GENMOL_FRAGMENTS:
        for task, prompt in zip(suites.TASKS, prompts):
            assert suites.FragmentCase(name, task, smiles, prompt) in cases


def test_our_cuts_give_genmols_decoration_and_superstructure_prompts_and_half_its_linkers():
    def bare(smiles):  # attachment labels aside
        import re

        return Chem.CanonSmiles(re.sub(r"\[\d+\*\]", "*", smiles))

    rng = np.random.default_rng(0)
    linkers = 0
    for case in suites.load_suite("genmol"):
        if case.task in ("scaffold_decoration", "superstructure_generation"):
            assert Chem.CanonSmiles(suites.cut_case(case.original, case.task, rng)) == Chem.CanonSmiles(case.prompt)
        elif case.task == "linker_design":
            cuts = suites._linker_cuts(Chem.MolFromSmiles(case.original))
            want = sorted(map(bare, case.prompt.split(".")))
            linkers += any(sorted(map(bare, cut)) == want for cut in cuts)
    assert linkers == 5  # GenMol's other five cut bonds BRICS keeps, or one bond only


def test_the_moses_suite_has_60_prompts_per_task_each_held_by_its_molecule():
    cases = suites.load_suite("moses")
    assert [sum(c.task == t for c in cases) for t in suites.TASKS] == [60] * 4
    assert len({c.name for c in cases}) == 240  # no molecule serves two tasks
    kinds = {"linker_design": "linker", "motif_extension": "decoration", "scaffold_decoration": "decoration",
             "superstructure_generation": "superstructure"}
    for case in cases:
        task = fr.parse_fragment_prompt(case.prompt)
        assert task.kind == kinds[case.task]
        assert fr.keeps(task, case.original)


def test_an_unknown_suite_or_task_is_named():
    with pytest.raises(ValueError, match="unknown fragment suite 'chembl'"):
        suites.load_suite("chembl")
    with pytest.raises(ValueError, match="unknown fragment task"):
        suites.cut_case("CCO", "growing", np.random.default_rng(0))


# -- superstructure and prefix prompts ------------------------------------------------------------------------

def test_a_superstructure_prompt_is_marked_and_refuses_attachment_points():
    from imadarem.chem.plugin import looks_like_fragment_prompt

    assert fr.parse_fragment_prompt("superstructure:c1ccncc1").kind == "superstructure"
    assert looks_like_fragment_prompt("superstructure:c1ccncc1") and not looks_like_fragment_prompt("c1ccncc1")
    with pytest.raises(ValueError, match="has attachment points"):
        fr.parse_fragment_prompt("superstructure:*c1ccncc1")


def test_superstructure_prompts_run_through_the_generator():
    from imadarem.runtime import Generator

    gen = Generator(FIXTURES / "pinned" / "refine.onnx")  # 8 SELFIES symbols
    samples = gen.generate(10, prompt="superstructure:OCC=O", seed=0, batch_size=4)
    assert all(s.kept for s in samples), [s.text for s in samples]
    assert all(fr.keeps(fr.parse_fragment_prompt("OCC=O"), s.text) for s in samples)


@pytest.mark.parametrize("prompt, prefix", [
    ("[1*]c1cccc(Nc2ncnc3cc([2*])c([3*])cc23)c1", "[1*]c1cccc(Nc2ncnc3ccccc23)c1"),
    ("[2*]C#C.[14*]OCCOC", "[2*]C#C"),
    ("[14*]OCCOC", "[14*]OCCOC"),
    ("c1ccc(Oc2ccccc2)cc1", "superstructure:c1ccc(Oc2ccccc2)cc1"),
])
def test_a_left_to_right_model_gets_one_fragment_with_one_attachment_point(prompt, prefix):
    task = fr.parse_fragment_prompt(prompt)
    assert fr.prefix_prompt(task) == prefix
    kind = fr.parse_fragment_prompt(prefix)
    assert kind.kind != "linker" and Chem.MolFromSmiles(kind.fragments[0].replace("superstructure:", "")) is not None


# -- GenMol's metrics ----------------------------------------------------------------------------------------

def _genmol_way(original, texts, query, num):
    """GenMol's scripts/exps/frag/run.py on one prompt, with TDC's oracles as they compute: RDKit's Contrib
    SA scorer, QED, ``AllChem`` Morgan bit vectors (2,048 bits for diversity, 1,024 for distance)."""
    from rdkit import DataStructs, RDConfig
    from rdkit.Chem import QED, AllChem

    sys.path.append(os.path.join(RDConfig.RDContribDir, "SA_Score"))
    import sascorer

    kept = []
    for text in texts:
        mol = Chem.MolFromSmiles(text) if text else None
        if mol is not None and mol.HasSubstructMatch(query):
            kept.append(Chem.MolToSmiles(mol))
    distinct = sorted(set(kept))
    mols = [Chem.MolFromSmiles(s) for s in distinct]
    fps = [AllChem.GetMorganFingerprintAsBitVect(m, 2, nBits=2048) for m in mols]
    pairs = [1 - DataStructs.TanimotoSimilarity(a, b) for i, a in enumerate(fps) for b in fps[i + 1:]]
    ref = AllChem.GetMorganFingerprintAsBitVect(Chem.MolFromSmiles(original), 2, 1024)
    dist = DataStructs.BulkTanimotoSimilarity(ref, [AllChem.GetMorganFingerprintAsBitVect(m, 2, 1024) for m in mols],
                                              returnDistance=True)
    good = sum(QED.qed(m) >= 0.6 and sascorer.calculateScore(m) <= 4 for m in mols)
    return {"validity": len(kept) / num, "uniqueness": len(distinct) / len(kept), "quality": good / num,
            "diversity": float(np.mean(pairs)), "distance": float(np.mean(dist))}


def test_prompt_metrics_are_genmols(sa_path):
    from imadarem.training.evaluation.fragments import PromptScorer

    original = "C#Cc1cccc(Nc2ncnc3cc(OCCOC)c(OCCOC)cc23)c1"  # ERLOTINIB; its motif [14*]OCCOC
    task = fr.parse_fragment_prompt("[14*]OCCOC")
    texts = [original, original, "COCCOc1ccccc1", "COCCOC(=O)c1ccc(N)cc1", "COCCOCc1ccncc1O",
             "COCCNc1ccccc1", "C1CC(", "", "CCOCCOC1=CC=CC=C1", "COCCOc1ccc(C(=O)NC2CC2)cc1"]
    ours = PromptScorer(sa_path)(task, original, texts, num_samples=len(texts))
    theirs = _genmol_way(original, texts, task.query(), len(texts))
    for metric, value in theirs.items():
        assert ours[metric] == pytest.approx(value, abs=1e-9), metric
    assert ours["valid"] == 0.8 and ours["kept"] == 7 / 8
    from rdkit.Chem import QED

    read = [Chem.MolFromSmiles(t) for t in texts if t]
    distinct = {Chem.MolToSmiles(m) for m in read if m is not None and m.HasSubstructMatch(task.query())}
    mols = [Chem.MolFromSmiles(t) for t in distinct]

    assert ours["qed_ok"] == pytest.approx(sum(QED.qed(m) >= 0.6 for m in mols) / len(texts))
    assert ours["quality"] <= min(ours["qed_ok"], ours["sa_ok"]) and ours["sa_ok"] > 0
    assert ours["macrocycles"] == 0.0
    ring = PromptScorer(sa_path)(task, original, ["COCCOC1CCCCCCCCC1", "COCCOC1CCCCC1"], num_samples=2)
    assert ring["macrocycles"] == 0.5  # a ten-membered ring; a six-membered one


def test_no_kept_molecule_counts_zero_as_genmol_does(sa_path):
    from imadarem.training.evaluation.fragments import PromptScorer

    row = PromptScorer(sa_path)(fr.parse_fragment_prompt("[1*]c1ccccc1"), "c1ccccc1C", ["CCO", "C1CC("], 2)
    assert row["validity"] == row["uniqueness"] == row["quality"] == 0.0
    assert "diversity" not in row and "distance" not in row


@pytest.mark.slow  # ~5 s of generation and scoring: CI's slow pass (the README command stays under 5 minutes)
def test_eval_fragments_end_to_end(tmp_path):
    """The bundled (left-to-right) model on GenMol's motif prompts: rows, prefix prompts, JSON, grids."""
    from test_cli_contract import in_process

    out = tmp_path / "frag.json"
    code, stdout, err = in_process(["eval", "fragments", "--task", "motif_extension", "--task",
                                    "superstructure_generation", "--samples", "3", "--seeds", "0",
                                    "--json", str(out), "--grid", str(tmp_path / "grids")], "imadarem", cli)
    assert code == 0, err
    assert "| motif_extension | default (fragment as prefix) |" in stdout
    assert "| motif_extension | GenMol (published) |" in stdout
    (result,) = json.loads(out.read_text())
    assert result["prefix_prompts"] and result["seeds"] == [0]
    assert len(result["prompts"]) == 2 * 10
    for row in result["tasks"].values():
        assert row["prompts"] == 10 and 0 <= row["quality"] <= row["validity"] <= 1
    assert sorted(p.name for p in (tmp_path / "grids" / "default").iterdir()) == [
        "motif_extension.svg", "superstructure_generation.svg"]


@pytest.mark.parametrize("args, says", [(["--task", "growing"], "unknown fragment task"),
                                        (["--seeds", "a,b"], "--seeds"),
                                        (["--suite", "chembl"], "chembl")])
def test_eval_fragments_bad_options_are_one_line(args, says):
    from test_cli_contract import in_process

    code, out, err = in_process(["eval", "fragments", *args], "imadarem", cli)
    assert code == 2 and says in err and err.strip().count("\n") == 0, err


# -- pictures ------------------------------------------------------------------------------------------------

def test_run_grid_draws_the_samples_with_the_fragment_highlighted(tmp_path):
    from test_cli_contract import in_process

    picture = tmp_path / "grid.svg"
    code, out, err = in_process([str(FIXTURES / "pinned" / "refine.onnx"), "--prompt", "N*.O*", "-n", "6",
                                 "--seed", "0", "--grid", str(picture)])
    assert code == 0, err
    svg = picture.read_text()
    assert svg.startswith("<?xml") and svg.rstrip().endswith("</svg>")
    assert "#FF7F7F" in svg.upper()  # RDKit's highlight colour: the fragments are marked
    code, _, err = in_process([str(FIXTURES / "pinned" / "refine.onnx"), "-n", "6", "--seed", "0", "--grid",
                               str(tmp_path / "plain.svg")])
    assert code == 0 and "#FF7F7F" not in (tmp_path / "plain.svg").read_text().upper()


@pytest.mark.parametrize("name, says", [("grid.txt", "writes .svg or .png"), (".", "is a directory")])
def test_run_grid_refuses_a_file_it_cannot_write_before_generating(tmp_path, name, says):
    from test_cli_contract import in_process

    code, out, err = in_process([str(FIXTURES / "pinned" / "refine.onnx"), "-n", "2", "--grid",
                                 str(tmp_path / name)])
    assert code == 2 and out == "" and says in err and err.count("\n") == 1, err


# -- redrawing samples that lost their fragments ------------------------------------------------------------

def _flaky_keeps(monkeypatch):
    """FragmentPrompts.keeps that fails every other first draw (by call order) and keeps every redraw."""
    from imadarem.chem.plugin import FragmentPrompts

    calls = []
    real = FragmentPrompts.keeps

    def keeps(self, prompt, text):
        calls.append(text)
        return real(self, prompt, text) and (len(calls) > 12 or len(calls) % 2 == 0)

    monkeypatch.setattr(FragmentPrompts, "keeps", keeps)
    return calls


def test_a_sample_that_lost_its_fragments_is_drawn_again(monkeypatch):
    from imadarem.runtime import Generator

    gen = Generator(FIXTURES / "pinned" / "refine.onnx")
    once = gen.generate(12, prompt="N*.O*", seed=0, batch_size=5, retries=0)
    calls = _flaky_keeps(monkeypatch)
    redrawn = gen.generate(12, prompt="N*.O*", seed=0, batch_size=5)
    assert len(calls) == 12 + 6
    assert all(s.kept for s in redrawn) and sorted(s.attempts for s in redrawn) == [1] * 6 + [2] * 6
    for first, again in zip(once, redrawn):
        if again.attempts == 1:
            assert again.ids == first.ids and again.steps == first.steps
        else:  # a new draw (layout and randomness), whose calls add to the first draw's
            assert again.steps > first.steps
    calls.clear()
    assert [s.ids for s in gen.generate(12, prompt="N*.O*", seed=0, batch_size=3)] == [s.ids for s in redrawn]


def test_retries_are_bounded_and_checked(monkeypatch):
    from imadarem.chem.plugin import FragmentPrompts
    from imadarem.runtime import Generator, ImadaremError

    gen = Generator(FIXTURES / "pinned" / "refine.onnx")
    monkeypatch.setattr(FragmentPrompts, "keeps", lambda self, prompt, text: False)
    samples = gen.generate(3, prompt="N*", seed=1, retries=2)
    assert [s.attempts for s in samples] == [3, 3, 3] and not any(s.kept for s in samples)
    for bad in (-1, 101, 1.5, True):
        with pytest.raises(ImadaremError, match="retries must be an integer in"):
            gen.generate(1, prompt="N*", retries=bad)

"""The one Generator: models by path or bundled name, cancellation, raw batch results, and the PyTorch
strategies driven by the same batch loop."""

import json
import threading

import pytest
from conftest import FIXTURES
from imadarem.runtime import Cancelled, Generator, ModelFileError, open_model
from imadarem.runtime.cli import main
from imadarem.runtime.models import bundled, bundled_path, default_model_path

PINNED = FIXTURES / "pinned"
needs_bundled = pytest.mark.skipif(default_model_path() is None, reason="no bundled model")
needs_refine = pytest.mark.skipif(bundled_path("refine") is None, reason="no bundled refine model")


@needs_bundled
def test_a_bundled_model_is_chosen_by_name_and_a_path_wins_over_a_name(tmp_path, monkeypatch):
    assert Generator("default").model.path == Generator().model.path == str(default_model_path())
    with pytest.raises(ModelFileError, match=r"model file not found: nope \(bundled models: default"):
        Generator("nope")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").write_text("not a model")
    with pytest.raises(ModelFileError, match="not a readable ONNX model"):
        Generator("default")  # the local file, not the bundled model


def test_a_path_that_is_not_a_regular_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(ModelFileError, match="is not a regular file"):
        open_model(tmp_path)
    with pytest.raises(ModelFileError, match="is not a regular file"):
        open_model("/dev/null")


def test_open_model_names_the_format_it_expected():
    with pytest.raises(ModelFileError, match="a causal model file .* where a refine one was expected"):
        open_model(PINNED / "causal.onnx", expect="refine")
    assert open_model(PINNED / "decode.onnx").format_name == "decode"


def test_cancel_stops_between_model_calls():
    gen = Generator(PINNED / "refine.onnx")
    cancel = threading.Event()
    stream = gen.iter_generate(40, batch_size=10, seed=0, cancel=cancel)
    first = [next(stream) for _ in range(10)]
    assert len(first) == 10
    cancel.set()
    with pytest.raises(Cancelled):
        next(stream)


@pytest.mark.parametrize("name", ["refine.onnx", "causal.onnx", "decode.onnx"])
def test_iter_results_are_the_samples_before_they_are_built(name):
    gen = Generator(PINNED / name)
    results = list(gen.iter_results(7, seed=2, batch_size=3))
    assert [r.ids.shape[0] for r in results] == [3, 3, 1]
    samples = gen.generate(7, seed=2, batch_size=3)
    built = [s for r in results for s in gen.samples(r)]
    assert [s.ids for s in built] == [s.ids for s in samples] and [s.steps for s in built] == [s.steps for s in samples]


@needs_bundled
def test_imadarem_models_lists_the_bundled_models():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "imadarem.runtime.cli", "models", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["name"] for row in rows} == set(bundled()) and all(row["bytes"] > 0 for row in rows)
    assert all(row["format"] == open_model(row["name"]).format_name for row in rows)  # the index tells the truth
    r = subprocess.run([sys.executable, "-m", "imadarem.runtime.cli", "models"], capture_output=True, text=True)
    assert "default" in r.stdout and "fcd_test" in r.stdout


@needs_refine
def test_the_bundled_refine_model_decodes_as_it_recommends_and_a_middle_blank_keeps_its_suffix():
    """Issue #24's ring example: a blank before the closing benzene must build the chain that ring closes onto
    (the causal model, blind to the suffix, lost it in 7 of 20 samples)."""
    Chem = pytest.importorskip("rdkit.Chem")
    gen = Generator("refine")
    assert gen.model.common.decoding == {"selector": "gate", "options": {"threshold": 0.3}, "drafts": 3}
    assert gen.model.packs  # draft-and-verify runs a row's states as one sequence
    # verified drafts: the model's left-to-right samples, as one exact token per call draws them
    assert [s.ids for s in gen.generate(6, seed=1)] == [s.ids for s in gen.generate(6, seed=1, drafts=0)]
    ring = Chem.MolFromSmarts("c1ccccc1")
    samples = gen.generate(40, seed=0, prompt="[C][C][O]<mask:6>[C][=C][C][=C][C][=C][Ring1][=Branch1]")
    mols = [Chem.MolFromSmiles(s.text) for s in samples]
    assert all(m is not None and m.HasSubstructMatch(ring) for m in mols), [s.text for s in samples]


def test_the_pytorch_decode_loop_runs_through_the_generator_and_gives_the_files_molecules():
    torch = pytest.importorskip("torch")
    from imadarem.export.onnx_import import causal_from_onnx
    from imadarem.training.reference import TorchDecode, torch_decode

    model, _ = causal_from_onnx(PINNED / "causal.onnx")
    want = Generator(PINNED / "decode.onnx").generate(12, seed=0, batch_size=5, decode=False)
    gen = Generator(TorchDecode(model))
    got = gen.generate(12, seed=0, batch_size=5, decode=False)
    assert [s.ids for s in got] == [s.ids for s in want] and [s.steps for s in got] == [s.steps for s in want]
    ids, calls = torch_decode(model, 12, 0, seed=0, batch_size=5)
    plain = Generator(PINNED / "causal.onnx").generate(12, seed=0, drafts=0, decode=False)
    assert [list(r[: len(s.ids)]) for r, s in zip(ids, plain)] == [s.ids for s in plain]
    with pytest.raises(Exception, match="takes no selector, prompt"):
        gen.generate(2, prompt="[C]<mask:2>")
    assert torch.is_tensor(gen.model.step_module.bias)


def test_main_with_a_bad_model_name_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "no-such-model", "-n", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bundled models" in err

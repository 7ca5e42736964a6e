"""imadarem bench: every engine runs and the table's ratios and agreements are computed, not assumed."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from imadarem.runtime.errors import ImadaremError


def test_model_rebuilt_from_fp32_and_int8_files(tiny_run, tiny_onnx, tmp_path):
    from imadarem.export.onnx_export import export_checkpoint
    from imadarem.export.onnx_import import model_from_onnx
    from imadarem.training.checkpoint import build_model, load_checkpoint

    want = build_model(load_checkpoint(tiny_run), "ema").state_dict()
    model, report = model_from_onnx(tiny_onnx)
    assert not report.quantized and report.max_abs_logit_diff <= 1e-4
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=1e-6, msg=key)
    int8 = export_checkpoint(tiny_run, tmp_path / "int8.onnx", variant="int8")
    model8, report8 = model_from_onnx(int8)
    assert report8.quantized
    worst = max(float((value - want[key]).abs().max() / (want[key].abs().max() + 1e-12))
                for key, value in model8.state_dict().items())
    assert worst < 0.02  # int8 weights: within a few quantisation steps of the originals


def test_rebuilding_a_foreign_graph_is_refused(tiny_onnx, tmp_path):
    import onnx
    from imadarem.export.onnx_import import model_from_onnx

    proto = onnx.load(str(tiny_onnx))
    for init in proto.graph.initializer:
        if init.name.endswith("qkv.bias"):
            init.raw_data = np.ones(len(init.raw_data) // 4, np.float32).tobytes()
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    _, report = model_from_onnx(broken)  # the weights are read back as stored ...
    assert report.max_abs_logit_diff <= 1e-4
    proto.graph.initializer.remove(next(i for i in proto.graph.initializer if i.name.endswith("ln_f.weight")))
    onnx.save(proto, str(broken))
    with pytest.raises(ImadaremError):  # ... and a graph missing one is not a model this code can rebuild
        model_from_onnx(broken)


@pytest.mark.slow
def test_bench_runs_every_cpu_engine(tiny_run, tmp_path):
    pytest.importorskip("x_transformers")
    from imadarem.bench.runner import Bench, BenchArgs

    args = BenchArgs(checkpoint=str(tiny_run), batch_sizes=(1, 3), repeats=2, agreement_n=8, out_dir=str(tmp_path))
    result = Bench(args).run()
    rows = {(r["engine"], r["batch"]): r for r in result["rows"]}
    assert set(e for e, _ in rows) == {"ort-fp32", "ort-int8", "ort-fp32-head", "torch", "xt-nar", "xt-ar-kv"}
    for r in result["rows"]:
        assert r["seq_per_s"] > 0 and r["step_p95_ms"] >= r["step_p50_ms"] > 0 and r["repeats"] == 2
        assert r["speedup_vs_torch"] == pytest.approx(rows[("torch", r["batch"])]["wall_s"] / r["wall_s"])
    assert rows[("xt-ar-kv", 3)]["steps_used"] == 63 and rows[("xt-nar", 3)]["steps_used"] == result["steps"]
    # the PyTorch loop and the fp32 runtime loop produce identical tokens for the same seed
    assert "tokens identical to ort-fp32: 1.000" in rows[("torch", 3)]["notes"]
    assert 0.5 <= result["agreement"]["int8_token_agreement"] <= 1.0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == result["rows"]
    table = (tmp_path / "bench.md").read_text()
    assert table.count("| cpu |") == len(result["rows"])


def test_bench_cli_refuses_bad_input_in_one_line(tmp_path):
    for args, message in [(["--engines", "warp-drive"], "unknown engine 'warp-drive'"),
                          (["--batch-sizes", "0,4"], "positive integers"),
                          (["--model", str(tmp_path / "none.onnx")], "not found")]:
        r = subprocess.run([sys.executable, "-c", "from imadarem.runtime.cli import main; main()", "bench", *args,
                            "-o", str(tmp_path)],
                           capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0


def test_model_rebuilt_from_a_device_state_file(tiny_run, tmp_path):
    from imadarem.export.onnx_export import export_checkpoint
    from imadarem.export.onnx_import import model_from_onnx

    path = export_checkpoint(tiny_run, tmp_path / "ds.onnx", device_state=True)
    _, report = model_from_onnx(path)
    assert report.max_abs_logit_diff <= 1e-4


@pytest.fixture(scope="module")
def causal_model_file(tmp_path_factory):
    from imadarem.export.causal_export import export_causal
    from test_causal import tiny_model

    model = tiny_model(drafts=2)
    with torch.no_grad():  # distinct parameters, as in a trained model
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return export_causal(model, tmp_path_factory.mktemp("bench-causal") / "causal.onnx")


@pytest.mark.slow
def test_bench_of_a_causal_model_sets_each_refinement_row_beside_its_left_to_right_baseline(causal_model_file,
                                                                                           tmp_path, monkeypatch):
    import imadarem.bench.causal as bc
    from imadarem.bench.runner import Bench, BenchArgs

    monkeypatch.setattr(bc, "_scorer", lambda: (lambda smiles: {"valid": 1.0, "fcd": 0.5}))  # no MOSES download here
    engines = ("ort-loop-fp32", "ort-l2r-fp32", "ort-decode-fp32", "ort-decode-l2r-fp32", "ort-decode-int8",
               "ort-decode-l2r-int8", "torch-decode-fp32", "torch-decode-l2r-fp32", "ort-decode-fp16")
    args = BenchArgs(model=str(causal_model_file), batch_sizes=(1, 3), repeats=1, out_dir=str(tmp_path),
                     engines=engines, samples=12)
    result = Bench(args).run()
    rows = {(r["engine"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(e, b) for e in engines if e != "ort-decode-fp16" for b in (1, 3)}  # fp16: CUDA only
    for (engine, batch), r in rows.items():
        base = rows[(bc.Engine.parse(engine).baseline.name, batch)]
        assert r["vs_baseline"] == pytest.approx(r["seq_per_s"] / base["seq_per_s"])
        assert r["seq_per_s"] > 0 and r["step_p95_ms"] >= r["step_p50_ms"] > 0 and r["model_calls"] >= 1
        if "int8" not in engine:  # same seeds, same molecules (int8 rounds by the batch's activations)
            assert r["identical_to_baseline"] == 1.0, engine
        assert r["quality"]["n"] == 12 and r["quality"]["fcd"] == 0.5
        if not bc.Engine.parse(engine).left_to_right:
            assert r["calls_per_molecule"] < base["calls_per_molecule"], engine
        if "decode" in engine and batch > 1:  # in flight: a run's calls per batch of molecules, those of a molecule
            assert r["model_calls"] <= 1.15 * r["calls_per_molecule"], engine
    torch_rows = {e: rows[(e, 3)]["seq_per_s"] for e in ("torch-decode-fp32", "torch-decode-l2r-fp32")}
    assert rows[("ort-decode-fp32", 3)]["vs_torch"] == pytest.approx(rows[("ort-decode-fp32", 3)]["seq_per_s"]
                                                                     / torch_rows["torch-decode-fp32"])
    smiles = (tmp_path / "samples" / "cpu-ort-decode-fp32.smi").read_text().splitlines()
    assert len(smiles) == 12
    assert smiles == (tmp_path / "samples" / "cpu-torch-decode-fp32.smi").read_text().splitlines()
    table = (tmp_path / "bench.md").read_text()
    assert table.count("| cpu |") == len(result["rows"]) + 2 + 8  # rows, per-batch summary, quality per engine
    assert json.loads((tmp_path / "bench.json").read_text())["summary"][0]["batch"] == 1


@pytest.mark.slow
def test_torch_compile_rows_decode_the_eager_loops_molecules_and_record_their_settings(causal_model_file, tmp_path,
                                                                                      monkeypatch):
    """The strongest PyTorch peer (issue #26): the same draft-and-verify step under torch.compile gives the
    eager loop's molecules for the same seeds; its mode and torch version go into bench.json, and the summary
    sets our best row beside it."""
    from imadarem.bench.runner import Bench, BenchArgs

    engines = ("ort-decode-fp32", "ort-decode-l2r-fp32", "torch-decode-fp32", "torch-decode-l2r-fp32",
               "torch-compile-fp32", "torch-compile-l2r-fp32")
    args = BenchArgs(model=str(causal_model_file), batch_sizes=(3,), repeats=1, out_dir=str(tmp_path),
                     engines=engines, samples=6, torch_compile_mode="default")
    import imadarem.bench.causal as bc

    monkeypatch.setattr(bc, "_scorer", lambda: (lambda smiles: {"valid": 1.0}))  # no MOSES download here
    result = Bench(args).run()
    rows = {r["engine"]: r for r in result["rows"]}
    assert rows["torch-compile-fp32"]["identical_to_baseline"] == 1.0
    smiles = {e: (tmp_path / "samples" / f"cpu-{e}.smi").read_text().splitlines() for e in engines}
    assert smiles["torch-compile-fp32"] == smiles["torch-decode-fp32"]
    assert smiles["torch-compile-l2r-fp32"] == smiles["torch-decode-l2r-fp32"]
    assert result["torch_compile"]["mode"] == "default" and result["torch_compile"]["torch"]
    (item,) = result["summary"]
    assert item["vs_torch_compile"] == pytest.approx(rows["ort-decode-fp32"]["seq_per_s"]
                                                     / rows["torch-compile-fp32"]["seq_per_s"])
    assert item["torch"] == "torch-decode-fp32"  # the eager comparison stays the eager loop's


def test_bench_of_a_causal_model_refuses_unknown_engines(causal_model_file, tmp_path):
    from imadarem.bench.runner import Bench, BenchArgs

    for name in ("ort-decode-bf16", "torch-decode-int8", "torch-compile-int4", "ort-loop-fp16-nograph", "warp"):
        with pytest.raises(ImadaremError, match="unknown engine"):
            Bench(BenchArgs(model=str(causal_model_file), engines=(name,), out_dir=str(tmp_path)))


@pytest.mark.slow
def test_the_bench_of_a_refinement_model_prints_no_exporter_chatter(tiny_run, tmp_path):
    """D12 of issue #25: torch.onnx's 'torchvision is not installed' lines reached the user."""
    r = subprocess.run([sys.executable, "-m", "imadarem.runtime.cli", "bench", "--checkpoint", str(tiny_run),
                        "--batch-sizes", "1", "--engines", "ort-fp32", "--repeats", "1", "--agreement-n", "0",
                        "-o", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert all(line.startswith("bench: ") for line in r.stderr.splitlines()), r.stderr


@pytest.mark.slow  # exports and times two files: CI's slow pass
def test_a_reference_file_is_timed_as_it_is_beside_the_rows(causal_model_file, tmp_path):
    """``--reference FILE`` (issue #23: the new bundled model against the previous one, in one run): the file
    runs as it is, its molecules are its own, and the summary sets the model as shipped and the fastest row
    against it."""
    import shutil

    from imadarem.bench.runner import Bench, BenchArgs

    reference = shutil.copy(causal_model_file, tmp_path / "previous.onnx")  # the same weights: same molecules
    args = BenchArgs(model=str(causal_model_file), batch_sizes=(2,), repeats=1, out_dir=str(tmp_path / "out"),
                     engines=("ort-loop-fp32",), reference=str(reference))
    result = Bench(args).run()
    rows = {r["engine"]: r for r in result["rows"]}
    assert set(rows) == {"ort-loop-fp32", "reference"}
    (item,) = result["summary"]
    assert item["shipped"] == "ort-loop-fp32"
    assert item["shipped_vs_reference"] == pytest.approx(rows["ort-loop-fp32"]["seq_per_s"] / rows["reference"]["seq_per_s"])
    assert rows["reference"]["calls_per_molecule"] == rows["ort-loop-fp32"]["calls_per_molecule"]
    assert result["reference"]["file"] == str(reference)
    assert "Against `--reference" in (tmp_path / "out" / "bench.md").read_text()


def test_a_reference_needs_a_causal_model(tiny_onnx, tmp_path):
    from imadarem.bench.runner import Bench, BenchArgs

    with pytest.raises(ImadaremError, match="--reference"):
        Bench(BenchArgs(model=str(tiny_onnx), reference=str(tiny_onnx), out_dir=str(tmp_path)))

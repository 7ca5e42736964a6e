"""Export: one self-describing ONNX step, parity with PyTorch, variants, refusal of bad files."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import rewrite_metadata
from imadarem.runtime import Generator, ModelFileError
from imadarem.runtime import metadata as mf
from imadarem.training.checkpoint import build_model, load_checkpoint
from imadarem.training.reference import torch_refine


def _ref_model(run, weights="ema"):
    return build_model(load_checkpoint(run), weights).eval()


def test_metadata_and_signature(tiny_run, tiny_onnx):
    gen = Generator(tiny_onnx)
    meta = gen.model.metadata
    assert meta[mf.KEY_FORMAT] == "1"
    cfg = json.loads(meta[mf.KEY_CONFIG])
    assert cfg["hidden_size"] == 32 and cfg["use_critic"] is True
    prov = json.loads(meta[mf.KEY_PROVENANCE])
    assert prov["training_step"] == 120 and prov["weights"] == "ema" and len(prov["checkpoint_sha256"]) == 64
    assert set(prov["tools"]) >= {"torch", "onnx", "onnxruntime", "imadarem"}
    assert gen.model.outputs == ["logits", "gate", "cond_next", "critic"]
    names = {i.name: i.shape for i in gen.model.session.get_inputs()}
    assert names["tokens"] == ["batch", "length"] and names["cond"][2] == 32


def test_checker_and_every_optimisation_level(tiny_onnx):
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(tiny_onnx)), full_check=True)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        sess = ort.InferenceSession(str(tiny_onnx), opts, providers=["CPUExecutionProvider"])
        out = sess.run(None, {"tokens": np.ones((2, 5), np.int64), "step": np.zeros(2, np.int64),
                              "cond": np.zeros((2, 5, 32), np.float32)})
        assert out[0].shape == (2, 5, sess.get_outputs()[0].shape[-1])


@pytest.mark.parametrize("batch,length", [(1, 1), (3, 17), (5, 64)])
def test_logits_parity_with_pytorch(tiny_run, tiny_onnx, batch, length):
    model = _ref_model(tiny_run)
    sess = Generator(tiny_onnx).model.session
    rng = np.random.default_rng(batch * 100 + length)
    tokens = rng.integers(0, model.config.vocab_size, (batch, length))
    step = rng.integers(0, 6, batch)
    cond = rng.normal(size=(batch, length, 32)).astype(np.float32)
    got = sess.run(None, {"tokens": tokens, "step": step, "cond": cond})
    with torch.no_grad():
        want = model(torch.from_numpy(tokens), torch.from_numpy(step), torch.from_numpy(cond))
    for g, w in zip(got, want):
        assert np.abs(g - w.numpy()).max() <= 1e-4


@pytest.mark.parametrize("selector,temperature", [("gate", 0.0), ("gate", 1.0), ("entropy", 1.0)])
def test_full_loop_matches_pytorch_loop(tiny_run, tiny_onnx, selector, temperature):
    model = _ref_model(tiny_run)
    want, stats = torch_refine(model, 12, selector=selector, temperature=temperature, seed=7, return_stats=True)
    want_steps = stats["steps"]
    samples = Generator(tiny_onnx).generate(12, selector=selector, temperature=temperature, seed=7)
    got = np.full_like(want, model.special.pad)
    for i, s in enumerate(samples):
        got[i, : len(s.ids)] = s.ids
    np.testing.assert_array_equal(got, want)
    assert [s.steps for s in samples] == want_steps.tolist()
    assert [s.early_stop for s in samples] == stats["early"].tolist()
    assert [s.edits for s in samples] == [[int(e) for e in row if e >= 0] for row in stats["edits"]]


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_variants_load_and_stay_close(tiny_run, tmp_path, variant):
    from imadarem.export.onnx_export import export_checkpoint
    from imadarem.export.parity import parity_report

    path = export_checkpoint(tiny_run, tmp_path / f"{variant}.onnx", variant=variant)
    report = parity_report(tiny_run, path)
    assert report["max_abs_diff"]["logits"] < 0.1
    assert report["greedy_token_agreement"] >= 0.9
    assert json.loads(Generator(path).model.metadata[mf.KEY_PROVENANCE])["variant"] == variant


@pytest.mark.parametrize("change,message", [
    (lambda m: m.pop(mf.KEY_FORMAT), "not an Imadarem model file"),
    (lambda m: m.pop(mf.KEY_TOKENIZER), "not an Imadarem model file"),
    (lambda m: m.__setitem__(mf.KEY_FORMAT, "99"), "format '99' is not supported"),
    (lambda m: m.__setitem__(mf.KEY_CONFIG, json.dumps(dict(json.loads(m[mf.KEY_CONFIG]), hidden_size=48))),
     "hidden_size 48"),
    (lambda m: m.__setitem__(mf.KEY_CONFIG, json.dumps(dict(json.loads(m[mf.KEY_CONFIG]), vocab_size=7))),
     "vocab_size 7"),
    (lambda m: m.__setitem__(mf.KEY_SPECIAL_IDS, json.dumps({"mask": 3, "pad": 0, "eos": 2})), "contradict"),
    (lambda m: m.__setitem__(mf.KEY_CONFIG, "{not json"), "not valid JSON"),
])
def test_runtime_refuses_bad_metadata(tiny_onnx, tmp_path, change, message):
    bad = rewrite_metadata(tiny_onnx, tmp_path / "bad.onnx", change)
    with pytest.raises(ModelFileError, match=message):
        Generator(bad)


def test_runtime_refuses_non_onnx(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a readable ONNX model"):
        Generator(junk)
    with pytest.raises(ModelFileError, match="not found"):
        Generator(tmp_path / "missing.onnx")


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from imadarem.runtime.cli import main; main()", *args],
                          capture_output=True, text=True)


def test_export_cli_refuses_missing_and_corrupt_checkpoints(tiny_run, tmp_path):
    r = _cli("export", str(tmp_path / "nope"), "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "checkpoint not found" in r.stderr
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    ck = broken / "checkpoints" / (broken / "latest").read_text().strip()
    (ck / "model.safetensors").write_bytes(b"\x00" * 64)
    r = _cli("export", str(broken), "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr
    (ck / "state.json").write_text("{")
    r = _cli("export", str(broken), "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and "state.json" in r.stderr


def test_export_and_inspect_cli(tiny_run, tmp_path):
    out = tmp_path / "cli.onnx"
    r = _cli("export", str(tiny_run), "-o", str(out), "--weights", "raw")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["max_abs_diff"]["logits"] <= 1e-3 and summary["greedy_token_agreement"] == 1.0
    r = _cli("inspect", str(out), "--json")
    info = json.loads(r.stdout)
    assert info["parameters"] > 10_000 and info["tokenizer"]["adapter"] == "selfies"
    assert [o["name"] for o in info["outputs"]] == ["logits", "gate", "cond_next", "critic"]
    r = _cli("inspect", str(out))
    assert "parameters" in r.stdout and "cond_next" in r.stdout


@pytest.mark.slow  # subprocess-heavy: CI's slow pass runs it (keeps the README command under 5 minutes)
def test_export_refuses_an_unwritable_output_first_and_is_quiet(tiny_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "imadarem.runtime.cli", "export", str(tiny_run), "-o",
                        str(blocker / "m.onnx")], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot write" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert time.perf_counter() - started < 20  # refused before exporting
    r = subprocess.run([sys.executable, "-m", "imadarem.runtime.cli", "export", str(tiny_run), "-o",
                        str(tmp_path / "m.onnx"), "--dtype", "fp16", "--no-check"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr  # no exporter chatter (torchvision, shape inference)


def test_torch_noise_is_drawn_on_the_model_device_at_every_step(tiny_run, monkeypatch):
    """torch_refine(noise="torch") draws every step's uniforms with torch (on a GPU: on the GPU); before
    the fix its option was overwritten after the first step and later draws came from the host."""
    from imadarem.runtime.randomness import SampleStreams

    model = _ref_model(tiny_run)
    host_draws = []
    original = SampleStreams.uniforms
    monkeypatch.setattr(SampleStreams, "uniforms", lambda self, *a: host_draws.append(a) or original(self, *a))
    first, stats = torch_refine(model, 6, seed=3, noise="torch", return_stats=True)
    assert host_draws == [] and stats["steps"].max() > 1
    again = torch_refine(model, 6, seed=3, noise="torch")
    np.testing.assert_array_equal(first, again)  # same seed, same tokens
    torch_refine(model, 6, seed=3, noise="numpy")
    assert len(host_draws) > 1  # the numpy path does draw on the host, every step

"""One trainer for every family: `imadarem train --family causal|refine` -> `imadarem export` -> `imadarem-run`,
presets, the EMA's warm-up, and one line for every bad flag, value or source."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURES, MOSES_SAMPLE

pytest.importorskip("torch")
CLI = [sys.executable, "-m", "imadarem.runtime.cli"]


def run(*args, **kwargs):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    """The tiny-causal preset for 200 steps on 400 MOSES molecules (about 15 s on 2 cores)."""
    out = tmp_path_factory.mktemp("causal")
    r = run("train", "--preset", "tiny-causal", "--data", MOSES_SAMPLE, "--out-dir", out / "run", "--steps", 200,
            "--cache-dir", out / "cache")
    assert r.returncode == 0, r.stderr
    assert "it/s" not in r.stderr and "\r" not in r.stderr  # no progress bar written into a non-terminal
    return out / "run"


@pytest.mark.slow  # a real training run through the CLI (~30 s): CI's slow pass runs it (README command < 5 minutes)
def test_a_short_causal_run_exports_by_its_checkpoint_alone_and_generates_real_molecules(causal_run, tmp_path):
    """No shape flags: family, shapes and tokenizer come from the checkpoint. A couple of minutes of CPU
    training (here 200 steps) gives molecules, not empty strings: the EMA weights are the recent ones."""
    from imadarem.runtime import Generator

    state = json.loads((causal_run / "run.json").read_text())
    assert state["family"] == "causal" and state["args"]["preset"] == "tiny-causal"
    assert state["config"]["num_drafts"] == 2 and state["config"]["kind"] == "causal"
    r = run("export", causal_run, "-o", tmp_path / "m.onnx", "--dtype", "int8")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    summary = json.loads(r.stdout)
    assert summary["family"] == "causal" and summary["drafts"] == 2
    samples = Generator(tmp_path / "m.onnx").generate(200, seed=0)
    non_empty = np.mean([bool(s.text) for s in samples])
    assert non_empty >= 0.95, non_empty
    assert np.mean([s.steps for s in samples]) < np.mean([len(s.ids) for s in samples])  # drafts pay already


@pytest.mark.slow  # subprocess-heavy: CI's slow pass runs it (keeps the README command under 5 minutes)
def test_the_decode_file_of_a_run_gives_the_step_files_molecules(causal_run, tmp_path):
    from imadarem.runtime import Generator

    assert run("export", causal_run, "-o", tmp_path / "step.onnx").returncode == 0
    r = run("export", causal_run, "-o", tmp_path / "dec.onnx", "--decode")
    assert r.returncode == 0, r.stderr
    step = Generator(tmp_path / "step.onnx").generate(40, seed=3, decode=False)
    dec = Generator(tmp_path / "dec.onnx").generate(40, seed=3, decode=False)
    assert np.mean([a.ids == b.ids for a, b in zip(step, dec)]) >= 0.97


@pytest.mark.slow  # reads the CLI training run of causal_run (~45 s): CI's slow pass runs it (README command < 5 minutes)
def test_the_ema_warms_up_so_a_short_run_exports_its_recent_weights(causal_run):
    from imadarem.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(causal_run)
    raw, ema = ckpt.model_weights("raw"), ckpt.model_weights("ema")
    key = "blocks.0.qkv.weight"
    # decay min(0.999, (1 + s) / (10 + s)): after 200 steps the EMA averages the last ~20 steps, not the init
    assert float((raw[key] - ema[key]).norm() / raw[key].norm()) < 0.05


def test_causal_dropout_acts_in_training_only_and_leaves_the_model_shape_alone():
    import torch
    from imadarem.training.families import get_family

    family = get_family("causal")
    plain = family.make_config(40, {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_drafts": 1})
    dropped = family.make_config(40, {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_drafts": 1,
                                      "dropout": 0.3})
    assert dropped.to_dict()["dropout"] == 0.3 and family.config_from_dict(dropped.to_dict()).dropout == 0.3
    assert plain.model == dropped.model  # what a model file records is the same
    torch.manual_seed(0)
    model = family.build(dropped, None)
    reference = family.build(plain, None)
    assert model.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 40, (3, 9))
    model.train()
    a, b = model.teacher_forcing(tokens)[0], model.teacher_forcing(tokens)[0]
    assert not torch.allclose(a, b)  # dropout draws differ between two training passes
    model.eval()
    reference.eval()
    assert torch.equal(model.teacher_forcing(tokens)[0], reference.teacher_forcing(tokens)[0])


@pytest.mark.parametrize("args,message", [
    (["--family", "causal", "--refine-steps", "3"], "--refine-steps is not a setting of the causal family"),
    (["--family", "refine", "--drafts", "2"], "--drafts is not a setting of the refine family"),
    (["--set", "foo=1"], "foo is not a setting of the causal family"),
    (["--set", "ema_decay=abc"], "ema_decay must be a finite number"),
    (["--set", "ema_decay=2"], "ema_decay must be in [0, 1)"),
    (["--set", "dropout=1.5"], "dropout must be in [0, 1)"),
    (["--family", "refine", "--set", "max_refinement_steps=x"], "max_refinement_steps must be an integer"),
    (["--lr", "nan"], "--lr"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--family", "nope"], "'nope' is not one of"),
])
def test_bad_training_flags_are_one_line(tmp_path, args, message):
    from imadarem.runtime.cli import cli
    from test_cli_contract import in_process

    code, _, err = in_process(["train", "--data", str(MOSES_SAMPLE), "--out-dir", str(tmp_path / "r"), "--steps", "1",
                               "--cache-dir", str(tmp_path / "c"), *args], "imadarem", cli)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r" / "latest").exists()


def test_presets_are_listed_and_the_bundled_models_recipe_is_one_of_them():
    r = run("train", "--list-presets")
    assert r.returncode == 0 and "moses-causal" in r.stdout and "tiny-refine" in r.stdout
    from imadarem.training.presets import PRESETS

    for name, entry in PRESETS.items():
        assert entry["args"]["family"] in ("causal", "refine"), name


@pytest.mark.slow  # subprocess-heavy: CI's slow pass runs it (keeps the README command under 5 minutes)
def test_export_refuses_what_it_cannot_read_or_use_in_one_line(causal_run, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    cases = [
        ([text], "not a readable ONNX model"),
        ([tmp_path / "missing"], "checkpoint not found"),
        ([causal_run, "--sampling"], "for refine models"),
        ([causal_run, "--dtype", "fp16"], "add --decode"),
        ([causal_run, "--decode", "--dtype", "int4"], "int8 or fp16"),
    ]
    for args, message in cases:
        r = run("export", *args, "-o", tmp_path / "x.onnx")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (args, r.stderr)
    dec = tmp_path / "dec.onnx"
    assert run("export", causal_run, "-o", dec, "--decode").returncode == 0
    r = run("export", dec, "-o", tmp_path / "y.onnx")
    assert r.returncode == 2 and "holds no step to rebuild" in r.stderr


def test_export_never_replaces_a_device_node_or_a_fifo(tmp_path):
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # the output is checked before the source is read (export/cli.py), so any source shows the guard: a file
    # from the fixtures, rather than causal_run's training run (~45 s)
    for target in (fifo, "/dev/null"):
        r = run("export", FIXTURES / "pinned" / "causal.onnx", "-o", target)
        assert r.returncode == 2 and "is not a regular file" in r.stderr, r.stderr
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    import stat

    assert stat.S_ISFIFO(os.stat(fifo).st_mode)

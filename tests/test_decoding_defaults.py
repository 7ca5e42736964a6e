"""A model file's recommended decoding (metadata ``imadarem.decoding``, written by ``imadarem export --selector``):
a request that names no selector runs with it, a request's own options go on top, a request that names a
selector ignores it, and a malformed or unusable one is refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from imadarem.runtime import metadata as mf
from imadarem.runtime.errors import ModelFileError
from imadarem.runtime.generator import Generator

from tests.conftest import rewrite_metadata


@pytest.fixture(scope="module")
def stamped(tiny_onnx, tmp_path_factory):
    from imadarem.export.exporters import stamp_decoding

    path = tmp_path_factory.mktemp("decoding") / "stamped.onnx"
    shutil.copy(tiny_onnx, path)
    assert stamp_decoding(path, "maskgit", {"noise": 0.0, "schedule": "linear"}) == \
        {"selector": "maskgit", "options": {"noise": 0.0, "schedule": "linear"}}
    return path


def _texts(model, **kw):
    return [s.text for s in Generator(model).generate(24, seed=3, steps=6, **kw)]


def test_a_request_without_a_selector_runs_the_recommended_one(tiny_onnx, stamped):
    assert _texts(stamped) == _texts(tiny_onnx, selector="maskgit", noise=0.0, schedule="linear")
    # the file's options under the request's own, the file's selector kept
    assert _texts(stamped, schedule="cosine") == _texts(tiny_onnx, selector="maskgit", noise=0.0, schedule="cosine")
    # a request that names a selector gets that selector with only its own options
    assert _texts(stamped, selector="l2r") == _texts(tiny_onnx, selector="l2r")
    # the unstamped file keeps its format's default (gate): a different rule on the same seed
    assert _texts(stamped) != _texts(tiny_onnx)


def test_inspect_shows_the_recommended_decoding(stamped):
    from imadarem.runtime.formats import describe_model

    assert describe_model(stamped)["decoding"] == {"selector": "maskgit",
                                                   "options": {"noise": 0.0, "schedule": "linear"}}


@pytest.mark.parametrize("value", ['{"options": {}}', '{"selector": "gate", "options": []}', '"gate"',
                                   '{"selector": "gate", "steps": 3}', '{"selector": "gate", "drafts": -1}',
                                   '{"selector": "gate", "drafts": true}'])
def test_a_malformed_recommendation_is_refused(tiny_onnx, tmp_path, value):
    bad = rewrite_metadata(tiny_onnx, tmp_path / "bad.onnx", lambda m: m.__setitem__(mf.KEY_DECODING, value))
    with pytest.raises(ModelFileError, match="imadarem.decoding"):
        Generator(bad)


def test_a_recommended_selector_the_file_cannot_run_is_not_written(tiny_onnx, tmp_path):
    from imadarem.export.exporters import stamp_decoding
    from imadarem.runtime.errors import SelectorError

    no_critic = rewrite_metadata(tiny_onnx, tmp_path / "m.onnx", lambda m: None)
    import onnx

    proto = onnx.load(str(no_critic))
    kept = [o for o in proto.graph.output if o.name != "critic"]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    onnx.save(proto, str(no_critic))
    with pytest.raises(SelectorError, match="critic"):
        stamp_decoding(no_critic, "critic", {})
    assert not no_critic.exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from imadarem.runtime.cli import main; main()", *args],
                          capture_output=True, text=True)


@pytest.mark.slow  # four subprocesses that import torch: CI's slow pass runs it
def test_export_cli_stamps_and_refuses_bad_selectors_before_writing(tiny_run, tmp_path):
    out = tmp_path / "m.onnx"
    for args, message in [(["--selector-option", "noise=0"], "need --selector"),
                          (["--selector", "nope"], "nope"),
                          (["--selector", "maskgit", "--selector-option", "bogus=1"], "bogus")]:
        r = _cli("export", str(tiny_run), "-o", str(out), "--no-check", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
        assert not out.exists()
    r = _cli("export", str(tiny_run), "-o", str(out), "--no-check", "--selector", "l2r", "--selector-option",
             "per_step=2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["decoding"] == {"selector": "l2r", "options": {"per_step": 2}}
    r = _cli("inspect", str(out))
    assert "decoding     l2r per_step=2" in r.stdout

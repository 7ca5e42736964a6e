"""The one-way flow of docs/ARCHITECTURE.md, checked on the source with import-linter (the contracts live in
pyproject.toml): training -> export -> model file -> runtime <- plugins, the bench on top, no cycles inside a
package; and the public names each part promises."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("runtime", "plugins", "training", "export", "bench", "chem")


def _lint(tmp_path: Path, plant: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """import-linter's contracts of pyproject.toml on the source tree (copied into a regular package
    ``imadarem``, so that an editable or a regular install both check these very files), with ``plant``
    (file -> a line appended) added first."""
    pkg = tmp_path / "imadarem"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for part in PARTS:
        shutil.copytree(ROOT / part, pkg / part, ignore=shutil.ignore_patterns("*.onnx", "__pycache__"))
    for file, line in (plant or {}).items():
        with open(pkg / file, "a") as fh:
            fh.write(f"\n\ndef _planted():\n    {line}\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "pyproject.toml")], capture_output=True,
                          text=True, cwd=tmp_path, env=env)


def test_the_layers_and_no_cycles_hold(tmp_path):
    pytest.importorskip("importlinter")
    r = _lint(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert r.stdout.count("KEPT") == 3


@pytest.mark.parametrize("file,line,contract", [
    ("runtime/rules.py", "import imadarem.training.model", "training -> export -> runtime"),
    ("plugins/selectors/gate.py", "import torch", "never import torch"),
    ("runtime/results.py", "from imadarem.runtime.generator import Generator", "no import cycle"),
    ("export/parity.py", "import imadarem.bench.runner", "training -> export -> runtime"),
])
def test_a_violation_inside_a_function_breaks_a_contract(tmp_path, file, line, contract):
    pytest.importorskip("importlinter")
    r = _lint(tmp_path, {file: line})
    assert r.returncode != 0 and contract in r.stdout and "BROKEN" in r.stdout, r.stdout[-2000:]


def test_public_names_resolve():
    code = ("import imadarem.runtime as r, imadarem.training as t, imadarem.export as e\n"
            "from imadarem.runtime import *\n"
            "for mod in (r, t, e):\n"
            "    missing = [n for n in mod.__all__ if not hasattr(mod, n)]\n"
            "    assert not missing, (mod.__name__, missing)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_quick_start_runs_as_written():
    """The quick start of imadarem.training's docstring: a config, a model, one step."""
    torch = pytest.importorskip("torch")
    from imadarem.training import ImplicitRefinementConfig, ImplicitRefinementModel, TrainArgs, train  # noqa: F401

    config = ImplicitRefinementConfig(vocab_size=32, hidden_size=128, num_layers=4, num_heads=4)
    model = ImplicitRefinementModel(config)
    tokens = torch.full((2, 10), model.special.mask)
    step = torch.zeros(2, dtype=torch.long)
    logits, gate, cond_next = model(tokens, step, model.zero_cond(tokens))
    assert logits.shape == (2, 10, 32) and gate.shape == (2, 10) and cond_next.shape == (2, 10, 128)
    assert ((gate > 0) & (gate < 1)).all()


def test_the_command_group_finds_the_development_side_through_the_hook():
    from imadarem.runtime.registry import commands

    names = {c.name for c in commands()}
    assert {"train", "data", "eval", "export", "bench"} <= names

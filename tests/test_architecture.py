"""The one-way flow of docs/ARCHITECTURE.md, checked on the source: training -> export -> model file ->
runtime <- plugins, and the public names each part promises."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"runtime": "imadarem.runtime", "plugins": "imadarem.plugins", "training": "imadarem.training",
         "export": "imadarem.export"}
#: what each part may import of the others (the runtime's contracts are everyone's)
ALLOWED = {
    "runtime": {"imadarem.runtime"},
    "plugins": {"imadarem.runtime", "imadarem.plugins"},
    "training": {"imadarem.runtime", "imadarem.plugins", "imadarem.training"},
    "export": {"imadarem.runtime", "imadarem.plugins", "imadarem.training", "imadarem.export"},
}
HEAVY = {"torch", "onnx", "onnxscript", "rdkit", "fcd", "x_transformers"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("part", sorted(PARTS))
def test_parts_import_only_downstream(part):
    bad = []
    for path in sorted((ROOT / part).rglob("*.py")):
        for name in _imports(path):
            top = ".".join(name.split(".")[:2])
            if top.startswith("imadarem.") and top not in ALLOWED[part]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            if part in ("runtime", "plugins") and name.split(".")[0] in HEAVY:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


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

"""Deployment needs numpy, onnxruntime, pluggy and click only: the runtime never imports torch or onnx."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "onnx", "onnxscript")


def _imported_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint(' '.join(sorted(m for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_runtime_import_leaves_torch_and_onnx_out():
    mods = _imported_after("import imadarem.runtime, imadarem.plugins.selectors, imadarem.plugins.tokenizers")
    assert not mods & set(HEAVY)


@pytest.mark.parametrize("args", [["plugins"], ["plugins", "--json"], ["--help"], ["run", "--help"]])
def test_cli_paths_do_not_import_torch(args):
    code = (f"from imadarem.runtime.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass")
    assert not _imported_after(code) & set(HEAVY)


def test_generator_module_does_not_import_torch():
    assert not _imported_after("import imadarem.runtime.generator") & set(HEAVY)

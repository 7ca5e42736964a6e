"""Deployment needs numpy, onnxruntime, pluggy and click only: the runtime never imports torch, onnx or
RDKit, on any command path (docs/ARCHITECTURE.md, "The parts and the one-way flow")."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "onnx", "onnxscript", "rdkit", "fcd", "x_transformers")


def _imported_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint(' '.join(sorted(m for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_runtime_import_leaves_torch_and_onnx_out():
    mods = _imported_after("import imadarem.runtime, imadarem.plugins.selectors, imadarem.plugins.tokenizers")
    assert not mods & set(HEAVY)


@pytest.mark.parametrize("args", [["plugins"], ["plugins", "--json"], ["--help"], ["run", "--help"],
                                  ["inspect", "BUNDLED"], ["run", "-n", "2", "--seed", "0"],
                                  ["run", "-n", "2", "--selector", "maskgit", "--format", "jsonl"]])
def test_cli_paths_do_not_import_torch(args):
    code = ("from imadarem.runtime.cli import main\nfrom imadarem.runtime.models import default_model_path\n"
            f"args = [str(default_model_path()) if a == 'BUNDLED' else a for a in {args!r}]\n"
            "try:\n    main(args)\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code")
    assert not _imported_after(code) & set(HEAVY)


def test_generator_module_does_not_import_torch():
    assert not _imported_after("import imadarem.runtime.generator") & set(HEAVY)

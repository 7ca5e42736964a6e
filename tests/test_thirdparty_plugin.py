"""A real third-party distribution, pip-installed into a throwaway venv, is found through its entry point."""

import json
import site
import subprocess
import sys
import venv

import pytest
from conftest import FIXTURES


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    env_dir = root / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(env_dir)
    py = env_dir / "bin" / "python"
    if sys.prefix != sys.base_prefix:
        # We run inside a venv: --system-site-packages sees only the base interpreter, so also expose
        # the packages of the environment running the tests (imadarem itself among them).
        purelib = subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                          text=True).strip()
        dirs = [p for p in site.getsitepackages() if p]
        with open(f"{purelib}/_imadarem_parent_env.pth", "w") as fh:
            fh.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
    src = root / "src"
    import shutil

    shutil.copytree(FIXTURES / "thirdparty_plugin", src)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps",
                    "--no-build-isolation", str(src)], check=True, capture_output=True, text=True)
    return py


def test_plugin_is_listed_with_its_distribution(plugin_venv):
    out = subprocess.run([plugin_venv, "-c", "from imadarem.runtime.cli import main; main(['plugins', '--json'])"],
                         check=True, capture_output=True, text=True).stdout
    data = json.loads(out)
    found = {(p["kind"], p["name"]): p for p in data["plugins"]}
    assert found[("selector", "every-other")]["distribution"] == "imadarem-example-plugin"
    assert found[("selector", "every-other")]["version"] == "0.3.0"
    assert found[("tokenizer", "words")]["distribution"] == "imadarem-example-plugin"
    assert ("selector", "gate") in found and not data["problems"]


def test_plugin_can_be_looked_up_and_used(plugin_venv):
    code = (
        "from imadarem.runtime import create_selector, get_tokenizer_class, tokenizer_to_json, tokenizer_from_json\n"
        "sel = create_selector('every-other')\n"
        "tok = get_tokenizer_class('words')(['cat', 'dog'])\n"
        "back = tokenizer_from_json(tokenizer_to_json(tok))\n"
        "print(type(sel).__module__, back.decode(back.encode('dog cat')))\n"
    )
    out = subprocess.run([plugin_venv, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["imadarem_example_plugin", "dog", "cat"]


def test_a_faulty_plugin_selector_is_named_with_its_distribution(plugin_venv, tiny_onnx):
    r = subprocess.run([plugin_venv, "-c", "from imadarem.runtime.cli import run_main; run_main()", str(tiny_onnx),
                        "-n", "2", "--selector", "row-shaped"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "selector 'row-shaped' from distribution imadarem-example-plugin 0.3.0" in r.stderr
    assert "Decision.update of shape" in r.stderr


def test_plugin_not_visible_outside_its_venv():
    from imadarem.runtime.registry import Registry

    assert "every-other" not in Registry().names("selector")

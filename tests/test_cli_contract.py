"""What a demanding user meets: streaming, bounded memory, seeds per sample, SMILES fragment prompts,
one-line errors (a plugin's fault named as the plugin's), and a fuzzed command line."""

import contextlib
import io
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, rewrite_metadata
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imadarem.runtime import Generator, PluginError, PromptError
from imadarem.runtime.cli import invoke, run_command
from imadarem.runtime.metadata import KEY_CONFIG, KEY_PROVENANCE, KEY_TOKENIZER_ORIGIN
from imadarem.runtime.models import default_model_path
from imadarem.runtime.selector import Decision, Selector

BUNDLED = default_model_path()


def ids(samples):
    return [s.ids for s in samples]


def in_process(args, prog="imadarem-run", command=run_command):
    """Run a command in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            invoke(command, prog, list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


# -- seeds per sample, streaming ----------------------------------------------------------------------
@pytest.mark.parametrize("selector", ["gate", "maskgit", "uniform"])
def test_batch_size_and_n_change_no_sample(tiny_onnx, selector):
    gen = Generator(tiny_onnx)
    opts = {"noise": 1.0} if selector == "maskgit" else {}
    whole = ids(gen.generate(8, selector=selector, seed=5, batch_size=8, **opts))
    assert ids(gen.generate(8, selector=selector, seed=5, batch_size=3, **opts)) == whole
    assert ids(gen.generate(4, selector=selector, seed=5, batch_size=1, **opts)) == whole[:4]
    assert ids(gen.generate(8, selector=selector, seed=6, batch_size=8, **opts)) != whole


def test_batch_invariance_with_the_sampling_head(tiny_run, tmp_path):
    from imadarem.export.onnx_export import export_checkpoint

    gen = Generator(export_checkpoint(tiny_run, tmp_path / "head.onnx", sampling=True))
    assert gen.model.graph_sampling
    whole = ids(gen.generate(6, seed=2, batch_size=6))
    assert ids(gen.generate(6, seed=2, batch_size=4)) == whole
    assert ids(gen.generate(3, seed=2)) == whole[:3]


def test_iter_generate_yields_a_batch_before_running_the_next(tiny_onnx, monkeypatch):
    gen = Generator(tiny_onnx)
    calls = []
    from imadarem.runtime.refinement import RefinementPlan

    original = RefinementPlan.start

    def counting(self, n, *args, **kwargs):
        calls.append(n)
        return original(self, n, *args, **kwargs)

    monkeypatch.setattr(RefinementPlan, "start", counting)
    stream = gen.iter_generate(10, batch_size=4, seed=0)
    first = next(stream)
    assert first.ids and calls == [4]
    rest = list(stream)
    assert len(rest) == 9 and calls == [4, 4, 2]


def test_iter_generate_checks_arguments_before_the_first_batch(tiny_onnx):
    gen = Generator(tiny_onnx)
    for bad in ({"seed": -1}, {"steps": 10**9}, {"batch_size": 0}, {"temperature": float("nan")}):
        with pytest.raises(Exception, match="seed|steps|batch_size|temperature") as info:
            gen.iter_generate(2, **bad)
        assert type(info.value).__name__ == "ImadaremError"


def test_cli_n4_is_the_prefix_of_n8_for_any_batch_size(tiny_onnx):
    _, eight, _ = in_process([str(tiny_onnx), "-n", "8", "--seed", "9", "--batch-size", "3"])
    _, four, _ = in_process([str(tiny_onnx), "-n", "4", "--seed", "9"])
    assert four.splitlines() == eight.splitlines()[:4] and len(eight.splitlines()) == 8


def test_edits_do_not_count_padding(tiny_onnx):
    for s in Generator(tiny_onnx).generate(12, seed=1):
        assert all(0 <= e <= len(s.ids) for e in s.edits), (s.edits, len(s.ids))


# -- the command line as a process: streaming, Ctrl-C, pipes, memory ----------------------------------------
def _cli(*args):
    return [sys.executable, "-c", "from imadarem.runtime.cli import run_main; run_main()", *args]


def test_output_streams_and_ctrl_c_keeps_it(tiny_onnx):
    proc = subprocess.Popen(_cli(str(tiny_onnx), "-n", "1000000", "--batch-size", "16", "--seed", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # arrives long before the million are done: output streams
    assert first.strip()
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(rest.splitlines()) >= 15  # the rest of the first batch at least was kept
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


def test_closed_pipe_is_a_quiet_exit_0(tiny_onnx):
    proc = subprocess.Popen(_cli(str(tiny_onnx), "-n", "5000", "--batch-size", "64"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == b""


@pytest.mark.slow
def test_memory_is_bounded_by_the_batch_not_by_n(tiny_onnx):
    """Peak RSS of `-n 20000` stays within 30 MB of `-n 1000` (both past the allocators' warm-up, which
    takes a few batches); before streaming and the bounded default batch, every sample and the whole
    request's arrays were held to the end."""

    def peak_mb(n):
        code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", code, *_cli(str(tiny_onnx), "-n", str(n), "--steps", "4",
                                                                "--format", "jsonl")],
                             capture_output=True, text=True, check=True).stdout
        return int(out) / 1024

    small, large = peak_mb(1000), peak_mb(20000)
    assert large < small + 30, (small, large)
    assert large < 600, large  # the fixed ceiling: a few hundred MB of Python, numpy and onnxruntime


# -- prompts ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(BUNDLED is None, reason="no bundled model")
def test_smiles_fragment_prompts_are_continued_not_closed():
    gen = Generator()
    prefix = gen.tokenizer.encode_fragment("CC(=O)", first=True, open_end=True)
    assert [gen.tokenizer.id_to_token(i) for i in prefix] == ["[C]", "[C]", "[=Branch1]", "[C]", "[=O]"]
    samples = gen.generate(8, prompt="CC(=O)<mask:10>", seed=0)
    assert all(s.ids[: len(prefix)] == prefix for s in samples)
    assert len({s.text for s in samples}) > 1 and all(s.text != "CC=O" for s in samples)


@pytest.mark.skipif(BUNDLED is None, reason="no bundled model")
@pytest.mark.parametrize("prompt,reason", [
    ("CC(<mask:5>", "leaves a branch open"),
    ("C1CC<mask:5>", "leaves ring bond 1 open"),
    ("CC#N<mask:4>", "no free valence"),
    ("CC=<mask:4>", "ends with a bond"),
    ("[C]<mask:2>O", "can only start a prompt"),
    ("<mask:-1>", "is not <mask> or <mask:N>"),
    ("<mask:99999999999999999999>", "at most 56"),
    ("[C][C](=O)<mask:12>", "unknown token"),
])
def test_prompts_that_cannot_be_fragments_are_refused_with_the_reason(prompt, reason):
    with pytest.raises(PromptError, match=re.escape(reason)):
        Generator().generate(1, prompt=prompt)


def _documented_prompts():
    readme = (ROOT / "README.md").read_text()
    code, help_text, _ = in_process(["--help"])
    assert code == 0
    # the examples run on the bundled model (those naming another model file need that model)
    found = re.findall(r"imadarem-run --prompt '([^']+)'", readme) + re.findall(r"'([^' ]*<mask:\d+>)'", " ".join(help_text.split()))
    return found


@pytest.mark.skipif(BUNDLED is None, reason="no bundled model")
def test_the_readme_and_help_prompt_examples_work():
    prompts = _documented_prompts()
    assert len(prompts) >= 3, prompts
    for prompt in prompts:
        code, out, err = in_process(["-n", "2", "--seed", "0", "--prompt", prompt])
        assert code == 0 and len(out.splitlines()) == 2, (prompt, err)


# -- plugin faults ------------------------------------------------------------------------------------------
class Raising(Selector):
    name = "raising"

    def select(self, state):
        raise ZeroDivisionError("oops")


class Shaped(Selector):
    name = "shaped"

    def __init__(self, *, answer="ok"):
        self.answer = answer

    def select(self, state):
        b, n = state.tokens.shape
        return {
            "row": Decision(np.zeros(n, bool)),
            "true": Decision(True),
            "none": Decision(None),
            "floats": Decision(np.zeros((b, n))),
            "stop": Decision(np.zeros((b, n), bool), stop=np.zeros(b + 1, bool)),
            "tuple": (np.zeros((b, n), bool),),
        }[self.answer]


@pytest.mark.parametrize("answer,message", [
    ("row", "Decision.update of shape"), ("true", "Decision.update of type bool"),
    ("none", "Decision.update of type NoneType"), ("floats", "dtype float64"),
    ("stop", "Decision.stop of shape"), ("tuple", "must return a Decision"),
])
def test_a_bad_decision_is_refused_naming_the_selector(tiny_onnx, answer, message):
    with pytest.raises(PluginError, match=re.escape(message)) as info:
        Generator(tiny_onnx).generate(2, selector=Shaped(answer=answer))
    assert "selector 'shaped'" in str(info.value) and __name__ in str(info.value)


def test_a_selector_that_raises_is_blamed_not_the_loop(tiny_onnx):
    with pytest.raises(PluginError, match=r"selector 'raising' .* failed in select\(\): ZeroDivisionError: oops"):
        Generator(tiny_onnx).generate(2, selector=Raising())


# -- model files --------------------------------------------------------------------------------------------
def _config(**changes):
    def change(meta):
        meta[KEY_CONFIG] = json.dumps(dict(json.loads(meta[KEY_CONFIG]), **changes))
    return change


@pytest.mark.parametrize("change,message", [
    (lambda m: m.__setitem__(KEY_PROVENANCE, "{not json"), "'imadarem.provenance' is not valid JSON"),
    (lambda m: m.__setitem__(KEY_PROVENANCE, "[1]"), "must be a JSON object"),
    (_config(vocab_size="abc"), "vocab_size must be a positive integer and <= 1,048,576, got 'abc'"),
    (_config(vocab_size=None), "vocab_size must be a positive integer and <= 1,048,576, got None"),
    (_config(max_seq_len=0), "max_seq_len must be a positive integer and <= 4,096, got 0"),
    (_config(max_seq_len=128), "cannot run one step at the config's max_seq_len 128"),
    (_config(sampling_temperature=-1), "sampling_temperature must be a number >= 0, got -1"),
    (_config(max_refinement_steps=0), "model config max_refinement_steps"),
])
def test_bad_model_files_are_one_line_for_run_and_inspect(tiny_onnx, tmp_path, change, message):
    from imadarem.runtime.cli import cli

    path = rewrite_metadata(tiny_onnx, tmp_path / "bad.onnx", change)
    for args, command in (([str(path)], run_command), (["inspect", str(path)], cli)):
        code, _, err = in_process(args, command=command)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_tokenizer_from_another_distribution_warns_in_one_line(tiny_onnx, tmp_path):
    origin = json.loads(Generator(tiny_onnx).model.metadata[KEY_TOKENIZER_ORIGIN])
    assert origin["name"] == "imadarem"
    path = rewrite_metadata(tiny_onnx, tmp_path / "other.onnx",
                    lambda m: m.__setitem__(KEY_TOKENIZER_ORIGIN, json.dumps({"name": "other-dist", "version": "9"})))
    code, out, err = in_process([str(path), "-n", "3", "--seed", "0"])
    assert code == 0 and len(out.splitlines()) == 3  # one line per molecule (a tiny model's may be empty)
    assert err.count("\n") == 1 and "warning:" in err and "other-dist 9" in err


def test_run_h_and_inspect_default(tiny_onnx):
    from imadarem.runtime.cli import cli

    code, out, _ = in_process(["-h"])
    assert code == 0 and "--batch-size" in out
    if BUNDLED is not None:
        code, out, _ = in_process(["inspect"], command=cli)
        assert code == 0 and "parameters" in out


def test_plugins_exits_non_zero_when_a_plugin_failed(monkeypatch):
    import importlib.metadata as md

    from imadarem.runtime import registry
    from imadarem.runtime.cli import cli

    broken = md.EntryPoint("broken", "no_such_module_xyz", "imadarem")
    fresh = registry.Registry(list(md.entry_points(group="imadarem")) + [broken])
    monkeypatch.setattr(registry, "default_registry", lambda: fresh)
    code, out, err = in_process(["plugins"], command=cli)
    assert code == 1 and "gate" in out and "no_such_module_xyz" in err
    with pytest.raises(Exception, match="unknown selector 'nope'.*no_such_module_xyz"):
        registry.create_selector("nope")


# -- the fuzzed command line ---------------------------------------------------------------------------------
TEXT = st.text(alphabet="CNO()=#[]1%<>:mask-0123456789 ", max_size=24)
PROMPTS = st.one_of(TEXT, st.sampled_from(["CC(=O)<mask:6>", "<mask:3>", "[C][C]<mask:4>", "<mask:-2>", "C1CC<mask>",
                                           "<mask:1000000000000>", "c1ccccc1"]))
NUMBERS = st.one_of(st.integers(-3, 10**12), st.sampled_from(["nan", "inf", "-0", "1e9", "x", ""])).map(str)
OPTION = st.one_of(st.just([]), st.tuples(st.sampled_from(["--seed", "--steps", "--temperature", "--stop-threshold",
                                                           "-n", "--batch-size", "--threads"]), NUMBERS).map(list),
                   st.tuples(st.just("--prompt"), PROMPTS).map(list),
                   st.tuples(st.just("--selector"), st.sampled_from(["gate", "maskgit", "critic", "l2r", "nope", ""])).map(list),
                   st.tuples(st.just("-o"), st.sampled_from(["threshold=2", "schedule=x", "noise=-1", "per_step=0",
                                                             "bogus=1", "=", "threshold"])).map(list),
                   st.sampled_from([["--format", "jsonl"], ["--trajectory"], ["--format", "xml"], ["--provider", "tpu"]]))
CONFIG_KEYS = ["vocab_size", "hidden_size", "max_seq_len", "max_refinement_steps", "stop_threshold",
               "sampling_temperature", "min_refine_uncertainty", "use_refine_gate"]
JSONISH = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=False, width=32),
                    st.text(max_size=4), st.lists(st.integers(), max_size=2))


def _fuzz_ok(code, err):
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err and err.count("\n") <= 1, err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.lists(OPTION, max_size=4))
def test_fuzzed_arguments_give_exit_0_or_2_and_at_most_one_line(tiny_onnx, options):
    args = [str(tiny_onnx), "-n", "2", "--steps", "3"] + [a for opt in options for a in opt]
    if any(a in ("-n", "--steps") for opt in options for a in opt[:1]):
        args = [str(tiny_onnx)] + [a for opt in options for a in opt]
        n = [opt[1] for opt in options if opt and opt[0] == "-n"]
        if n and n[-1].isdigit() and int(n[-1]) > 4:
            return  # a valid large -n only takes time; the memory test covers it
    if any(opt[:1] == ["--steps"] and opt[1].isdigit() and int(opt[1]) > 50 for opt in options):
        return  # valid but slow (up to MAX_STEPS); the bound itself is fuzzed through larger values below
    code, _, err = in_process(args)
    _fuzz_ok(code, err)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(CONFIG_KEYS + [KEY_PROVENANCE, KEY_TOKENIZER_ORIGIN]), value=JSONISH,
       raw=st.booleans())
def test_fuzzed_model_metadata_gives_exit_0_or_2_and_at_most_one_line(tiny_onnx, tmp_path_factory, key, value, raw):
    def change(meta):
        if key in CONFIG_KEYS:
            meta[KEY_CONFIG] = json.dumps(dict(json.loads(meta[KEY_CONFIG]), **{key: value}))
        else:
            meta[key] = str(value) if raw else json.dumps(value)

    path = rewrite_metadata(tiny_onnx, tmp_path_factory.mktemp("fz") / "m.onnx", change)
    code, _, err = in_process([str(path), "-n", "1", "--steps", "2"])
    _fuzz_ok(code, err)


def test_threads_beyond_the_cores_are_refused_not_spawned(tiny_onnx):
    code, _, err = in_process([str(tiny_onnx), "--threads", "100000"])
    assert code == 2 and err.count("\n") == 1 and "threads must be at most" in err and "ONNX" not in err, err


def test_steps_beyond_the_bound_are_refused_not_allocated(tiny_onnx):
    code, _, err = in_process([str(tiny_onnx), "--steps", "1000000000"])
    assert code == 2 and "1000000000" in err and err.count("\n") == 1
    code, _, err = in_process([str(tiny_onnx), "--seed", "-1"])
    assert code == 2 and "--seed" in err and err.count("\n") == 1



def test_eval_samples_refuses_bad_input_in_one_line_before_loading_moses(tmp_path):
    """`imadarem eval molecules --samples`: a missing or empty file, or generation options beside it, is one
    line and exit 2, before MOSES (a download on a fresh machine) is touched."""
    empty = tmp_path / "empty.smi"
    empty.write_text("")
    cli = [sys.executable, "-c", "from imadarem.runtime.cli import main; main()", "eval", "molecules"]
    for args, message in ((["--samples", str(tmp_path / "none.smi")], "cannot read samples"),
                          (["--samples", str(empty)], "holds no molecules"),
                          (["--samples", "--selector", "gate", str(empty)], "takes no --model"),
                          (["--samples", "-o", "threshold=0.5", str(empty)], "--option"),
                          ([str(empty)], "give --samples and the SMILES files"),
                          (["--samples"], "give --samples and the SMILES files")):
        r = subprocess.run(cli + args + ["--moses-cache", str(tmp_path / "nothing-here")], capture_output=True,
                           text=True)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / "nothing-here").exists()

"""Property-based fuzzing of the command line (hypothesis): whatever the options, prompts and model
metadata, `imadarem-run` and `imadarem inspect` end with exit 0 or 2, never a traceback, and on exit 0
they wrote what they promise (one line per molecule)."""

import json
import os

import pytest
from conftest import FIXTURES, rewrite_metadata
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from imadarem.runtime.cli import cli
from test_cli_contract import in_process

PINNED = FIXTURES / "pinned"
MODELS = ["refine.onnx", "refine-head.onnx", "causal.onnx", "causal-l2r.onnx", "decode.onnx"]
SYMBOLS = ["[C]", "[N]", "[O]", "[=C]", "[=O]", "[Branch1]", "[Ring1]", "[F]", "C", "CC(=O)", "c1ccccc1", "(", "#"]
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
NUMBER = st.one_of(st.integers(-5, 60).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr), TEXT)
PROMPT = st.lists(st.one_of(st.sampled_from(SYMBOLS), st.integers(-2, 70).map(lambda k: f"<mask:{k}>"),
                            st.just("<mask>"), st.just("<mask:x>"), TEXT), max_size=8).map("".join)
OPTION = st.tuples(st.sampled_from(["threshold", "schedule", "noise", "anneal_temperature", "per_step", "budget",
                                    "mode", "use_gate", "nope", ""]),
                   st.one_of(NUMBER, st.sampled_from(["true", "False", "no", "linear", "cosine", "topk", "[]",
                                                      "{}", "null"]))).map(lambda kv: f"{kv[0]}={kv[1]}")


def mostly(valid, odd):
    """Valid values four times in five, so that most examples run and the odd ones stay a minority."""
    return st.integers(0, 4).flatmap(lambda k: valid if k < 4 else odd)


@st.composite
def run_args(draw):
    args = [str(PINNED / draw(st.sampled_from(MODELS)))]
    n = draw(mostly(st.integers(1, 5), st.one_of(st.integers(-2, 0), TEXT)))
    args += ["-n", str(n)]
    flags = {"--seed": mostly(st.integers(0, 2**40), st.one_of(st.integers(-3, -1), TEXT)),
             "--batch-size": mostly(st.integers(1, 7), st.one_of(st.integers(-1, 0), TEXT)),
             "--steps": mostly(st.integers(1, 30), st.one_of(st.integers(-1, 0), st.just(10**9))),
             "--temperature": mostly(st.floats(0, 3), NUMBER), "--stop-threshold": mostly(st.floats(0, 1), NUMBER),
             "--drafts": mostly(st.integers(0, 2), st.integers(-1, 4)),
             "--selector": mostly(st.sampled_from(["gate", "maskgit", "entropy", "critic", "uniform", "l2r",
                                                   "overwrite"]), st.sampled_from(["nope", ""])),
             "--format": mostly(st.sampled_from(["text", "jsonl"]), st.just("xml")),
             "--threads": mostly(st.integers(1, 2), st.integers(-1, 10**6)),
             "--prompt": mostly(st.sampled_from(["[C][O]<mask:4>[N]", "[C][C]", "CC(=O)<mask:3>", "<mask:5>[O]"]),
                                PROMPT)}
    for flag, strategy in flags.items():
        if draw(st.integers(0, 3)) == 0:
            args += [flag, str(draw(strategy))]
    for option in draw(st.lists(OPTION, max_size=2)) if draw(st.integers(0, 3)) == 0 else []:
        args += ["-o", option]
    return args, n


@settings(max_examples=int(os.environ.get("IMADAREM_FUZZ_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run_args())
def test_imadarem_run_never_tracebacks_and_prints_what_it_promises(case):
    args, n = case
    code, out, err = in_process(args)
    event(f"exit {code}")
    assert code in (0, 2), (args, code, err)
    assert "Traceback" not in err, (args, err)
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("imadarem-run: error: "), (args, err)
    else:
        assert len(out.splitlines()) == int(n), (args, out)


METADATA_KEYS = ["imadarem.format", "imadarem.config", "imadarem.tokenizer", "imadarem.special_ids",
                 "imadarem.provenance", "imadarem.tokenizer_origin", "imadarem.decode_start"]
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10, 10**13), st.floats(), st.text(max_size=6)),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


@st.composite
def metadata_edit(draw):
    name = draw(st.sampled_from(["refine.onnx", "causal.onnx", "decode.onnx"]))
    key = draw(st.sampled_from(METADATA_KEYS))
    kind = draw(st.sampled_from(["drop", "replace", "config-field"]))
    value = draw(JSON)
    field = draw(st.sampled_from(["vocab_size", "max_seq_len", "hidden_size", "num_layers", "num_heads",
                                  "num_drafts", "cache_len", "max_refinement_steps", "stop_threshold",
                                  "sampling_temperature", "kind", "graph"]))
    return name, key, kind, value, field


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzzed")


@settings(max_examples=int(os.environ.get("IMADAREM_FUZZ_EXAMPLES", 40)), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(metadata_edit())
# found by this test: a refine file's max_seq_len sized a 34 GiB probe before any check
@example(("refine.onnx", "imadarem.format", "config-field", 4_599_949_568, "max_seq_len"))
def test_a_file_with_fuzzed_metadata_opens_or_is_refused_in_one_line(scratch, edit):
    name, key, kind, value, field = edit

    def change(meta):
        if kind == "drop":
            meta.pop(key, None)
        elif kind == "replace":
            meta[key] = json.dumps(value)
        else:
            config = json.loads(meta["imadarem.config"])
            config[field] = value
            meta["imadarem.config"] = json.dumps(config)

    path = rewrite_metadata(PINNED / name, scratch / "fuzzed.onnx", change)
    code, out, err = in_process(["inspect", str(path)], "imadarem", cli)
    event(f"inspect exit {code}")
    assert code in (0, 2) and "Traceback" not in err, (edit, err)
    if code == 2:
        assert err.count("\n") == 1, (edit, err)
        return
    assert out.startswith("model file")
    code, out, err = in_process([str(path), "-n", "2", "--seed", "0"])
    assert code in (0, 2) and "Traceback" not in err, (edit, err)
    assert len(out.splitlines()) == 2 if code == 0 else err.count("\n") == 1, (edit, out, err)

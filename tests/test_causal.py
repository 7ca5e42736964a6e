"""Causal model files (format 2): export with a KV cache; the refinement loop over them (every draft verified,
so every selector samples the left-to-right distribution) and the plain left-to-right decoder."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import rewrite_metadata
from imadarem.export.causal_export import causal_parity, export_causal
from imadarem.plugins.tokenizers.selfies import SelfiesTokenizer
from imadarem.runtime import ImadaremError, ModelFileError
from imadarem.runtime.bans import blank_bans
from imadarem.runtime.formats.causal import CausalConfig
from imadarem.runtime.generator import Generator
from imadarem.runtime.metadata import KEY_CONFIG
from imadarem.runtime.results import LoopTimings
from imadarem.training.causal import CausalLM

SYMBOLS = ["[C]", "[N]", "[O]", "[=C]", "[=O]", "[Branch1]", "[Ring1]", "[F]"]


def tiny_model(drafts=2, seed=0, scale=8.0):
    torch.manual_seed(seed)
    model = CausalLM(CausalConfig(vocab_size=4 + len(SYMBOLS), max_seq_len=12, hidden_size=32, num_layers=2,
                                  num_heads=2, num_drafts=drafts), SelfiesTokenizer(SYMBOLS))
    with torch.no_grad():  # untrained but not uniform: sharper logits, draft heads unlike the main head
        model.tok.weight.mul_(scale)
        for lin in model.draft:
            lin.weight.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def causal_file(tmp_path_factory):
    model = tiny_model()
    return model, export_causal(model, tmp_path_factory.mktemp("causal") / "c.onnx")


def ids(samples):
    return [s.ids for s in samples]


def test_the_file_matches_pytorch_whole_and_through_the_cache(causal_file):
    model, path = causal_file
    report = causal_parity(model, path)
    assert report["max_abs_diff"]["logits"] < 1e-4 and report["max_abs_diff"]["logits_through_cache"] < 1e-4


def test_greedy_draft_and_verify_is_exactly_greedy_left_to_right(causal_file):
    loop = Generator(causal_file[1]).generate(64, temperature=0.0, seed=1)  # gate: draft-and-verify
    l2r = Generator(causal_file[1]).generate(64, temperature=0.0, seed=1, drafts=0)
    assert ids(loop) == ids(l2r)
    assert np.mean([s.steps for s in loop]) < np.mean([s.steps for s in l2r])


def token_frequencies(samples, j, V):
    tok = [s.ids[j] if j < len(s.ids) else -1 for s in samples]
    return np.bincount(np.array(tok) + 1, minlength=V + 1) / len(tok)


@pytest.fixture(scope="module")
def ancestral(causal_file):
    return Generator(causal_file[1]).generate(4000, seed=3, decode=False, drafts=0)


def test_the_left_to_right_decoder_samples_the_model(causal_file, ancestral):
    """The counter-based noise is real sampling: first-token frequencies of 4,000 molecules match the
    model's softmax (chi-square), and the second token follows the first's conditional."""
    model, path = causal_file
    with torch.no_grad():
        past, valid = model.empty_cache(1)
        logits = model.step(torch.full((1, 1), model.special.mask), torch.zeros(1, 1, dtype=torch.long), past, valid)[0]
    tok = model.tokenizer  # the bans: MASK, PAD, UNK (the same at every position)
    bias = blank_bans(tok, model.special, tok.vocab_size, model.config.max_seq_len)[0]
    p = torch.softmax(logits[0, 0].double() + torch.from_numpy(bias).double(), -1).numpy()
    counts = np.bincount([s.ids[0] for s in ancestral], minlength=len(p))
    expected = p * len(ancestral)
    seen = expected > 5
    chi2 = float((((counts - expected) ** 2 / np.where(seen, expected, 1))[seen]).sum())
    assert chi2 < 3 * seen.sum() + 10, (chi2, seen.sum())  # ~ dof for real sampling; thousands if biased
    assert counts[~seen].sum() < 0.01 * len(ancestral)


@pytest.mark.parametrize("selector,options", [("gate", {}), ("maskgit", {}), ("critic", {}), ("uniform", {}),
                                              ("l2r", {"per_step": 2}), ("entropy", {}),
                                              ("overwrite", {})])
def test_every_selector_gives_the_left_to_right_molecules_token_for_token(causal_file, ancestral, selector, options):
    """On a causal file a draft is kept iff it is the exact token of its position, drawn with that
    position's own noise, so whatever the selector places, the molecules are the left-to-right decoder's
    for the same seed (fp32: the same numbers up to rounding); the selector changes only the calls."""
    gen = Generator(causal_file[1])
    a = gen.generate(400, selector=selector, seed=3, decode=False, **options)
    same = np.mean([x.ids == y.ids for x, y in zip(a, ancestral)])
    assert same >= 0.99, same
    calls = np.mean([s.steps for s in a])
    assert calls < np.mean([s.steps for s in ancestral[:400]]) or selector in ("uniform", "maskgit"), calls


def test_greedy_and_annealed_runs_keep_the_identity(causal_file):
    gen = Generator(causal_file[1])
    assert ids(gen.generate(50, seed=6, temperature=0.7)) == ids(gen.generate(50, seed=6, temperature=0.7, drafts=0))
    annealed = gen.generate(50, selector="maskgit", seed=6, anneal_temperature=True)  # drafts at other T
    assert ids(annealed) == ids(gen.generate(50, seed=6, drafts=0))


def test_the_gate_commits_the_most_per_call(causal_file):
    gen = Generator(causal_file[1])
    calls = {sel: np.mean([s.steps for s in gen.generate(300, selector=sel, seed=5, decode=False)])
             for sel in ("gate", "maskgit", "l2r")}
    assert calls["gate"] < min(calls["maskgit"], calls["l2r"]), calls


def test_a_call_verifies_at_most_the_draft_window_whatever_the_selector(causal_file):
    """critic fills every mask each step; only the D drafts the heads reach are fed and verified."""
    gen = Generator(causal_file[1])
    timings = LoopTimings()
    samples = gen.generate(50, selector="critic", seed=0, timings=timings, decode=False)
    assert max(timings.run_lengths) == 1 + gen.model.typed.num_drafts
    assert np.mean([s.steps for s in samples]) < np.mean([len(s.ids) for s in samples])


def test_same_seed_same_molecules_for_any_batch_size(causal_file):
    gen = Generator(causal_file[1])
    for drafts in (None, 1, 0):
        whole = ids(gen.generate(9, seed=4, batch_size=9, drafts=drafts))
        assert ids(gen.generate(9, seed=4, batch_size=2, drafts=drafts)) == whole
        assert ids(gen.generate(5, seed=4, drafts=drafts)) == whole[:5]


def test_a_prompt_prefix_is_kept_and_continued(causal_file):
    gen = Generator(causal_file[1])
    samples = gen.generate(20, prompt="[C][=O]<mask:6>", seed=0)
    assert all(s.ids[:2] == gen.tokenizer.encode("[C][=O]")[:2] for s in samples)
    assert all(len(s.ids) <= 9 for s in samples)  # two literals, six blanks, the EOS slot


def test_a_step_budget_below_what_rows_need_still_ends_every_row(causal_file):
    samples = Generator(causal_file[1]).generate(16, steps=2, seed=0)
    assert all(s.steps <= 2 and s.ids for s in samples)


def test_bad_requests_are_one_line_errors(causal_file):
    gen = Generator(causal_file[1])
    for kwargs, error, message in (({"drafts": 3}, ImadaremError, "has 2 draft heads"),
                                   ({"drafts": -1}, ImadaremError, "drafts must be an integer >= 0"),
                                   ({"selector": "nope"}, ImadaremError, "nope"),
                                   ({"seed": -1}, ImadaremError, "seed"),
                                   ({"temperature": -1.0}, ImadaremError, "temperature")):
        with pytest.raises(error, match=message):
            gen.iter_generate(2, **kwargs)


@pytest.mark.parametrize("change,message", [
    ({"num_drafts": -1}, "num_drafts must be an integer >= 0"),
    ({"kind": "refinement"}, "must say \"kind\": \"causal\""),
    ({"num_heads": 3}, "not a multiple of num_heads"),
    ({"num_layers": 3}, "the causal graph does not run with its config"),
    ({"vocab_size": 13}, "tokenizer has 12 tokens"),
])
def test_bad_causal_files_are_refused(causal_file, tmp_path, change, message):
    def edit(meta):
        meta[KEY_CONFIG] = json.dumps(dict(json.loads(meta[KEY_CONFIG]), **change))

    path = rewrite_metadata(causal_file[1], tmp_path / "bad.onnx", edit)
    with pytest.raises(ModelFileError, match=message):
        Generator(path)


def test_the_command_line_runs_and_inspects_a_causal_file(causal_file):
    path = str(causal_file[1])
    run = [sys.executable, "-c", "from imadarem.runtime.cli import main; import sys; main(sys.argv[1:])"]
    r = subprocess.run(run + ["run", path, "-n", "3", "--seed", "0", "--format", "jsonl"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3 and "ids" in json.loads(r.stdout.splitlines()[0])
    r = subprocess.run(run + ["run", path, "--selector", "maskgit", "-n", "2"], capture_output=True, text=True)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr
    r = subprocess.run(run + ["run", path, "--selector", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope" in r.stderr
    r = subprocess.run(run + ["inspect", path, "--json"], capture_output=True, text=True)
    info = json.loads(r.stdout)
    assert info["format"] == "2" and info["config"]["kind"] == "causal" and info["parameters"] > 0


def test_int4_weight_only_file_is_smaller_and_decodes(causal_file, tmp_path):
    import onnx
    from imadarem.export.onnx_export import quantize_int4

    model, path = causal_file
    small = quantize_int4(path, tmp_path / "int4.onnx")
    ops = {node.op_type for node in onnx.load(str(small)).graph.node}
    assert "MatMulNBits" in ops and small.stat().st_size < 0.7 * path.stat().st_size  # ~0.18x for the real model
    gen = Generator(small)
    assert gen.model.typed == Generator(path).model.typed
    assert all(s.ids for s in gen.generate(8, seed=0))

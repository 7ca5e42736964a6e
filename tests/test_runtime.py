"""The refinement loop: selector invariants (hypothesis), prompts, threads, the CLI."""

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imadarem.plugins.tokenizers import CharTokenizer
from imadarem.runtime import Generator, PromptError, SelectorError, UnknownPluginError
from imadarem.runtime.formats.refine import RefineConfig, RefineFile
from imadarem.runtime.metadata import Common
from imadarem.runtime.tokenizer import resolve_special_ids

TOK = CharTokenizer.from_corpus(["abcdefgh"])  # ids: 0 pad, 1 mask, 2 eos, 3 unk, 4.. letters
SP = resolve_special_ids(TOK)
V, H, L = TOK.vocab_size, 4, 12


class FakeSession:
    """Random outputs with the step signature: exercises the loop, not a network."""

    def __init__(self, seed, eos_bias, critic):
        self.seed = seed
        self.eos_bias = eos_bias
        self.critic = critic

    def run(self, _names, feeds):
        import zlib

        # outputs are a function of the inputs, like a real network's
        self.rng = np.random.default_rng([self.seed, zlib.crc32(feeds["tokens"].tobytes()), int(feeds["step"][0])])
        b, n = feeds["tokens"].shape
        logits = self.rng.normal(size=(b, n, V)).astype(np.float32) * 2
        logits[..., SP.eos] += self.eos_bias
        outs = [logits, self.rng.random((b, n)).astype(np.float32), self.rng.normal(size=(b, n, H)).astype(np.float32)]
        if self.critic:
            outs.append(self.rng.random((b, n)).astype(np.float32))
        return outs


def fake_generator(seed=0, eos_bias=0.0, critic=True, steps=6):
    cfg = {"vocab_size": V, "hidden_size": H, "max_seq_len": L, "max_refinement_steps": steps, "stop_threshold": 0.02,
           "sampling_temperature": 1.0, "min_refine_uncertainty": 0.1, "use_refine_gate": True}
    outputs = ["logits", "gate", "cond_next"] + (["critic"] if critic else [])
    common = Common(cfg, RefineConfig.from_dict(cfg), TOK, SP, {})
    return Generator(RefineFile("fake.onnx", FakeSession(seed, eos_bias, critic), {}, common,
                                extra={"inputs": ["tokens", "step", "cond"], "outputs": outputs}))


SELECTORS = ["gate", "entropy", "maskgit", "overwrite", "critic", "uniform", "l2r"]
PROMPTS = [None, "abc", "a<mask:3>c<mask:2>", "<mask:4>h", "ab<mask>"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(selector=st.sampled_from(SELECTORS), seed=st.integers(0, 10_000), steps=st.integers(1, 9),
       temperature=st.sampled_from([0.0, 0.7, 1.5]), eos_bias=st.sampled_from([-3.0, 0.0, 2.0]),
       prompt=st.sampled_from(PROMPTS), stop=st.sampled_from([0.0, 0.02, 0.5]))
def test_selector_invariants(selector, seed, steps, temperature, eos_bias, prompt, stop):
    gen = fake_generator(seed, eos_bias)
    samples = gen.generate(5, selector=selector, steps=steps, temperature=temperature, seed=seed, prompt=prompt,
                           stop_threshold=stop, trajectory=True)
    from imadarem.runtime.prompt import blank_layout, parse_prompt

    layout = blank_layout(L, SP) if prompt is None else parse_prompt(prompt, TOK, SP, L)
    for s in samples:
        ids = s.ids
        assert SP.mask not in ids, "no mask may be left"
        assert SP.pad not in ids and TOK.unk_token_id not in ids
        if SP.eos in ids:  # EOS freezing: the sequence ends at its first EOS
            assert ids.index(SP.eos) == len(ids) - 1
        assert 1 <= s.steps <= steps and len(s.edits) == s.steps
        assert s.early_stop == (s.steps < steps) or (s.steps == steps and not s.early_stop)
        # frozen prompt positions never change, at any step
        for step in s.trajectory:
            for pos in np.flatnonzero(layout.fixed):
                if pos < len(step.tokens) and step.tokens[pos] != SP.pad:
                    assert step.tokens[pos] == layout.ids[pos]
        final = np.array(s.trajectory[-1].tokens)
        if SP.eos in final.tolist():
            first = final.tolist().index(SP.eos)
            assert (final[first + 1 :] == SP.pad).all()
        for a, b in zip(s.trajectory, s.trajectory[1:]):  # once EOS, the tail stays padding
            if SP.eos in a.tokens:
                first = a.tokens.index(SP.eos)
                assert b.tokens[first:] == a.tokens[first:]


def test_early_stop_when_nothing_changes():
    # a gate of zero after the first step changes nothing: every sequence stops at t=1
    class ZeroGate(FakeSession):
        def run(self, names, feeds):
            outs = super().run(names, feeds)
            outs[1][:] = 0.0 if (feeds["tokens"] != SP.mask).all() else 1.0
            return outs

    gen = fake_generator()
    gen.model.session = ZeroGate(0, -5.0, True)
    samples = gen.generate(4, selector="gate", steps=6, seed=0)
    assert all(s.steps == 2 and s.early_stop for s in samples)
    assert all(s.edits[1] == 0 for s in samples)


def test_template_prompt_keeps_layout():
    gen = fake_generator(eos_bias=5.0)  # eager to end: EOS is still banned between fixed tokens
    for s in gen.generate(8, selector="maskgit", prompt="a<mask:3>c<mask:2>", seed=1):
        text = s.text
        assert text[0] == "a" and text[4] == "c" and 5 <= len(text) <= 7


def test_bad_prompts_and_options():
    gen = fake_generator()
    with pytest.raises(PromptError, match="unknown token 'z'"):
        gen.generate(1, prompt="abz")
    with pytest.raises(PromptError, match="at most 12"):
        gen.generate(1, prompt="a<mask:20>")
    with pytest.raises(PromptError, match="at most 11"):
        gen.generate(1, prompt="abcdefghabcd")
    with pytest.raises(UnknownPluginError, match="available: confidence, critic, entropy"):
        gen.generate(1, selector="nope")
    with pytest.raises(SelectorError, match="no option wat"):
        gen.generate(1, selector="maskgit", wat=1)
    with pytest.raises(SelectorError, match="needs the model output critic"):
        fake_generator(critic=False).generate(1, selector="critic")


def test_same_seed_same_output_and_batching():
    gen = fake_generator()
    a = [s.ids for s in gen.generate(6, seed=3)]
    b = [s.ids for s in gen.generate(6, seed=3)]
    assert a == b
    assert len(gen.generate(7, seed=3, batch_size=3)) == 7


def test_eight_threads_share_one_generator(tiny_onnx):
    gen = Generator(tiny_onnx, threads=1)
    expected = {seed: [s.ids for s in gen.generate(4, seed=seed, selector=sel)]
                for seed, sel in zip(range(8), SELECTORS + ["gate"])}
    results, errors = {}, []

    def work(seed, sel):
        try:
            results[seed] = [s.ids for s in gen.generate(4, seed=seed, selector=sel)]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed, sel)) for seed, sel in zip(range(8), SELECTORS + ["gate"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == expected


def test_every_selector_runs_on_a_trained_model(tiny_onnx):
    gen = Generator(tiny_onnx)
    for sel in SELECTORS:
        samples = gen.generate(6, selector=sel, seed=0, steps=8)
        assert all(SelfiesLike(s.ids) for s in samples)


def SelfiesLike(ids):  # noqa: N802 - reads as a predicate
    return ids and SP.mask not in ids


def run_cli(*args, prog="run_main"):
    code = f"from imadarem.runtime.cli import {prog}; {prog}()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)


def test_cli_generates_text_and_jsonl(tiny_onnx):
    r = run_cli(str(tiny_onnx), "-n", "3", "--seed", "1", "--selector", "maskgit", "-o", "schedule=linear")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 3
    r = run_cli(str(tiny_onnx), "-n", "2", "--seed", "1", "--format", "jsonl", "--trajectory")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and {"text", "ids", "steps", "edits", "early_stop", "trajectory"} <= set(rows[0])
    r = run_cli(str(tiny_onnx), "-n", "1", "--seed", "1", "--trajectory")
    assert "t=0" in r.stdout and "change" in r.stdout
    r = run_cli(str(tiny_onnx), "-n", "2", "--prompt", "[C][C]<mask:6>", "--format", "jsonl")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,message", [
    (["{model}", "--selector", "bogus"], "unknown selector 'bogus' (available:"),
    (["{model}", "-o", "threshold=7"], "threshold must be in"),
    (["{model}", "-o", "novalue"], "is not KEY=VALUE"),
    (["{model}", "--prompt", "[Xx]<mask:3>"], "prompt"),
    (["{model}", "--prompt", "[C]<mask:200>"], "at most 64"),
    (["{model}", "--steps", "0"], "steps"),
    (["{model}", "--selector", "critic", "--temperature", "-1"], "temperature"),
    (["/no/such/model.onnx"], "model file not found"),
    (["{readme}"], "not a readable ONNX model"),
])
def test_cli_bad_input_is_one_line_exit_2(tiny_onnx, args, message):
    from conftest import ROOT

    args = [a.format(model=tiny_onnx, readme=ROOT / "pyproject.toml") for a in args]
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert message in r.stderr


def test_cli_cuda_without_cuda_is_clear(tiny_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    r = run_cli(str(tiny_onnx), "--provider", "cuda")
    assert r.returncode == 2 and "provider 'cuda' is not available" in r.stderr


def test_molecule_metrics_on_known_smiles():
    pytest.importorskip("rdkit")
    from imadarem.training.evaluation.molecules import molecule_metrics

    smiles = ["CCO", "CCO", "c1ccccc1", "not-a-molecule", "", "CC(=O)O"] * 200  # 1200, 800 valid
    m = molecule_metrics(smiles, train={"CCO"}, patterns=[], intdiv_sample=50)
    assert m["valid"] == pytest.approx(800 / 1200)
    assert m["unique@1k"] == pytest.approx(3 / 800)  # fewer than 1k valid: all valid ones, as MOSES
    assert m["novelty"] == pytest.approx(2 / 3)
    assert 0 < m["intdiv"] < 1 and m["filters"] == 1.0


def test_trimming_trailing_padding_changes_no_token(tiny_onnx, monkeypatch):
    from imadarem.runtime.formats.refine import SelfConditionedStep
    from imadarem.runtime.results import LoopTimings

    gen = Generator(tiny_onnx)
    timings = LoopTimings()
    trimmed = gen.generate(32, seed=5, timings=timings)
    assert min(timings.run_lengths) < gen.model.max_seq_len, "the model never ran on fewer positions"
    assert len(timings.step_seconds) == len(timings.run_seconds) == len(timings.active_rows) > 0
    assert 0.0 <= timings.outside_run_fraction() < 1.0
    monkeypatch.setattr(SelfConditionedStep, "trim_padding", False)
    full = gen.generate(32, seed=5)
    assert [s.ids for s in trimmed] == [s.ids for s in full]
    assert [s.edits for s in trimmed] == [s.edits for s in full]


def test_fcd_against_a_reference_set(tmp_path):
    """FCD is ~0 for the reference's own molecules, large for a set unlike it; the reference's statistics
    are cached as plain arrays and reused."""
    pytest.importorskip("fcd")
    from conftest import MOSES_SAMPLE
    from imadarem.training.data import read_smiles
    from imadarem.training.evaluation.molecules import FrechetChemNet

    ref = tmp_path / "ref.csv"
    ref.write_text("\n".join(MOSES_SAMPLE.read_text().splitlines()[:301]) + "\n")
    fcd = FrechetChemNet(ref, tmp_path, device="cpu")
    cached = list(tmp_path.glob("fcd-*-ref-stats.npz"))
    assert len(cached) == 1
    held_out = read_smiles(MOSES_SAMPLE)[300:]
    alkanes = ["C" * k for k in range(2, 40)] * 3
    same, near, far = fcd(read_smiles(ref)), fcd(held_out), fcd(alkanes)
    assert same < 0.5 < near < far and far > 20, (same, near, far)
    again = FrechetChemNet(ref, tmp_path, device="cpu")  # from the cache
    np.testing.assert_allclose(again.mu, fcd.mu)
    assert again(held_out) == pytest.approx(near, rel=1e-6)


def test_ids_only_generation_skips_decoding_and_nothing_else(tiny_onnx):
    gen = Generator(tiny_onnx)
    decoded = gen.generate(6, seed=2)
    raw = gen.generate(6, seed=2, decode=False)
    assert all(s.text is None for s in raw) and all(isinstance(s.text, str) for s in decoded)
    assert [s.ids for s in raw] == [s.ids for s in decoded]
    assert [s.edits for s in raw] == [s.edits for s in decoded] and all(len(s.edits) == s.steps for s in raw)


def test_a_model_trained_without_its_gate_defaults_to_the_gate_off_rule():
    """``use_refine_gate`` false in the config: the untrained gate is never the default selector; the
    gate-off rule (entropy, threshold ``min_refine_uncertainty``) is."""
    from imadarem.runtime.request import Request

    gen = fake_generator()
    assert gen.model.plan(Request.checked(2, None, None, None, None, 0, None, None, False, None, {}))._first.name == "gate"
    gen.model.common.config["use_refine_gate"] = False
    plan = gen.model.plan(Request.checked(2, None, None, None, None, 0, None, None, False, None, {}))
    assert plan._first.name == "entropy"
    assert [s.ids for s in gen.generate(4, seed=1)] == [s.ids for s in gen.generate(4, seed=1, selector="entropy")]

"""``ctranslate2-<p>`` rows of ``imadarem bench`` (issue #26): the converted model is ours, its sampler draws
from our distribution, and a bench run sets the rows beside our one-token decoder."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ctranslate2 = pytest.importorskip("ctranslate2")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """A tiny causal model file, the model the bench rebuilds from it, and its fp32 CTranslate2 generator."""
    from imadarem.bench import ct2
    from imadarem.export.causal_export import export_causal
    from imadarem.export.onnx_import import causal_from_onnx
    from test_causal import tiny_model

    model = tiny_model(drafts=2, scale=3.0)
    with torch.no_grad():  # distinct parameters, as in a trained model
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tmp = tmp_path_factory.mktemp("ct2")
    path = export_causal(model, tmp / "causal.onnx")
    rebuilt, _ = causal_from_onnx(path)
    trunk = rebuilt.without_drafts().eval()
    return path, trunk, ct2.load(ct2.convert(trunk, "fp32", tmp), "fp32", 1)


def test_the_converted_model_is_ours_token_for_token_and_in_its_log_probs(causal):
    from imadarem.bench import ct2
    from imadarem.runtime.generator import Generator

    path, trunk, generator = causal
    sp, tok = trunk.special, trunk.tokenizer
    options = dict(ct2.sampling_options(trunk), sampling_topk=1)
    got = generator.generate_batch([[tok.id_to_token(sp.mask)]], **options)[0].sequences_ids[0]
    ours = Generator(str(path)).generate(1, temperature=0.0, drafts=0)[0].ids  # our greedy left-to-right decoder
    assert got == ours
    # per-step log-probs of sequences our decoder sampled, from BOS on
    rows = [[sp.mask] + s.ids for s in Generator(str(path)).generate(4, seed=3, drafts=0)]
    for row in rows:
        theirs = np.array(generator.forward_batch([row], return_log_probs=True))[0]
        with torch.no_grad():
            mine = torch.log_softmax(trunk.teacher_forcing(torch.tensor([row]))[0][0], -1).numpy()
        np.testing.assert_allclose(theirs, mine, atol=1e-4)


def test_its_sampler_draws_from_our_banned_full_distribution(causal):
    """sampling_topk=0 is the whole softmax (not top-1), with MASK, PAD and UNK suppressed as ours are."""
    from imadarem.bench import ct2
    from imadarem.runtime.bans import banned_ids

    _, trunk, generator = causal
    sp, tok = trunk.special, trunk.tokenizer
    ctranslate2.set_random_seed(0)
    n = 4000
    first = [r.sequences_ids[0][0] for r in generator.generate_batch(
        [[tok.id_to_token(sp.mask)]] * n, **dict(ct2.sampling_options(trunk), max_length=1))]
    seen = np.bincount(first, minlength=trunk.config.vocab_size) / n
    with torch.no_grad():
        logits = trunk.teacher_forcing(torch.tensor([[sp.mask]]))[0][0, 0]
    logits[banned_ids(sp, tok.unk_token_id)] = -float("inf")
    want = torch.softmax(logits / trunk.config.sampling_temperature, -1).numpy()
    assert np.abs(seen - want).max() < 0.04 and seen[banned_ids(sp, tok.unk_token_id)].sum() == 0


def test_the_bench_sets_ctranslate2_rows_beside_our_one_token_decoder(causal, tmp_path, monkeypatch):
    import imadarem.bench.causal as bc
    from imadarem.bench.runner import Bench, BenchArgs

    path, trunk, _ = causal
    monkeypatch.setattr(bc, "_scorer", lambda: (lambda smiles: {"valid": 1.0, "fcd": 0.5}))  # no MOSES here
    engines = ("ort-decode-l2r-fp32", "ctranslate2-fp32", "ctranslate2-int8")
    args = BenchArgs(model=str(path), batch_sizes=(4,), repeats=1, out_dir=str(tmp_path), engines=engines, samples=8,
                     threads=1)
    result = Bench(args).run()
    rows = {r["engine"]: r for r in result["rows"]}
    assert set(rows) == set(engines)
    base = rows["ort-decode-l2r-fp32"]
    for name in ("ctranslate2-fp32", "ctranslate2-int8"):
        r = rows[name]
        assert r["seq_per_s"] > 0 and r["model_calls"] >= 1 and r["outside_run"] is None
        assert 1 <= r["calls_per_molecule"] <= trunk.config.max_seq_len
        assert r["identical_to_baseline"] is None and "identical_to_baseline" not in r["quality"]  # own RNG
        assert r["quality"]["n"] == 8 and r["quality"]["fcd"] == 0.5
        assert any("CTranslate2 " + ctranslate2.__version__ in note for note in r["notes"])
    assert rows["ctranslate2-fp32"]["vs_baseline"] == pytest.approx(rows["ctranslate2-fp32"]["seq_per_s"]
                                                                   / base["seq_per_s"])
    assert rows["ctranslate2-int8"]["vs_baseline"] is None  # no ort-decode-l2r-int8 row here
    smiles = (tmp_path / "samples" / "cpu-ctranslate2-fp32.smi").read_text().splitlines()
    assert len(smiles) == 8  # an untrained model: some are empty (EOS first), as ours are
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["ctranslate2"]["version"] == ctranslate2.__version__
    assert saved["ctranslate2"]["sampling"]["sampling_topk"] == 0 and saved["ctranslate2"]["intra_threads"] == 1
    assert "`ctranslate2-*` rows" in (tmp_path / "bench.md").read_text()


def test_unknown_precisions_and_a_missing_ctranslate2_are_refused_in_one_line(causal, tmp_path, monkeypatch):
    import importlib.util

    from imadarem.bench.causal import Engine
    from imadarem.bench.runner import Bench, BenchArgs
    from imadarem.runtime.errors import ImadaremError

    for name in ("ctranslate2-int4", "ctranslate2-fp16", "ctranslate2-int8dyn"):
        with pytest.raises(ImadaremError, match="unknown engine"):
            Engine.parse(name)
    assert not Engine.parse("ctranslate2-fp32").runs_on("cuda")
    assert Engine.parse("ctranslate2-int8").baseline.name == "ort-decode-l2r-int8"
    gqa = Engine.parse("ort-gqa-l2r-int8")  # the one-token decode file with GroupQueryAttention: CPU only
    assert gqa.left_to_right and gqa.baseline.name == "ort-decode-l2r-int8" and not gqa.runs_on("cuda")
    with pytest.raises(ImadaremError, match="GroupQueryAttention"):
        Engine.parse("ort-gqa-l2r-fp16")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ctranslate2" else find_spec(name, *a))
    with pytest.raises(ImadaremError, match=r"need ctranslate2: pip install 'imadarem\[bench,hf\]'"):
        Bench(BenchArgs(model=str(causal[0]), engines=("ctranslate2-fp32",), out_dir=str(tmp_path)))

"""The sampling head (export --sampling): the graph samples and measures what the numpy loop would."""

import numpy as np
import pytest
from imadarem.runtime import Generator
from imadarem.runtime.bans import ban_logits, run_bias
from imadarem.runtime.prompt import blank_layout, parse_prompt
from imadarem.runtime.selector import Decision, Selector, softmax


class _HeadFiles(dict):
    """Sampling-head exports of ``tiny_run`` by variant, each made on first use: the fast suite needs fp32 only
    (int8 and fp16 are in CI's slow pass; each export takes ~10 s on 2 cores)."""

    def __init__(self, run, out):
        super().__init__()
        self.run, self.out = run, out

    def __missing__(self, variant):
        from imadarem.export.onnx_export import export_checkpoint

        self[variant] = export_checkpoint(self.run, self.out / f"{variant}.onnx", variant=variant, sampling=True)
        return self[variant]


@pytest.fixture(scope="module")
def head_files(tiny_run, tmp_path_factory):
    return _HeadFiles(tiny_run, tmp_path_factory.mktemp("head"))


def _inputs(gen, rng, batch=24, template=None):
    """A realistic step input: masks, committed EOS and padding, some rows greedy."""
    sp, L = gen.special, gen.model.max_seq_len
    layout = blank_layout(L, sp) if template is None else parse_prompt(template, gen.tokenizer, sp, L)
    length = layout.length
    tokens = rng.integers(4, gen.model.vocab_size, (batch, length))
    tokens[rng.random(tokens.shape) < 0.4] = sp.mask
    ends = rng.integers(3, length + 3, batch)  # rows whose end lies beyond the length have no EOS yet
    for row, end in enumerate(ends):
        if end < length:
            tokens[row, end] = sp.eos
            tokens[row, end + 1:] = sp.pad
    temperature = rng.choice(np.array([0.0, 0.6, 1.0, 1.7], np.float32), batch)
    uniform = rng.random(tokens.shape, dtype=np.float32)
    bias = run_bias(layout, gen.tokenizer, sp, gen.model.vocab_size)
    cond = (rng.normal(size=(batch, length, gen.model.hidden_size)) * 0.1).astype(np.float32)
    step = rng.integers(0, 6, batch)
    return tokens, step, cond, (uniform, temperature, bias)


def _numpy_reference(gen, tokens, logits, uniform, temperature, bias):
    """What the head should return, computed from the graph's own logits the host loop's way."""
    sp = gen.special
    is_eos = tokens == sp.eos
    first = np.where(is_eos.any(-1), is_eos.argmax(-1), tokens.shape[1])
    banned = logits.copy()
    ban_logits(banned, bias, first, sp.eos)
    probs = softmax(banned.copy())
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(-1)
    top = np.sort(probs, -1)[..., ::-1]
    temp = np.maximum(temperature, 1e-6)[:, None, None]
    cdf = np.cumsum(softmax(banned / temp), -1)
    drawn = np.minimum((cdf < uniform[..., None] * cdf[..., -1:]).sum(-1), banned.shape[-1] - 1)
    proposals = np.where(temperature[:, None] <= 1e-6, banned.argmax(-1), drawn)
    cur = np.where(tokens == sp.mask, 0, tokens)
    current = np.where(tokens == sp.mask, 0.0, np.take_along_axis(probs, cur[..., None], -1)[..., 0])
    return {"proposals": proposals, "entropy": entropy, "top1": top[..., 0], "top2": top[..., 1],
            "proposal_prob": np.take_along_axis(probs, proposals[..., None], -1)[..., 0], "current_prob": current}


@pytest.mark.parametrize("variant", ["fp32", pytest.param("int8", marks=pytest.mark.slow),
                                     pytest.param("fp16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("template", [None, "[C][C]<mask:5>[O]<mask:3>"])
def test_head_matches_the_numpy_loop(head_files, variant, template):
    gen = Generator(head_files[variant])
    assert gen.model.graph_sampling and "proposals" in gen.model.outputs
    tokens, step, cond, sampling = _inputs(gen, np.random.default_rng(1), template=template)
    out = dict(zip(gen.model.outputs, gen.model.session.run(None, gen.model.feed(tokens, step, cond, sampling))))
    ref = _numpy_reference(gen, tokens, out["logits"], *sampling)
    real = tokens != gen.special.pad  # padding positions are frozen: nothing is read there
    agree = (out["proposals"] == ref["proposals"])[real].mean()
    assert agree > 0.995, agree  # only a uniform within float error of a CDF step may differ
    for name in ("entropy", "top1", "top2", "current_prob"):
        np.testing.assert_allclose(out[name][real], ref[name][real], atol=2e-5, err_msg=name)
    same = out["proposals"] == ref["proposals"]
    np.testing.assert_allclose(out["proposal_prob"][same & real], ref["proposal_prob"][same & real], atol=2e-5)
    # no banned token is ever proposed, and no EOS before a committed one
    bias = sampling[2]
    assert np.isfinite(np.take_along_axis(np.broadcast_to(bias, out["logits"].shape), out["proposals"][..., None],
                                          -1)).all()
    first = np.where((tokens == gen.special.eos).any(-1), (tokens == gen.special.eos).argmax(-1), 10**6)
    assert not ((out["proposals"] == gen.special.eos) & (np.arange(tokens.shape[1]) < first[:, None])
                & (first[:, None] < 10**6)).any()


def test_head_samples_the_tempered_distribution(head_files):
    """4096 identical rows: each position's proposal frequencies match softmax(logits / T)."""
    gen = Generator(head_files["fp32"])
    rng = np.random.default_rng(0)
    tokens, step, cond, (uniform, _, bias) = _inputs(gen, rng, batch=1)
    tokens[:] = gen.special.mask
    n, T = 4096, 1.4
    rows = (np.repeat(tokens, n, 0), np.repeat(step, n), np.repeat(cond, n, 0))
    sampling = (rng.random(rows[0].shape, dtype=np.float32), np.full(n, T, np.float32), bias)
    out = dict(zip(gen.model.outputs, gen.model.session.run(None, gen.model.feed(*rows, sampling))))
    logits = out["logits"][:1].copy()
    ban_logits(logits, bias, np.array([tokens.shape[1]]), gen.special.eos)
    want = softmax(logits / T)[0]  # [L, V]
    got = np.stack([np.bincount(out["proposals"][:, i], minlength=want.shape[-1]) for i in range(want.shape[0])]) / n
    sigma = np.sqrt(want * (1 - want) / n)
    assert (np.abs(got - want) <= 5 * sigma + 1e-9).all(), np.abs(got - want).max()
    assert (got[want == 0] == 0).all()


class _ReadsLogits(Selector):
    """A third-party-style selector that reads the full distribution (the slow path on a GPU)."""

    name = "reads-logits"

    def select(self, state):
        assert state.logits.shape == (*state.tokens.shape, 30) or state.logits.ndim == 3
        assert not state.logits.flags.writeable
        np.testing.assert_allclose(state.probs.max(-1)[state.editable], state.confidence[state.editable], atol=2e-5)
        return Decision(update=state.is_mask | (state.entropy > 0.5))


@pytest.mark.parametrize("selector", ["gate", "entropy", "maskgit", "overwrite", "uniform", "l2r", "critic"])
def test_every_selector_runs_on_graph_sampling(head_files, selector):
    gen = Generator(head_files["fp32"])
    samples = gen.generate(16, selector=selector, seed=3, steps=6)
    sp = gen.special
    for s in samples:
        assert sp.mask not in s.ids and sp.pad not in s.ids
        assert s.ids.count(sp.eos) <= 1 and (sp.eos not in s.ids or s.ids[-1] == sp.eos)
    assert gen.generate(4, selector=_ReadsLogits(), seed=0)


def test_greedy_graph_sampling_equals_the_numpy_loop(head_files, monkeypatch):
    from imadarem.runtime.formats.refine import SelfConditionedStep

    gen = Generator(head_files["fp32"])
    graph = [s.ids for s in gen.generate(32, selector="gate", temperature=0.0, seed=0)]
    monkeypatch.setattr(SelfConditionedStep, "graph_sampling", False)
    host = [s.ids for s in gen.generate(32, selector="gate", temperature=0.0, seed=0)]
    assert graph == host
    # a template's rules hold in the graph as on the host
    monkeypatch.setattr(SelfConditionedStep, "graph_sampling", True)
    for s in gen.generate(8, prompt="[C][C]<mask:4>[O]<mask:3>", seed=1):
        assert s.ids[:2] == gen.tokenizer.encode("[C][C]") and len(s.ids) <= 11

"""The loop's rules exist once (imadarem.runtime.rules) and give the same answers on numpy arrays and on
torch tensors, which is what lets the numpy loop, the PyTorch loop, the objective and the exported
sampling head agree."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imadarem.runtime import rules

torch = pytest.importorskip("torch")

EOS, PAD, MASK = 2, 0, 1


def _both(array):
    return array, torch.from_numpy(np.ascontiguousarray(array))


def _same(a, b):
    b = b.numpy() if hasattr(b, "numpy") else b
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=1e-5, atol=1e-5)


token_rows = st.integers(1, 6).flatmap(
    lambda b: st.integers(1, 12).flatmap(
        lambda n: st.lists(st.lists(st.integers(0, 6), min_size=n, max_size=n), min_size=b, max_size=b)))


@settings(max_examples=60, deadline=None)
@given(token_rows)
def test_eos_rules_agree_on_numpy_and_torch(rows):
    x_np, x_t = _both(np.array(rows, dtype=np.int64))
    first_np, first_t = rules.first_eos(x_np, EOS), rules.first_eos(x_t, EOS)
    _same(first_np, first_t)
    for row, first in zip(rows, first_np):
        assert first == (row.index(EOS) if EOS in row else len(row))
    _same(rules.pad_after_eos(x_np, EOS, PAD), rules.pad_after_eos(x_t, EOS, PAD))
    _same(rules.eos_banned(first_np, x_np.shape[1]), rules.eos_banned(first_t, x_t.shape[1]))
    frozen_np, frozen_t = _both(np.zeros(x_np.shape, dtype=bool))
    (a_tok, a_fz), (b_tok, b_fz) = (rules.freeze_after_eos(x_np, frozen_np, EOS, PAD),
                                    rules.freeze_after_eos(x_t, frozen_t, EOS, PAD))
    _same(a_tok, b_tok)
    _same(a_fz, b_fz)
    # the rule itself: the first EOS and everything after it is frozen, the tail is padding
    for i, first in enumerate(first_np):
        assert (a_fz[i, first:]).all() and not a_fz[i, :first].any()
        assert (a_tok[i, first + 1:] == PAD).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(2, 9), st.floats(0.05, 3.0), st.integers(0, 2**31))
def test_sampling_rules_agree_on_numpy_and_torch(b, n, v, temperature, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, n, v)).astype(np.float32) * 3
    logits[..., 0] = -np.inf  # a banned id
    u = rng.random((b, n, v), dtype=np.float32)
    l_np, l_t = _both(logits)
    u_np, u_t = _both(u)
    _same(rules.gumbel(u_np), rules.gumbel(u_t))
    np.testing.assert_array_equal(rules.gumbel_max(l_np, np.float32(temperature), u_np),
                                  rules.gumbel_max(l_t, temperature, u_t).numpy())
    ent_np, ent_t = rules.entropy(l_np), rules.entropy(l_t)
    _same(ent_np, ent_t)
    assert np.isfinite(ent_np).all() and (ent_np >= -1e-6).all() and (ent_np <= np.log(v) + 1e-5).all()
    gate_np, gate_t = _both(rng.random((b, n), dtype=np.float32))
    _same(rules.gate_update(gate_np, 0.5), rules.gate_update(gate_t, 0.5))
    is_mask_np, is_mask_t = _both(rng.random((b, n)) < 0.5)
    _same(rules.entropy_update(is_mask_np, ent_np, 0.7), rules.entropy_update(is_mask_t, ent_t, 0.7))


@pytest.mark.parametrize("kind", rules.SCHEDULES)
def test_schedule_agrees_and_runs_from_one_to_zero(kind):
    ratio = np.linspace(0, 1, 13)
    a, b = rules.mask_schedule(kind, ratio), rules.mask_schedule(kind, torch.from_numpy(ratio))
    _same(a, b)
    assert a[0] == pytest.approx(1.0) and a[-1] == pytest.approx(0.0, abs=1e-12) and (np.diff(a) <= 0).all()
    with pytest.raises(ValueError, match="schedule"):
        rules.mask_schedule("square", ratio)


@settings(max_examples=40, deadline=None)
@given(token_rows, st.integers(0, 2**31), st.floats(0, 1), st.integers(0, 3))
def test_stop_rules_agree_on_numpy_and_torch(rows, seed, threshold, t):
    rng = np.random.default_rng(seed)
    old = np.array(rows, dtype=np.int64)
    new = np.where(rng.random(old.shape) < 0.3, rng.integers(0, 7, old.shape), old)
    frozen = rng.random(old.shape) < 0.3
    (c_np, r_np), (c_t, r_t) = (rules.change_ratio(new, old, frozen),
                                rules.change_ratio(*(torch.from_numpy(a) for a in (new, old, frozen))))
    _same(c_np, c_t)
    _same(r_np, r_t)
    masks_left = (new == MASK).any(-1)
    all_frozen = frozen.all(-1)
    _same(rules.finished(t, r_np, threshold, masks_left, all_frozen),
          rules.finished(t, r_t, threshold, torch.from_numpy(masks_left), torch.from_numpy(all_frozen)))
    if t == 0:  # never stop on a quiet first step, only when nothing is left to change
        np.testing.assert_array_equal(rules.finished(0, r_np, threshold, masks_left, all_frozen), all_frozen)


def test_model_step_stretches_the_schedule():
    assert [rules.model_step(t, 12, 12) for t in range(12)] == list(range(12))
    assert [rules.model_step(t, 24, 12) for t in range(24)] == [t // 2 for t in range(24)]
    assert max(rules.model_step(t, 5, 12) for t in range(5)) <= 11


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**62), st.integers(0, 2**40), st.integers(1, 5), st.integers(1, 9), st.integers(1, 40))
def test_counter_noise_is_one_function_on_numpy_and_torch(seed, first, b, p, v):
    """The same integers on both backends (the torch branch is what a decode graph computes), for any
    seed words, sample index and position."""
    words = (seed % 2**32, (seed // 7) % 2**32)
    keys = rules.sample_keys(words, first, b)
    assert keys.dtype == np.int64 and keys.min() >= 0 and keys.max() < 2**31
    positions = np.random.default_rng(seed % 2**32).integers(0, 2**20, (b, p))
    u_np = rules.counter_uniforms(keys, positions, v)
    u_t = rules.counter_uniforms(torch.from_numpy(keys), torch.from_numpy(positions), v).numpy()
    assert np.array_equal(u_np, u_t) and u_np.dtype == np.float32
    assert 0.0 < u_np.min() and u_np.max() < 1.0
    np.testing.assert_allclose(rules.counter_gumbel(keys, positions, v),
                               rules.counter_gumbel(torch.from_numpy(keys), torch.from_numpy(positions), v).numpy(),
                               rtol=1e-5, atol=1e-5)


def _chi2_per_dof(a, bins):
    counts = np.bincount(a.ravel(), minlength=bins)
    expected = a.size / bins
    return float(((counts - expected) ** 2 / expected).sum() / (bins - 1))


def test_counter_noise_is_uniform_and_independent_along_every_axis():
    """What sampling needs of the hash: uniform marginals, and no dependence between neighbouring
    tokens, positions or samples (chi-square per degree of freedom of 32x32 pair histograms ~ 1; the
    first hash tried here, an xor-free murmur finaliser, scored 5e4 on neighbouring tokens)."""
    keys = rules.sample_keys((12345, 678), 0, 2048)
    positions = np.broadcast_to(np.arange(56), (2048, 56)).astype(np.int64)
    u = rules.counter_uniforms(keys, positions, 30)
    assert _chi2_per_dof(np.minimum((u * 256).astype(np.int64), 255), 256) < 1.5
    cells = (u * 32).astype(np.int64)
    for axis in (0, 1, 2):
        n = cells.shape[axis]
        pairs = np.take(cells, range(n - 1), axis) * 32 + np.take(cells, range(1, n), axis)
        assert _chi2_per_dof(pairs, 1024) < 1.5, axis
    assert abs(float(u.mean()) - 0.5) < 2e-3


def test_coupled_gumbel_max_samples_the_softmax():
    keys = rules.sample_keys((3, 4), 0, 20000)
    g = rules.counter_gumbel(keys, np.zeros((20000, 1), dtype=np.int64), 12)[:, 0]
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -np.inf, 1.5, 0.2, -2.0, 0.7, 0.1], dtype=np.float32)
    for temperature in (1.0, 0.7):
        tokens = rules.coupled_sample(logits[None], temperature, g)
        p = np.exp(logits / temperature - (logits / temperature).max())
        p /= p.sum()
        counts = np.bincount(tokens, minlength=12)
        seen = p > 0
        chi2 = float(((counts - p * len(tokens)) ** 2 / np.where(seen, p * len(tokens), 1))[seen].sum())
        assert chi2 < 35 and counts[~seen].sum() == 0, (temperature, chi2)  # 10 dof: p(chi2 > 35) < 2e-4
    assert (rules.coupled_sample(logits[None], 0.0, g) == 0).all()  # greedy: argmax


def test_block_attention_is_one_rule_for_numpy_and_torch():
    """The block model's attention (training/model.py builds it in the graph) from numpy and from torch, on
    de novo states and on templates with placed tokens after the current block."""
    torch = pytest.importorskip("torch")
    from imadarem.runtime import rules

    rng = np.random.default_rng(0)
    mask, pad = 1, 0
    tokens = rng.integers(3, 9, (6, 13))
    for row, first in enumerate((0, 3, 4, 7, 12, 13)):  # the first mask; 13: none
        tokens[row, first:] = mask
    tokens[2, 9:11] = [5, 6]  # a template's suffix after the current block
    tokens[4, 11:] = pad
    got = rules.block_attention(tokens, 4, mask, pad)
    want = rules.block_attention(torch.tensor(tokens), 4, mask, pad).numpy()
    assert got.dtype == bool and np.array_equal(got, want)
    blk = np.arange(13) // 4
    assert got[0][np.ix_(blk == 0, blk == 1)].sum() == 0  # block-causal: an earlier block never sees a later one
    assert got[2][:, 9].all() and got[2][:, 10].all()  # the suffix is seen from everywhere
    assert not got[3][blk < 3, 12].any()  # a mask in a later block is never seen from an earlier one

"""CUDA provider: IO binding keeps the loop's state on the GPU (skipped without CUDA + onnxruntime-gpu)."""

import numpy as np
import pytest
from imadarem.runtime import Generator
from imadarem.runtime.results import LoopTimings


@pytest.fixture(scope="module")
def device_state_onnx(tiny_run):
    from imadarem.export.onnx_export import export_checkpoint

    return export_checkpoint(tiny_run, tiny_run.parent / "tiny-device-state.onnx", device_state=True)


def _ids(samples, length=64):
    out = np.zeros((len(samples), length), dtype=np.int64)
    for i, s in enumerate(samples):
        out[i, : len(s.ids)] = s.ids
    return out


def test_device_state_file_matches_the_plain_file_on_cpu(tiny_onnx, device_state_onnx):
    plain, dev = Generator(tiny_onnx), Generator(device_state_onnx)
    assert dev.model.device_state and not plain.model.device_state
    for kwargs in ({"temperature": 0.0}, {"seed": 4}):
        np.testing.assert_array_equal(_ids(plain.generate(24, **kwargs)), _ids(dev.generate(24, **kwargs)))


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["plain", "device_state"])
def test_cuda_loop_agrees_with_cpu(tiny_onnx, device_state_onnx, which):
    path = tiny_onnx if which == "plain" else device_state_onnx
    cpu = _ids(Generator(path).generate(48, temperature=0.0, batch_size=48))
    timings = LoopTimings()
    gen = Generator(path, provider="cuda")
    cuda = _ids(gen.generate(48, temperature=0.0, batch_size=48, timings=timings))
    assert np.mean(cpu == cuda) >= 0.98  # float kernels differ; greedy choices almost never do
    assert min(timings.active_rows) < 48 or min(timings.run_lengths) < 64  # compaction/trimming happened


@pytest.mark.cuda
def test_cuda_state_stays_on_the_device(device_state_onnx):
    from imadarem.runtime.formats.refine import _DeviceCond

    gen = Generator(device_state_onnx, provider="cuda")
    state = _DeviceCond(gen.model, 4, 16)
    out = state.run(np.full((4, 16), gen.special.mask, dtype=np.int64), np.zeros(4, dtype=np.int64))
    assert state.value.device_name() == "cuda" and "cond_next" not in out
    state.keep(np.array([True, False, True, False]))
    out = state.run(np.full((2, 10), gen.special.mask, dtype=np.int64), np.ones(2, dtype=np.int64))
    assert out["logits"].shape[:2] == (2, 10) and state.value.shape()[:2] == [2, 10]


@pytest.fixture(scope="module")
def head_onnx(tiny_run):
    from imadarem.export.onnx_export import export_checkpoint

    return export_checkpoint(tiny_run, tiny_run.parent / "tiny-head.onnx", device_state=True, sampling=True)


@pytest.mark.cuda
def test_cuda_sampling_head_keeps_logits_on_the_device(head_onnx):
    from imadarem.runtime.bans import run_bias
    from imadarem.runtime.formats.refine import _DeviceCond
    from imadarem.runtime.prompt import blank_layout

    gen = Generator(head_onnx, provider="cuda")
    assert gen.model.graph_sampling
    L, n = gen.model.max_seq_len, 4096
    state = _DeviceCond(gen.model, n, L)
    rng = np.random.default_rng(0)
    bias = run_bias(blank_layout(L, gen.special), gen.tokenizer, gen.special, gen.model.vocab_size)
    sampling = (rng.random((n, L), dtype=np.float32), np.full(n, 1.3, np.float32), bias)
    out = state.run(np.full((n, L), gen.special.mask, dtype=np.int64), np.zeros(n, dtype=np.int64), sampling)
    assert out["logits"].device_name() == "cuda" and isinstance(out["proposals"], np.ndarray)
    # the proposals follow softmax((logits + bias) / T) at every position
    logits = out["logits"].numpy()[0] + bias
    want = np.exp(logits / 1.3 - (logits / 1.3).max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    got = np.stack([np.bincount(out["proposals"][:, i], minlength=want.shape[-1]) for i in range(L)]) / n
    assert (np.abs(got - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-3).all()


@pytest.mark.cuda
def test_cuda_sampling_head_loop_agrees_with_cpu(head_onnx):
    cpu = _ids(Generator(head_onnx).generate(48, temperature=0.0))
    gen = Generator(head_onnx, provider="cuda")
    cuda = _ids(gen.generate(48, temperature=0.0))
    assert np.mean(cpu == cuda) >= 0.98
    for selector in ("maskgit", "overwrite", "entropy"):  # every measure the selectors read comes from the graph
        samples = gen.generate(16, selector=selector, seed=1)
        assert all(gen.special.mask not in s.ids for s in samples)

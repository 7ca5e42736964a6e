"""CUDA provider: IO binding keeps the loop's state on the GPU (skipped without CUDA + onnxruntime-gpu)."""

import numpy as np
import pytest
from imadarem.runtime import Generator
from imadarem.runtime.generator import LoopTimings


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
    from imadarem.runtime.generator import _DeviceCond

    gen = Generator(device_state_onnx, provider="cuda")
    state = _DeviceCond(gen.model, 4, 16)
    out = state.run(np.full((4, 16), gen.special.mask, dtype=np.int64), np.zeros(4, dtype=np.int64))
    assert state.value.device_name() == "cuda" and "cond_next" not in out
    state.keep(np.array([True, False, True, False]))
    out = state.run(np.full((2, 10), gen.special.mask, dtype=np.int64), np.ones(2, dtype=np.int64))
    assert out["logits"].shape[:2] == (2, 10) and state.value.shape()[:2] == [2, 10]

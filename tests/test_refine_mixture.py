"""The refine family's mixture objective (issue #24): the masks the samplers show, a gate that scores the
token each position holds or will hold, and a gate selector that commits, revises and settles."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny():
    from conftest import tiny_selfies_refine

    return tiny_selfies_refine(objective="mixture", sample_replace_rate=0.3, random_replace_rate=0.1)


def test_the_three_masks_and_the_gate_targets(tiny):
    from imadarem.training.objective import corrupt_mixture, draw_noise

    cfg, sp = tiny.config, tiny.special
    gen = torch.Generator().manual_seed(0)
    B, L = 600, cfg.max_seq_len
    clean = torch.full((B, L), sp.pad)
    clean[:, :11] = torch.randint(4, cfg.vocab_size, (B, 11), generator=gen)
    clean[:, 11] = sp.eos
    noise = draw_noise(gen, B, L, cfg, sp, torch.device("cpu"))
    batch = corrupt_mixture(clean, noise, tiny, cfg, sp)
    mode = np.where(noise.u_row[:, 0] < cfg.semi_ar_weight, 0,
                    np.where(noise.u_row[:, 0] < cfg.semi_ar_weight + cfg.span_weight, 1, 2))
    masked = (batch.inputs == sp.mask).numpy()
    corrupted = batch.loss_positions.numpy()
    start = (noise.u_row[:, 2] * 12).floor().long().numpy()
    for i in np.flatnonzero(mode == 0)[:50]:  # semi-autoregressive: clean prefix, block, masked suffix
        assert not corrupted[i, : start[i]].any() and corrupted[i, start[i]]
        beyond = batch.inputs[i, start[i] + cfg.block_size : 12].numpy()  # nothing refilled beyond the block
        assert np.isin(beyond, [sp.mask, sp.pad]).all()  # (PAD: a refilled EOS in the block ended the row)
    for i in np.flatnonzero(mode == 1)[:50]:  # one span: its suffix stays clean
        last = np.flatnonzero(corrupted[i, :12]).max()
        span_end = start[i] + 1 + int(noise.u_row[i, 3] * (12 - start[i]))
        assert last < span_end and corrupted[i, start[i]]
    assert {0, 1, 2} <= set(mode.tolist())
    target, inputs = batch.gate_target.numpy(), batch.inputs.numpy()
    truth = batch.targets.numpy()
    committed = ~masked & batch.valid.numpy()
    assert (target[committed] == (inputs[committed] != truth[committed])).all()  # a wrong token: update it
    assert set(np.unique(target[masked]).tolist()) <= {0.0, 1.0}
    assert (batch.step == 0).all()  # time-independent
    refilled = committed & corrupted
    assert 0 < refilled.sum() < corrupted.sum()


def test_the_gate_selector_commits_at_least_one_mask_and_stops_a_settled_row():
    from imadarem.plugins.selectors.gate import GateSelector
    from imadarem.runtime.selector import StepState

    tokens = np.array([[5, 1, 1, 1], [5, 6, 7, 8], [5, 6, 7, 8]])
    gate = np.array([[0.0, 0.2, 0.4, 0.1], [0.1, 0.1, 0.1, 0.1], [0.1, 0.9, 0.1, 0.1]], np.float32)
    state = StepState(t=0, num_steps=8, tokens=tokens, proposals=tokens, logits=np.zeros((3, 4, 9)), gate=gate,
                      critic=None, frozen=np.zeros((3, 4), bool), rows=np.arange(3), rng=None, temperature=1.0,
                      mask_id=1, pad_id=0, eos_id=2)
    decision = GateSelector().select(state)
    assert decision.update.tolist() == [[False, False, True, False], [False] * 4, [False, True, False, False]]
    assert decision.stop.tolist() == [False, True, False]
    assert not GateSelector(min_commit=0).select(state).update[0].any()


@pytest.mark.slow
def test_a_short_mixture_run_learns_a_gate_that_sets_the_calls(tmp_path):
    """tiny-refine on 400 molecules: the exported model's gate selector ends rows by itself, and its
    threshold trades calls for caution (fewer calls at a lower threshold)."""
    from conftest import MOSES_SAMPLE
    from imadarem.export.onnx_export import export_checkpoint
    from imadarem.runtime import Generator
    from imadarem.training.args import TrainArgs
    from imadarem.training.presets import PRESETS
    from imadarem.training.trainer import train

    preset = PRESETS["tiny-refine"]
    args = TrainArgs(**{**preset["args"], "steps": 300, "eval_interval": 300}, data=str(MOSES_SAMPLE),
                     out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"), progress=False,
                     model={**preset["model"], "objective": "mixture", "max_seq_len": 56})
    result = train(args)
    assert result["last"]["val_gate_acc"] > 0.75, result["last"]
    gen = Generator(export_checkpoint(tmp_path / "run", tmp_path / "m.onnx"))
    calls = {thr: np.mean([s.steps for s in gen.generate(64, seed=0, threshold=thr)]) for thr in (0.3, 0.7)}
    assert calls[0.3] < calls[0.7] < 64, calls

"""The refine family's block objective (issue #24): BD3-LM's vectorised training and a single-stream model
that sees exactly what that training showed it; decoding block by block; middle blanks that see their suffix;
draft-and-verify, which gives the model's left-to-right samples in fewer calls."""

import dataclasses

import numpy as np
import pytest
from imadarem.runtime import Generator, ImadaremError, rules
from imadarem.runtime.bans import run_bias
from imadarem.runtime.models import bundled_path
from imadarem.runtime.prompt import blank_layout
from imadarem.runtime.randomness import SampleStreams

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny():
    from conftest import tiny_selfies_refine

    model = tiny_selfies_refine(objective="block", num_layers=2, dropout=0.0)
    with torch.no_grad():  # a trained-looking self-conditioning layer, so a zero cond is not a no-op by luck
        model.self_cond.bias.normal_(0, 0.1)
    return model


def _clean(sp, vocab, rows=3, length=16, end=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.full((rows, length), sp.pad)
    clean[:, :end] = torch.randint(4, vocab, (rows, end), generator=gen)
    clean[:, end] = sp.eos
    return clean


def test_a_decoding_state_sees_what_the_two_stream_training_showed_it(tiny):
    """Block b of x_t ++ x_0 under the training mask = block b of the single-stream state a decoder reaches
    (clean blocks before b, block b as in x_t, masks after), under the model's own attention."""
    from imadarem.training.model import two_stream_attention

    cfg, sp = tiny.config, tiny.special
    L, bs = cfg.max_seq_len, cfg.block_size
    clean = _clean(sp, cfg.vocab_size)
    noisy = clean.clone()
    noisy[torch.rand(clean.shape, generator=torch.Generator().manual_seed(1)) < 0.5] = sp.mask
    noisy[:, 11:] = sp.mask  # EOS masked: its tail is masked with it
    pos = torch.arange(L)
    zeros2 = torch.zeros(3, 2 * L, cfg.hidden_size)
    step = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        two = tiny.forward_train(torch.cat([noisy, clean], 1), step, zeros2, two_stream_attention(L, bs)[None],
                                 torch.cat([pos, pos]))
        for b in range(L // bs):
            state = torch.full_like(clean, sp.mask)
            state[:, : b * bs] = clean[:, : b * bs]
            state[:, b * bs:(b + 1) * bs] = noisy[:, b * bs:(b + 1) * bs]
            one = tiny.forward_train(state, step, torch.zeros(3, L, cfg.hidden_size))
            sl = slice(b * bs, (b + 1) * bs)
            assert torch.allclose(one["logits"][:, sl], two["logits"][:, sl], atol=1e-5), b
            assert torch.allclose(one["gate_logits"][:, sl], two["gate_logits"][:, sl], atol=1e-5), b


def test_every_copy_of_a_states_row_is_the_left_to_right_state_a_decoder_reaches(tiny):
    """The states rows' copy of block b in state r_k (StatesLayout) gives the logits and gate of the single-stream
    state x_<bk+k clean, masks from there on, under the model's own attention: for every block and every k."""
    from imadarem.training.model import states_forward

    cfg, sp = tiny.config, tiny.special
    L, bs = cfg.max_seq_len, cfg.block_size
    clean = _clean(sp, cfg.vocab_size)
    step = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        out, lay = states_forward(tiny.forward_train, clean, sp.mask, cfg.hidden_size, bs)
        assert out["logits"].shape[1] == len(lay.positions) == bs * L  # 4 states a block, each a copy of the block
        for start in range(L):
            state = clean.clone()
            state[:, start:] = sp.mask
            one = tiny.forward_train(state, step, torch.zeros(3, L, cfg.hidden_size))
            slots = torch.nonzero(lay.start == start).squeeze(1)
            assert len(slots) == bs and torch.equal(lay.positions[slots] // bs, torch.full((bs,), start // bs))
            for key in ("logits", "gate_logits"):
                got, want = out[key][:, slots], one[key][:, lay.positions[slots]]
                assert torch.allclose(got, want, atol=1e-5), (start, key, (got - want).abs().max())


def _train_step(tiny, cfg, rows: int):
    """block_loss over ``rows`` rows of :func:`_clean` in train mode, and its backward: (loss, metrics, the gradient's
    size at the first layer). The shared model goes back to eval mode without gradients."""
    from imadarem.training.block_objective import block_loss

    clean = _clean(tiny.special, cfg.vocab_size, rows=rows)
    model = tiny.train()
    try:
        loss, m = block_loss(model.forward_train, tiny, clean, torch.Generator().manual_seed(0), rows, slice(0, rows),
                             cfg, tiny.special)
        loss.backward()
        return loss, m, float(tiny.blocks[0].qkv.weight.grad.abs().sum())
    finally:
        tiny.eval()
        tiny.zero_grad()


def test_states_rows_train_beside_the_block_rows(tiny):
    """block_states_share: the loss runs with states rows among the block and span rows, trains more positions
    (ten a block in a states row, about two in a block row), and its gradient reaches the trunk."""
    states = dataclasses.replace(tiny.config, block_states_share=0.5, span_weight=0.25)
    loss, m, grad = _train_step(tiny, states, 8)
    _, base, _ = _train_step(tiny, dataclasses.replace(states, block_states_share=0.0), 8)
    assert torch.isfinite(loss) and grad > 0
    # 4 states rows x 3 blocks x 10 masked slots alone, against ~6 block rows x 12 positions x their mask rate
    assert float(m["tokens"]) >= 4 * 3 * 10 > float(base["tokens"]) - 30


def test_a_blank_sees_its_clean_suffix_and_a_block_never_sees_later_masks(tiny):
    cfg, sp = tiny.config, tiny.special
    L = cfg.max_seq_len
    clean = _clean(sp, cfg.vocab_size, rows=1)
    zeros, step = torch.zeros(1, L, cfg.hidden_size), torch.zeros(1, dtype=torch.long)
    blank = clean.clone()
    blank[:, 3:7] = sp.mask  # a middle blank, clean text on both sides
    other = blank.clone()
    other[:, 9] = 4 if int(blank[0, 9]) != 4 else 5  # change one token of the suffix
    with torch.no_grad():
        a = tiny.forward_train(blank, step, zeros)["logits"][:, 3:7]
        b = tiny.forward_train(other, step, zeros)["logits"][:, 3:7]
    assert not torch.allclose(a, b, atol=1e-4)  # the text after the blank is seen
    opened = blank.clone()
    opened[:, 12:] = sp.mask  # ... also when the template's end is open (masks after it)
    opened_other = opened.clone()
    opened_other[:, 9] = other[:, 9]
    with torch.no_grad():
        a = tiny.forward_train(opened, step, zeros)["logits"][:, 3:7]
        b = tiny.forward_train(opened_other, step, zeros)["logits"][:, 3:7]
    assert not torch.allclose(a, b, atol=1e-4)
    # de novo: with every later position masked, block 1 is the same whatever the length of the masked tail
    state = torch.full((1, L), sp.mask)
    state[:, :4] = clean[:, :4]
    shorter = state.clone()
    shorter[:, 12:] = sp.pad
    with torch.no_grad():
        a = tiny.forward_train(state, step, zeros)["logits"][:, 4:8]
        b = tiny.forward_train(shorter, step, zeros)["logits"][:, 4:8]
    assert torch.allclose(a, b, atol=1e-6)


def test_the_block_loss_trains_every_block_and_its_gate(tiny):
    loss, m, _ = _train_step(tiny, tiny.config, 40)
    assert torch.isfinite(loss) and float(m["ce"]) > 0 and 0 <= float(m["gate_acc"]) <= 1
    # every block up to the EOS block is trained somewhere in the batch: ~40 rows x 3 blocks of 4
    assert float(m["tokens"]) > 40 * 3


def test_outside_current_block_is_each_rows_first_block_with_an_open_mask():
    from imadarem.runtime.rules import outside_current_block

    M = 1
    tokens = np.array([[5, 5, 5, 5, 5, M, 5, M], [5, M, 5, 5, M, M, M, M], [5, 5, 5, 5, 5, 5, 5, 5]])
    frozen = np.zeros_like(tokens, dtype=bool)
    out = outside_current_block(tokens, frozen, M, 4)
    assert out.tolist() == [[True] * 4 + [False] * 4, [False] * 4 + [True] * 4, [True] * 8]
    frozen[1, 1] = True  # a frozen mask (a prompt's) does not open its block
    assert outside_current_block(tokens, frozen, M, 4)[1].tolist() == [True] * 4 + [False] * 4


def test_a_block_window_ends_with_the_last_block_that_holds_a_placed_token_or_a_target():
    M, P = 1, 0
    tokens = np.array([[5, 5, M, M, M, M, M, M, M, M, M, M], [5, 5, 5, 5, 5, M, M, M, M, 7, P, P]])
    assert rules.row_windows(tokens[:1], np.array([2]), M, P, 4).max() == 4  # only the current block
    assert rules.row_windows(tokens[:1], np.array([9]), M, P, 4).max() == 12  # a target further right
    assert rules.row_windows(tokens, np.array([2, 5]), M, P, 4).max() == 12  # a template's suffix token at 9
    tokens[1, 9] = M
    assert rules.row_windows(tokens, np.array([2, 5]), M, P, 4).max() == 8  # PAD is not a placed token
    assert rules.row_windows(tokens, np.array([2, 5]), M, P, 5).max() == 10  # whole blocks


@pytest.fixture(scope="module")
def block_file(tmp_path_factory):
    from conftest import tiny_block_file
    from imadarem.training.presets import PRESETS

    assert PRESETS["tiny-refine"]["model"]["objective"] == "block"
    return tiny_block_file(tmp_path_factory.mktemp("block"), 40)[1]


def test_a_block_file_commits_only_inside_the_current_block_and_keeps_a_templates_suffix(block_file):
    from imadarem.runtime import Generator

    gen = Generator(block_file)
    mask, pad = gen.model.special.mask, gen.model.special.pad
    for sample in gen.generate(6, seed=0, trajectory=True):
        before = None
        for step in sample.trajectory:
            tokens = np.array(step.tokens)
            if before is not None:
                changed = np.flatnonzero((tokens != before) & (tokens != pad))  # committing EOS pads the rest
                open_masks = np.flatnonzero(before == mask)
                if len(changed) and len(open_masks):
                    assert set(changed // 4) == {open_masks[0] // 4}, (changed, open_masks)
            before = tokens
    prompt = "[C][C][O]<mask:6>[C][=C][C][=C][C][=C][Ring1][=Branch1]"
    suffix = gen.model.tokenizer.encode_fragment("[C][=C][C][=C][C][=C][Ring1][=Branch1]", first=False, open_end=False)
    for sample in gen.generate(8, seed=0, prompt=prompt, trajectory=True):
        assert sample.ids[9:9 + len(suffix)] == suffix
        for step in sample.trajectory:  # the blank (positions 3-8) and the open end after the template
            assert all(3 <= p <= 8 or p >= 9 + len(suffix) for p in step.refined), step.refined


def test_the_loop_runs_a_block_model_on_a_window_that_changes_no_token(block_file, monkeypatch):
    """The refinement loop on a block file runs each call only up to its current block (rules.row_windows) with
    zero self-conditioning, as the block objective trains: the molecules of the full-length run, in shorter calls."""
    from imadarem.runtime.formats.refine import SelfConditionedStep

    gen = Generator(block_file)
    lengths = []
    run = gen.model.session.run
    monkeypatch.setattr(gen.model.session, "run", lambda names, feed: lengths.append(feed["tokens"].shape[1])
                        or run(names, feed))
    prompt = "[C][C][O]<mask:6>[C][=C][C][=C][C][=C][Ring1][=Branch1]"
    # steps=2: the last step fills every mask left, past the window too, so it runs the full length
    for options in [{}, {"selector": "confidence"}, {"selector": "entropy"}, {"steps": 2}, {"prompt": prompt}]:
        lengths.clear()
        windowed = _ids(gen.generate(6, seed=2, batch_size=3, **options))
        shortest = min(lengths)
        monkeypatch.setattr(SelfConditionedStep, "window_blocks", False)
        full = _ids(gen.generate(6, seed=2, batch_size=3, **options))
        monkeypatch.setattr(SelfConditionedStep, "window_blocks", True)
        assert windowed == full, options
        assert shortest < gen.model.typed.max_seq_len, options  # de novo calls start with one block
    assert shortest >= 17  # the suffix (positions 9-16) stays in every window (the EOS trim may end it at 18)


@pytest.mark.parametrize("decoding", [{"drafts": 3, "selector": "gate"}, {"drafts": 2, "selector": "l2r"}])
def test_rows_of_different_windows_run_apart_and_change_no_token(block_file, monkeypatch, decoding):
    """On a CPU a block-model call may run its rows in two groups by window (rules.window_groups): the same
    molecules as one run over the widest window, with splits forced wherever they save a position."""
    from imadarem.runtime import rules
    from imadarem.runtime.formats.block_verify import BlockVerifyStep

    # one sequence per state: the tiny model's rows decode in step when their states share a sequence
    monkeypatch.setattr(BlockVerifyStep, "pack", False)
    gen = Generator(block_file)
    runs = []
    run = gen.model.session.run
    monkeypatch.setattr(gen.model.session, "run", lambda names, feed: runs.append(feed["tokens"].shape)
                        or run(names, feed))
    monkeypatch.setattr(rules, "WINDOW_MAX_RUNS", 1)  # never split
    whole = gen.generate(8, seed=3, batch_size=8, **decoding)
    assert len(runs) == max(s.steps for s in whole)
    runs.clear()
    monkeypatch.setattr(rules, "WINDOW_MAX_RUNS", 3)
    monkeypatch.setattr(rules, "WINDOW_RUN_COST", 0)  # split wherever it saves a position
    split = gen.generate(8, seed=3, batch_size=8, **decoding)
    assert _ids(split) == _ids(whole)
    assert len(runs) > max(s.steps for s in split)  # some calls did run in two groups
    assert all(s.steps == w.steps for s, w in zip(split, whole))


def test_a_call_split_by_window_stitches_each_rows_outputs_back_in_place(monkeypatch):
    from imadarem.runtime import rules
    from imadarem.runtime.formats.block_verify import run_by_window

    monkeypatch.setattr(rules, "WINDOW_RUN_COST", 0)
    rng = np.random.default_rng(0)
    full = {"logits": rng.normal(size=(5, 12, 3)).astype(np.float32), "gate": rng.random((5, 12)),
            "done": np.arange(5)}
    windows = np.array([4, 12, 4, 8, 4])

    def run(rows, cut):
        assert (windows[rows] <= cut).all()
        return {"logits": full["logits"][rows, :cut], "gate": full["gate"][rows, :cut], "done": full["done"][rows]}

    whole = run_by_window(run, windows, split=False)
    split = run_by_window(run, windows, split=True)
    assert whole["logits"].shape == split["logits"].shape == (5, 12, 3)
    np.testing.assert_array_equal(split["done"], full["done"])
    # three runs: rows 0, 2, 4 over 4 positions, row 3 over 8, row 1 over 12 (36 positions, not 60); zeros past them
    for name in ("logits", "gate"):
        for row, w in enumerate(windows):
            np.testing.assert_array_equal(split[name][row, :w], full[name][row, :w])
            assert not split[name][row, w:].any()
    assert [(list(rows), cut) for rows, cut in rules.window_groups(windows)] == [([0, 2, 4], 4), ([3], 8), ([1], 12)]
    assert len(rules.window_groups(windows, run_cost=32)) == 1  # a run's overhead outweighs 24 positions


def test_the_pytorch_reference_loop_refuses_a_block_model_in_one_line(tiny):
    from imadarem.runtime.errors import ImadaremError
    from imadarem.training.reference import torch_refine

    with pytest.raises(ImadaremError, match="block by block"):
        torch_refine(tiny, 2)


def test_eval_molecules_passes_selector_options_to_every_row(block_file, monkeypatch):
    """`imadarem eval molecules -o threshold=...` (the frontier of a refine model): the options reach the
    selector (a stricter gate takes more calls) and are recorded in the row."""
    from imadarem.training.evaluation import molecules as em

    class NoScores:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, smiles, seed=0):
            return {"n": len(smiles)}

    monkeypatch.setattr(em, "MosesScorer", NoScores)
    calls = {}
    for threshold in (0.05, 0.95):
        (row,) = em.evaluate(str(block_file), 24, ["gate"], [None], 0, None, 24, None, None,
                             selector_options={"threshold": threshold})
        assert row["options"] == {"threshold": threshold}
        calls[threshold] = row["steps_used"]
    assert calls[0.05] < calls[0.95], calls


def test_the_confidence_selector_commits_trusted_masks_and_else_the_leftmost(block_file):
    """Fast-dLLM's rule, the gate's non-revising baseline: at threshold 1 nothing is trusted, so each step
    commits exactly the leftmost open mask; at threshold 0 every mask of the block at once."""
    from imadarem.runtime import Generator

    gen = Generator(block_file)
    mask = gen.model.special.mask
    strict = gen.generate(6, selector="confidence", seed=0, threshold=1.0, trajectory=True)
    for sample in strict:
        before = None
        for step in sample.trajectory:
            tokens = np.array(step.tokens)
            if before is not None and (before == mask).any():
                placed = [p for p in step.refined if before[p] == mask and tokens[p] != gen.model.special.pad]
                assert placed[:1] == [int(np.flatnonzero(before == mask)[0])], (placed, step.refined)
            before = tokens
    loose = gen.generate(6, selector="confidence", seed=0, threshold=0.0)
    assert np.mean([s.steps for s in loose]) < np.mean([s.steps for s in strict])
    with pytest.raises(Exception, match="fallback"):
        gen.generate(1, selector="confidence", fallback="random")


def test_with_refills_off_a_block_shows_only_its_true_tokens_and_masks_and_needs_no_teacher(tiny):
    """The block presets' setting: a model that sees wrong tokens inside its blocks learns to discount what it
    committed there (training/block_objective.py); with the refill rates at 0 the noisy stream holds only
    the clean text's own tokens or masks, and the EMA teacher is not run at all."""
    import dataclasses

    from imadarem.training.block_objective import block_loss
    from imadarem.training.presets import PRESETS

    for name in ("moses-refine", "tiny-refine"):
        model = PRESETS[name]["model"]
        assert model["sample_replace_rate"] == 0 and model["random_replace_rate"] == 0, name

    sp, L = tiny.special, 16
    clean = _clean(sp, tiny.config.vocab_size, rows=40, length=L)

    def noisy_streams(cfg, teacher):
        seen = []

        def forward(tokens, *rest):
            seen.append(tokens[:, :L])
            return tiny.forward_train(tokens, *rest)
        with torch.no_grad():
            block_loss(forward, teacher, clean, torch.Generator().manual_seed(0), 40, slice(0, 40), cfg, sp)
        return seen[0]

    class NoTeacher:
        def forward_train(self, *args):
            raise AssertionError("the teacher ran with refills off")

    off = dataclasses.replace(tiny.config, sample_replace_rate=0.0, random_replace_rate=0.0, span_weight=0.0)
    xt = noisy_streams(off, NoTeacher())
    assert ((xt == sp.mask) | (xt == clean)).all()
    assert (xt == sp.mask).any()
    on = dataclasses.replace(off, sample_replace_rate=0.3, random_replace_rate=0.3)
    xt = noisy_streams(on, tiny)
    assert ((xt != sp.mask) & (xt != clean) & (xt != sp.pad)).any()  # refills show, so the check above can fail


# -- draft-and-verify (runtime/formats/block_verify.py): the left-to-right samples, token for token ----------
def left_to_right(model, n: int, seed: int) -> list[list[int]]:
    """Brute force: each position's exact token from the state where everything before it is committed and the
    rest is masked, one model call per token and sample, with the sample's own noise of that position."""
    sp, L, V = model.special, model.typed.max_seq_len, model.vocab_size
    bias = run_bias(blank_layout(L, sp), model.tokenizer, sp, V)
    noise = rules.position_noise(SampleStreams(np.random.SeedSequence(seed), 0, n).keys(), L, V)
    T = model.typed.sampling_temperature
    out = []
    for i in range(n):
        x = np.full((1, L), sp.mask, np.int64)
        ids = []
        for j in range(L):
            feed = model.feed(x, np.zeros(1, np.int64), np.zeros((1, L, model.hidden_size), np.float32))
            logits = model.session.run(["logits"], feed)[0][0, j]
            token = int(np.argmax(logits + bias[j] + T * noise[i, j]))
            ids.append(token)  # a sample's ids end with its EOS
            if token == sp.eos:
                break
            x[0, j] = token
        out.append(ids)
    return out


def _ids(samples):
    return [s.ids for s in samples]


def test_drafts_give_the_left_to_right_samples_for_any_batch_size(block_file):
    gen = Generator(block_file)
    want = left_to_right(gen.model, 5, seed=4)
    one = gen.generate(5, seed=4, drafts=0)
    assert _ids(one) == want
    for drafts, batch, selector in [(3, 5, "gate"), (2, 2, "confidence"), (1, 3, "l2r"), (3, 1, "maskgit")]:
        got = gen.generate(5, seed=4, drafts=drafts, batch_size=batch, selector=selector)
        assert _ids(got) == want, (drafts, batch, selector)
    assert max(s.steps for s in one) <= gen.model.typed.max_seq_len + 1


def test_drafts_are_refused_where_they_do_not_apply(block_file, tiny_onnx):
    with pytest.raises(ImadaremError, match="at most 3"):
        Generator(block_file).generate(2, drafts=4)
    with pytest.raises(ImadaremError, match="without blocks"):
        Generator(tiny_onnx).generate(2, drafts=1)


@pytest.fixture(scope="module")
def gated_block_file(tmp_path_factory):
    """A tiny block file with an acceptance gate (training/acceptance_gate.py), the bundled refine model's kind."""
    from conftest import tiny_block_file

    return tiny_block_file(tmp_path_factory.mktemp("gated"), 30, gate_target="acceptance")[1]


def test_the_acceptance_gate_chooses_which_drafts_to_place_and_never_the_molecules(gated_block_file, monkeypatch):
    from imadarem.runtime.formats.block_verify import BlockVerifyStep

    gen = Generator(gated_block_file)
    want = left_to_right(gen.model, 6, seed=1)
    rows = []
    run, presented = BlockVerifyStep.run, []

    def watched(self, *args):  # what the step presents: the model's own gate at offered drafts, 0 elsewhere
        self.stash_gates = []  # the gates of each run of the call (rows of different windows may run apart)
        shown = run(self, *args)
        gates = np.concatenate([g.ravel() for g in self.stash_gates])
        presented.append((shown.gate.copy(), self.offered.copy(), gates))
        return shown
    monkeypatch.setattr(BlockVerifyStep, "run", watched)
    original = BlockVerifyStep._logits

    def stash(self, packed, seqs, cut):  # counts the states a run computes, however they are packed
        rows.append(int(np.isin(packed.rows, seqs).sum()))
        out = original(self, packed, seqs, cut)
        self.stash_gates.append(out["gate"])
        return out
    monkeypatch.setattr(BlockVerifyStep, "_logits", stash)
    placed = {}
    for threshold in (0.0, 0.5, 1.0):
        rows.clear()
        got = gen.generate(6, seed=1, drafts=3, selector="gate", threshold=threshold, batch_size=3)
        assert _ids(got) == want, threshold
        placed[threshold] = sum(rows) - sum(s.steps for s in got)  # rows beyond one a call and sample: drafts
    # threshold 1: no gate passes, only the forced first draft of each call inside its block; 0: every one
    assert placed[0.0] >= placed[0.5] >= placed[1.0] and placed[0.0] > placed[1.0], placed
    offered_any = False
    for gate, offered, gates in presented:
        assert (gate[~offered] == 0).all()
        if offered.any():
            offered_any = True
            assert np.isin(gate[offered], gates).all() and (gate[offered] < 1).any()  # the gate's values, not 1s
    assert offered_any
    rows.clear()
    one = gen.generate(6, seed=1, drafts=0, batch_size=3)
    assert sum(rows) == sum(s.steps for s in one)  # the count above: one row a call and sample without drafts


@pytest.mark.slow  # ~1 minute of generation on 2 cores: CI's slow pass runs it
@pytest.mark.skipif(bundled_path("refine") is None, reason="no bundled refine model")
def test_on_the_bundled_refine_model_drafts_save_most_calls():
    gen = Generator("refine")
    one = gen.generate(24, seed=0, drafts=0)
    drafted = gen.generate(24, seed=0, drafts=3, selector="gate")
    assert _ids(drafted) == _ids(one)
    calls = np.mean([s.steps for s in one]), np.mean([s.steps for s in drafted])
    assert calls[1] < 0.6 * calls[0], calls  # measured: 15.5 against 36 calls at n = 200


def test_a_recommended_decoding_can_carry_drafts(block_file, tmp_path):
    import shutil

    from imadarem.export.exporters import stamp_decoding
    from imadarem.runtime.formats import describe_model

    stamped = tmp_path / "m.onnx"
    shutil.copy(block_file, stamped)
    assert stamp_decoding(stamped, "gate", {}, 3) == {"selector": "gate", "options": {}, "drafts": 3}
    assert describe_model(stamped)["decoding"]["drafts"] == 3
    gen = Generator(stamped)
    assert _ids(gen.generate(4, seed=4)) == left_to_right(gen.model, 4, seed=4)  # the recommendation runs verified
    assert _ids(gen.generate(4, seed=4, drafts=1)) == _ids(gen.generate(4, seed=4))  # the request's drafts on top
    shutil.copy(block_file, stamped)
    with pytest.raises(ImadaremError, match="at most 3"):
        stamp_decoding(stamped, "gate", {}, 4)
    assert not stamped.exists()


def test_the_bench_of_a_block_file_sets_each_decoding_beside_one_token_per_call(gated_block_file, tmp_path):
    from imadarem.bench.runner import Bench, BenchArgs

    args = BenchArgs(model=str(gated_block_file), batch_sizes=(3,), repeats=1, out_dir=str(tmp_path),
                     engines=("recommended", "confidence", "gate+d3", "l2r+d2"))
    result = Bench(args).run()
    rows = {r["engine"]: r for r in result["rows"]}
    assert list(rows) == ["l2r", "recommended", "confidence", "gate+d3", "l2r+d2"]  # the baseline comes first
    base = rows["l2r"]
    assert base["vs_baseline"] == 1.0 and base["rows_per_molecule"] == base["calls_per_molecule"]
    assert base["positions_per_molecule"] > base["rows_per_molecule"]
    for name in ("gate+d3", "l2r+d2"):  # draft-and-verify: l2r's molecules in fewer calls and positions
        assert rows[name]["identical_to_baseline"] == 1.0, name
        assert rows[name]["calls_per_molecule"] < base["calls_per_molecule"], name
        assert rows[name]["positions_per_molecule"] < base["positions_per_molecule"], name
    # parallel commits: one row a call, fewer calls than one token each
    assert rows["confidence"]["rows_per_molecule"] == rows["confidence"]["calls_per_molecule"]
    assert "| cpu | 3 | gate+d3 |" in (tmp_path / "bench.md").read_text()
    for bad, message in [("gate+d4", "at most 3"), ("nosuch", "unknown engine"), ("gate+dx", "unknown engine")]:
        with pytest.raises(ImadaremError, match=message):
            Bench(BenchArgs(model=str(gated_block_file), engines=(bad,), out_dir=str(tmp_path)))


def test_packed_states_give_every_state_its_own_outputs(block_file):
    """A row's states in one sequence (block_verify.PackedStates): each copy's logits and gate are those of its
    state run alone, at every position it runs, and the shared prefix is each state's prefix; a row with a token
    placed after its current block (a template's suffix) keeps one sequence per state."""
    from imadarem.runtime.formats.block_verify import PackedStates, ZeroCond, open_positions, verify_states

    model = Generator(block_file).model
    sp, L, block = model.special, 24, 4
    rng = np.random.default_rng(0)
    x = rng.integers(4, model.vocab_size, (4, L))
    frozen = np.zeros((4, L), dtype=bool)
    frozen[:, :9] = True  # committed through position 8: the current block is 8-11, its first open position 9
    frozen[1, :6] = True
    frozen[1, 6:] = False  # row 1: open from 6, in block 4-7, whose drafts reach the block's end
    frozen[3, 17] = True  # row 3: a placed token after its current block
    x[~frozen] = sp.mask
    x[0, 9:12] = rng.integers(4, model.vocab_size, 3)
    x[1, 6:8] = rng.integers(4, model.vocab_size, 2)
    x[2, 9] = rng.integers(4, model.vocab_size)
    x[3, 9:11] = rng.integers(4, model.vocab_size, 2)
    rank, U = open_positions(frozen, 4)
    states, owner, k, _ = verify_states(x, frozen, rank, np.array([3, 2, 1, 2]), sp.mask)
    target, first = U[owner, k], U[:, 0]
    windows = rules.row_windows(states, target, sp.mask, sp.pad, block)
    packed = PackedStates(states, windows, owner, first, block, sp.mask, sp.pad)
    assert len(packed.lengths) == 3 + 3 and packed.lengths.sum() < windows.sum()  # row 3's three states run apart
    assert (packed.start[owner == 3] == 0).all() and len(set(packed.rows[owner == 3])) == 3
    assert packed.lengths[packed.rows[owner == 1][0]] == 4 + 4 + 4 + 8  # r_2's copy spans blocks 4-7 and 8-11

    def run(tokens, given=None):
        n, w = tokens.shape
        feed = model.feed(tokens, np.zeros(n, np.int64), ZeroCond(model.hidden_size)(n, w), packed=given)
        return model.session.run(["logits", "gate"], feed)

    together = run(packed.tokens, (packed.positions, packed.attend))
    for s in range(len(states)):
        alone = run(states[s:s + 1, :windows[s]])
        p = np.arange(windows[s])
        for got, want in zip(together, alone):
            np.testing.assert_allclose(got[packed.rows[s], packed.offset(np.full(p.size, s), p)], want[0], atol=1e-4)


@pytest.mark.parametrize("prompt", [None, "[C][C][O]<mask:6>[C][=C][C][=C][C][=C][Ring1][=Branch1]"])
def test_draft_and_verify_packs_a_rows_states_and_keeps_its_molecules(block_file, monkeypatch, prompt):
    """Packed or not, draft-and-verify gives one exact token per call's molecules; packing runs fewer positions
    de novo, and a template whose text lies after its blank runs its states apart, as before."""
    from imadarem.runtime.formats.block_verify import BlockVerifyStep

    gen = Generator(block_file)
    assert gen.model.packs
    positions = []
    run = gen.model.session.run
    monkeypatch.setattr(gen.model.session, "run", lambda names, feed: positions.append(feed["tokens"].size)
                        or run(names, feed))
    one = _ids(gen.generate(12, seed=5, prompt=prompt, drafts=0))
    counted = {}
    for pack in (False, True):
        monkeypatch.setattr(BlockVerifyStep, "pack", pack)
        positions.clear()
        for batch in (12, 5):
            assert _ids(gen.generate(12, seed=5, prompt=prompt, drafts=3, batch_size=batch)) == one, (pack, batch)
        counted[pack] = sum(positions)
    if prompt is None:
        assert counted[True] < 0.8 * counted[False], counted


def test_packed_state_inputs_on_a_model_without_blocks_are_refused_in_one_line(block_file, tmp_path):
    import json

    from conftest import rewrite_metadata
    from imadarem.runtime import ModelFileError
    from imadarem.runtime.metadata import KEY_CONFIG

    def unblock(meta):
        meta[KEY_CONFIG] = json.dumps({**json.loads(meta[KEY_CONFIG]), "objective": "mdlm"})
    with pytest.raises(ModelFileError, match="packed-state inputs but its config is not a block model's"):
        Generator(rewrite_metadata(block_file, tmp_path / "m.onnx", unblock))


def test_a_packing_block_file_rebuilds_into_pytorch_by_its_parameter_names(block_file):
    """The exporter turns a parameter read at a graph input (``pos_emb.decay`` at ``positions``) into an anonymous
    initializer; the export names it back, so ``imadarem export FILE`` can rebuild the model from the file."""
    from imadarem.export.onnx_import import model_from_onnx

    _, report = model_from_onnx(block_file)
    assert report.max_abs_logit_diff < 1e-3

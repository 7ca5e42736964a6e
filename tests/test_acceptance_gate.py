"""The acceptance gate (training/acceptance_gate.py, issue #24): its targets are what the model's own
left-to-right conditionals say about committing a block's masks together, and its gradient reaches the gate
head only."""

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny():
    from conftest import tiny_selfies_refine

    model = tiny_selfies_refine(objective="block", num_layers=2, dropout=0.0, gate_target="acceptance",
                                gate_head_hidden=16, sample_replace_rate=0.0, random_replace_rate=0.0)
    with torch.no_grad():  # sharper, less uniform conditionals than at initialisation
        model.tok_emb.weight.normal_(0, 0.3)
    return model


def _batch(model, rows=5, end=11, seed=0):
    from imadarem.training.block_objective import _draws
    from imadarem.training.objective import targets_of

    sp, cfg = model.special, model.config
    gen = torch.Generator().manual_seed(seed)
    clean = torch.full((rows, cfg.max_seq_len), sp.pad)
    clean[:, :end] = torch.randint(4, cfg.vocab_size, (rows, end), generator=gen)
    clean[:, end] = sp.eos
    draws = _draws(torch.Generator().manual_seed(seed + 1), rows, cfg.max_seq_len, cfg, sp, "cpu")
    keep = ("gate_offset", "gate_state", "gumbel")
    return clean, targets_of(clean, sp)[1], {k: draws[k] for k in keep}


def _probs(model, state):
    """The model's conditionals in one single-stream decoding state (its own block attention)."""
    sp, cfg = model.special, model.config
    with torch.no_grad():
        logits = model.forward_train(state[None], torch.zeros(1, dtype=torch.long),
                                     torch.zeros(1, state.shape[0], cfg.hidden_size))["logits"][0].float()
    logits[:, [sp.mask, sp.pad]] = float("-inf")
    return torch.softmax(logits, -1)


def _decoding_state(clean, xhat, first: int, filled: int, sp):
    """One row as a decoder holds it: clean before ``first``, x^ at the next ``filled`` positions, masks after."""
    s = torch.full_like(clean, sp.mask)
    s[:first] = clean[:first]
    s[first:first + filled] = xhat[first:first + filled]
    return s


def test_targets_are_the_left_to_right_conditionals_acceptance_and_rejection(tiny):
    from imadarem.training.acceptance_gate import acceptance_targets

    sp, B = tiny.special, tiny.config.block_size
    clean, ends, draws = _batch(tiny)
    t = acceptance_targets(tiny, clean, ends, draws, tiny.config, sp)
    checked = 0
    for r in range(clean.shape[0]):
        for j in torch.nonzero(t["where"][r]).flatten().tolist():
            o, k = int(t["offset"][r, j]), int(t["k"][r, j])
            first = j - j % B + o  # the block's first masked position
            p_ref = _probs(tiny, _decoding_state(clean[r], t["xhat"][r], first, j - first, sp))[j]  # j after its left
            if t["committed"][r, j]:
                q = _probs(tiny, _decoding_state(clean[r], t["xhat"][r], first, 0, sp))[j, t["xhat"][r, j]]
                want = 1 - min(1.0, float(p_ref[t["xhat"][r, j]] / q))
            else:
                p_now = _probs(tiny, _decoding_state(clean[r], t["xhat"][r], first, k, sp))[j]
                want = 1 - 0.5 * float((p_now - p_ref).abs().sum())
            assert abs(float(t["target"][r, j]) - want) < 1e-4, (r, j)
            if j % B == o + k:  # the first mask: committing it now is committing it in order
                assert float(t["target"][r, j]) == pytest.approx(1.0, abs=1e-5)
            if j % B == o and k > 0:  # the first commit was drawn from its own conditional
                assert float(t["target"][r, j]) == pytest.approx(0.0, abs=1e-5)
            checked += 1
    assert checked >= 10 and t["committed"][t["where"]].any() and (~t["committed"][t["where"]]).any()
    assert (t["target"][t["where"]] < 0.99).any()  # not all trivially accepted


def test_the_gate_loss_moves_the_gate_head_only_and_a_frozen_trunk_gets_nothing(tiny):
    import copy

    from imadarem.training.acceptance_gate import acceptance_gate_loss
    from imadarem.training.families.refine import RefineFamily

    model = copy.deepcopy(tiny).train()
    clean, ends, draws = _batch(model, seed=3)
    bce, correct, target, n = acceptance_gate_loss(model.forward_train, model, clean, ends, draws, model.config,
                                                   model.special)
    assert n > 0 and 0 <= float(correct) <= float(n)
    bce.backward()
    moved = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(name.startswith("gate_head.") for name in moved)

    cfg = copy.deepcopy(model.config)
    cfg.freeze_trunk = True
    frozen = RefineFamily().build(cfg, model.tokenizer)
    trainable = {name for name, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in frozen.named_parameters() if name.startswith("gate_head.")}


def test_the_acceptance_gate_model_exports_and_its_gate_reads_the_gate_head(tiny, tmp_path):
    """Exported, the gate is the MLP's sigmoid (ONNX Runtime against PyTorch)."""
    import numpy as np
    from imadarem.export.onnx_export import export_model
    from imadarem.runtime.formats import open_model

    path = tmp_path / "acc.onnx"
    export_model(tiny, path)
    clean, _, _ = _batch(tiny, rows=2)
    state = clean.clone()
    state[:, 6:] = tiny.special.mask
    cond = torch.zeros(2, state.shape[1], tiny.config.hidden_size)
    with torch.no_grad():
        _, gate, _ = tiny(state, torch.zeros(2, dtype=torch.long), cond)
    model = open_model(path, expect="refine")  # a block file: the host feeds its positions and attention too
    out = dict(zip(model.outputs, model.session.run(None, model.feed(state.numpy(), np.zeros(2, np.int64),
                                                                     cond.numpy()))))
    assert abs(out["gate"] - gate.numpy()).max() < 1e-4


def test_the_gate_selector_reads_an_acceptance_gate_as_prefix_commits_and_bounded_take_backs():
    import numpy as np
    from imadarem.plugins.selectors.gate import GateSelector
    from imadarem.runtime.selector import StepState

    M = 1
    tokens = np.array([[M, M, M, M], [5, M, M, M], [5, 6, M, M], [5, 6, 7, 8]])
    gate = np.array([[0.1, 0.9, 0.2, 0.9],  # first mask always, the next passes, the third stops the prefix
                     [0.0, 0.1, 0.2, 0.9],  # the first mask is forced; the second fails: the rest wait
                     [0.0, 0.8, 0.9, 0.9],  # the commit at 1 is rejected: it and the commits after it go back
                     [0.0, 0.1, 0.2, 0.1]], np.float32)  # nothing masked, nothing rejected: settled

    def state():
        return StepState(t=0, num_steps=8, tokens=tokens, proposals=np.full_like(tokens, 9),
                         logits=np.zeros((4, 4, 10)), gate=gate, critic=None, frozen=np.zeros((4, 4), bool),
                         rows=np.arange(4), rng=None, temperature=1.0, mask_id=M, pad_id=0, eos_id=2)

    sel = GateSelector(threshold=0.5, revise_threshold=0.5, revisions=1)
    sel.begin(batch_size=4, length=4, num_steps=8, config={"gate_target": "acceptance"})
    d = sel.select(state())
    assert d.update.tolist() == [[True, True, False, False], [False, True, False, False], [False] * 4, [False] * 4]
    assert d.remask.tolist() == [[False] * 4, [False] * 4, [False, True, False, False], [False] * 4]
    assert d.stop.tolist() == [False, False, False, True]
    again = sel.select(state())  # row 2 has spent its one revision: it commits in order instead
    assert not again.remask.any() and again.update[2].tolist() == [False, False, True, True]
    plain = GateSelector()
    plain.begin(batch_size=4, length=4, num_steps=8, config={"gate_target": "match"})
    assert plain.select(state()).remask is None  # other gates keep their meaning

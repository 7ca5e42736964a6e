"""The block model's verifier (``verify_layers``, self-speculative masked diffusion): a causal layer on top of the
trunk that gives each open position of the current block its left-to-right conditional given the tokens placed
before it in that block, so that one row verifies every draft of a call."""

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def verified():
    from conftest import tiny_selfies_refine

    model = tiny_selfies_refine(objective="block", num_layers=2, dropout=0.0, verify_layers=1)
    return model.eval()


def _clean(sp, vocab, rows=3, length=16, end=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.full((rows, length), sp.pad)
    clean[:, :end] = torch.randint(4, vocab, (rows, end), generator=gen)
    clean[:, end] = sp.eos
    return clean


def test_the_verifier_reads_only_the_tokens_placed_before_a_position_in_its_block(verified):
    cfg, sp = verified.config, verified.special
    L, bs = cfg.max_seq_len, cfg.block_size
    clean = _clean(sp, cfg.vocab_size, rows=1)
    state = torch.full_like(clean, sp.mask)
    state[:, :bs] = clean[:, :bs]  # block 1 open: what a decoder runs
    step, zeros = torch.zeros(1, dtype=torch.long), torch.zeros(1, L, cfg.hidden_size)
    with torch.no_grad():
        base = verified.forward_train(state, step, zeros, placed=clean)["verify_logits"]
        for j in range(bs, 2 * bs):
            other = clean.clone()
            other[0, j] = 4 if int(clean[0, j]) != 4 else 5
            moved = verified.forward_train(state, step, zeros, placed=other)["verify_logits"]
            changed = (moved - base).abs().amax(-1)[0]
            # position k of the block reads the tokens placed at positions < k of the block only
            assert torch.all(changed[bs:j + 1] < 1e-5), j
            assert torch.all(changed[j + 1:2 * bs] > 1e-5), j
            # earlier blocks never read it; later blocks only as the token before their first position
            assert torch.all(changed[:bs] < 1e-5), j
            if j + 1 < 2 * bs:
                assert torch.all(changed[2 * bs:] < 1e-5), j
    # the trunk's own heads are unchanged by the verifier
    with torch.no_grad():
        plain = verified.forward_train(state, step, zeros)
    assert torch.equal(plain["logits"], verified.forward_train(state, step, zeros, placed=clean)["logits"])


def test_the_block_loss_trains_the_verifier_and_a_frozen_trunk_stays_put():
    from conftest import tiny_selfies_refine
    from imadarem.training.block_objective import block_loss
    from imadarem.training.families.refine import RefineFamily

    model = tiny_selfies_refine(objective="block", num_layers=2, dropout=0.0, verify_layers=1)
    cfg, sp = model.config, model.special
    clean = _clean(sp, cfg.vocab_size, rows=40)
    loss, m = block_loss(model.train().forward_train, model, clean, torch.Generator().manual_seed(0), 40,
                         slice(0, 40), cfg, sp)
    loss.backward()
    assert float(m["verify_ce"]) > 0 and torch.isfinite(loss)
    assert float(m["loss"]) == pytest.approx(float(m["ce"]) + float(m["gate_bce"]) + float(m["verify_ce"]), rel=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["verify_prev.weight"] is not None and grads["verify_prev.weight"].abs().sum() > 0
    assert grads["verify_blocks.0.qkv.weight"].abs().sum() > 0
    # freeze_trunk: the heads learn (gate, verifier), the trunk does not
    from dataclasses import replace

    frozen = RefineFamily().build(replace(cfg, freeze_trunk=True), model.tokenizer)
    learning = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert any(n.startswith("verify_") for n in learning) and any(n.startswith("gate_head.") for n in learning)
    assert not any(n.startswith(("blocks.", "tok_emb.", "ln_f.")) for n in learning)
    # a gate loss weight of 0 keeps a trained gate as it is: only the verifier learns
    kept = RefineFamily().build(replace(cfg, freeze_trunk=True, gate_loss_weight=0.0), model.tokenizer)
    assert {n for n, p in kept.named_parameters() if p.requires_grad} == {n for n in learning if n.startswith("verify_")}


def test_verify_layers_need_a_block_objective():
    from imadarem.runtime.errors import ImadaremError
    from imadarem.training.config import ImplicitRefinementConfig

    with pytest.raises(ImadaremError, match="verify_layers needs objective 'block'"):
        ImplicitRefinementConfig(vocab_size=16, objective="mixture", verify_layers=1)

"""The block model's verifier (``verify_layers``, self-speculative masked diffusion): a causal layer on top of the
trunk that gives each open position of the current block its left-to-right conditional given the tokens placed
before it in that block, so that one row verifies every draft of a call."""

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def verified():
    from conftest import tiny_selfies_refine

    model = tiny_selfies_refine(objective="block", num_layers=2, dropout=0.0, verify_layers=1)
    with torch.no_grad():  # a trained-looking verifier: its branches start at zero (the trunk's marginals)
        for name, p in model.named_parameters():
            if name.startswith("verify_"):
                p.normal_(0, 0.1)
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
    assert grads["verify_blocks.0.proj.weight"].abs().sum() > 0 and grads["verify_blocks.0.mlp.2.weight"].abs().sum() > 0
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


# -- the file and the runtime (runtime/formats/self_verify.py) ---------------------------------------------------
@pytest.fixture(scope="module")
def verify_run(tmp_path_factory):
    """A tiny block model with a verifier, trained a few steps, and its file."""
    from conftest import tiny_block_file

    return tiny_block_file(tmp_path_factory.mktemp("verify"), 30, verify_layers=1)


def _left_to_right(model, n: int, seed: int) -> list[list[int]]:
    """Brute force: each position's exact token from the verifier's logits on the state where everything before it
    is committed and the rest masked (the verifier then reads only committed tokens), one call per token."""
    import numpy as np
    from imadarem.runtime import rules
    from imadarem.runtime.bans import run_bias
    from imadarem.runtime.prompt import blank_layout
    from imadarem.runtime.randomness import SampleStreams

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
            logits = model.session.run(["verify_logits"], feed)[0][0, j]
            token = int(np.argmax(logits + bias[j] + T * noise[i, j]))
            ids.append(token)
            if token == sp.eos:
                break
            x[0, j] = token
        out.append(ids)
    return out


def test_one_row_drafts_give_the_same_molecules_for_any_batch_size_in_one_row_a_call(verify_run, monkeypatch):
    """drafts=0 is the verifier's one-token-per-call loop (the brute force below); with drafts a call commits the
    exact tokens of the next positions while the drafts before them held. Those condition on the trunk's state of
    the call (the open positions masked) rather than on a state with the earlier ones committed, so the molecules
    are the verifier's samples but not drafts=0's token for token; for a seed they are the same at any batch size."""
    from imadarem.runtime import Generator
    from imadarem.runtime.formats import self_verify

    gen = Generator(verify_run[1])
    assert gen.model.self_verifying
    one = gen.generate(5, seed=4, drafts=0)
    assert [s.ids for s in one] == _left_to_right(gen.model, 5, seed=4)
    rows = []
    run = self_verify.SelfVerifyStep._outputs
    monkeypatch.setattr(self_verify.SelfVerifyStep, "_outputs",
                        lambda self, tokens, r, cut: rows.append(len(tokens)) or run(self, tokens, r, cut))
    for drafts in (1, 2, 3):
        want = None
        for batch in (5, 2, 1):
            rows.clear()
            got = gen.generate(5, seed=4, drafts=drafts, batch_size=batch)
            if want is None:
                want = [s.ids for s in got]
                assert sum(s.steps for s in got) < sum(s.steps for s in one), drafts  # commits several a call
            assert [s.ids for s in got] == want, (drafts, batch)
            # one row a sample per call (split into window groups at most), never one a draft
            assert sum(rows) == sum(s.steps for s in got), (drafts, batch)


def test_the_files_verifier_is_the_models(verify_run):
    import numpy as np
    from imadarem.export.exporters import load_source
    from imadarem.runtime import Generator

    model = load_source(verify_run[0]).model.eval()
    gen = Generator(verify_run[1])
    sp, L, V = model.special, model.config.max_seq_len, model.config.vocab_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, V, (3, L))
    tokens[:, 6:] = sp.mask
    noise = rng.gumbel(size=(3, L, V)).astype(np.float32)
    feed = gen.model.feed(tokens, np.zeros(3, np.int64), np.zeros((3, L, model.config.hidden_size), np.float32),
                          draft_noise=noise)
    drafts, verify = gen.model.session.run(["drafts", "verify_logits"], feed)
    with torch.no_grad():
        out = model(torch.tensor(tokens), torch.zeros(3, dtype=torch.long),
                    torch.zeros(3, L, model.config.hidden_size), torch.tensor(noise))
    assert np.array_equal(drafts, out[-2].numpy())
    assert np.abs(verify - out[-1].numpy()).max() < 1e-4


def test_a_partial_verifier_is_refused_in_one_line(verify_run, tmp_path):
    import onnx
    from imadarem.runtime import Generator, ModelFileError

    proto = onnx.load(str(verify_run[1]))
    kept = [o for o in proto.graph.output if o.name != "drafts"]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    onnx.save(proto, str(tmp_path / "partial.onnx"))
    with pytest.raises(ModelFileError, match="partial verifier"):
        Generator(tmp_path / "partial.onnx")


def test_a_fresh_verifier_gives_the_trunks_own_logits():
    """Zero-initialised branches: adding a verifier to a trained trunk (--init-from) starts from its marginals."""
    from conftest import tiny_selfies_refine

    model = tiny_selfies_refine(objective="block", num_layers=2, dropout=0.0, verify_layers=1)
    cfg, sp = model.config, model.special
    clean = _clean(sp, cfg.vocab_size, rows=2)
    state = clean.clone()
    state[:, 5:] = sp.mask
    with torch.no_grad():
        out = model.forward_train(state, torch.zeros(2, dtype=torch.long), torch.zeros(2, 16, cfg.hidden_size),
                                  placed=clean)
    assert torch.allclose(out["verify_logits"], out["logits"], atol=1e-5)


@pytest.mark.parametrize("sees", ["block", "prefix"])
def test_the_verifier_in_decoding_sees_what_the_two_stream_training_showed_it(sees):
    """Block b of the noisy stream, verified with the clean tokens placed = block b of the single-stream state a
    decoder reaches (clean blocks before b, block b as in x_t, masks after) with the same tokens placed."""
    from conftest import tiny_selfies_refine
    from imadarem.training.model import two_stream_attention

    model = tiny_selfies_refine(objective="block", num_layers=2, dropout=0.0, verify_layers=1, verify_sees=sees)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("verify_"):
                p.normal_(0, 0.1)
    cfg, sp = model.config, model.special
    L, bs = cfg.max_seq_len, cfg.block_size
    clean = _clean(sp, cfg.vocab_size)
    noisy = clean.clone()
    noisy[torch.rand(clean.shape, generator=torch.Generator().manual_seed(1)) < 0.5] = sp.mask
    pos = torch.arange(L)
    step = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        two = model.forward_train(torch.cat([noisy, clean], 1), step, torch.zeros(3, 2 * L, cfg.hidden_size),
                                  two_stream_attention(L, bs)[None], torch.cat([pos, pos]), clean)
        for b in range(L // bs):
            state = torch.full_like(clean, sp.mask)
            state[:, : b * bs] = clean[:, : b * bs]
            state[:, b * bs:(b + 1) * bs] = noisy[:, b * bs:(b + 1) * bs]
            one = model.forward_train(state, step, torch.zeros(3, L, cfg.hidden_size), placed=clean)
            sl = slice(b * bs, (b + 1) * bs)
            assert torch.allclose(one["verify_logits"][:, sl], two["verify_logits"][:, sl], atol=1e-5), b

"""Training: the model learns, the gate separates wrong from right tokens, resume and DDP are exact."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import FIXTURES, MOSES_SAMPLE, ROOT, tiny_args
from imadarem.runtime import CheckpointError
from imadarem.runtime.errors import ImadaremError
from imadarem.training.checkpoint import build_model, load_checkpoint
from imadarem.training.trainer import train


def auc(scores, labels):
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auc_helper():
    assert auc(np.array([0.1, 0.9, 0.8, 0.2]), np.array([0, 1, 1, 0])) == 1.0
    assert auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _fill_in_exact(gen, smiles, fraction, seed):
    """Mask ``fraction`` of each molecule's SELFIES tokens; share that greedy refinement restores exactly."""
    import selfies as sf

    rng = np.random.default_rng(seed)
    hits = 0
    for smi in smiles:
        parts = list(sf.split_selfies(sf.encoder(smi)))
        blank = np.zeros(len(parts), bool)
        blank[rng.choice(len(parts), max(1, round(fraction * len(parts))), replace=False)] = True
        template = "".join("<mask>" if b else p for p, b in zip(parts, blank))
        out = gen.generate(1, selector="maskgit", temperature=0.0, prompt=template, seed=0, steps=12)[0]
        hits += out.text == gen.tokenizer.decode(gen.tokenizer.encode(smi))
    return hits / len(smiles)


@pytest.mark.slow
def test_tiny_model_overfits_32_molecules(tmp_path):
    """32 molecules: the loss falls, and greedy refinement (through export and the runtime) fills
    masked training molecules back in exactly, which it cannot do for molecules it never saw."""
    from imadarem.export.onnx_export import export_checkpoint
    from imadarem.runtime import Generator

    molecules = MOSES_SAMPLE.read_text().split()[1:33]
    data = tmp_path / "m32.csv"
    data.write_text("SMILES\n" + "\n".join(molecules) + "\n")
    run = tmp_path / "run"
    # plain masked-LM here (the gate has its own test below): memorising needs clean context
    args = tiny_args(run, data=data, steps=2000, hidden_size=64, num_heads=4, sample_replace_rate=0.0,
                     random_replace_rate=0.0, self_condition_rate=0.0, use_critic=False, use_refine_gate=False)
    args.val_fraction, args.lr, args.min_lr_ratio = 0.0, 2e-3, 1.0  # every molecule is training data
    train(args)
    log = _log(run)
    first = np.mean([r["ce"] for r in log[:10]])
    last = np.mean([r["ce"] for r in log[-50:]])
    assert last < 0.35 * first, (first, last)  # 0.54 vs 2.90 measured

    model = build_model(load_checkpoint(run), "raw").eval()
    from imadarem.training.data import encode_file

    arr, _ = encode_file(data, tokenizer=model.tokenizer, cache_dir=tmp_path / "c").pack(64)
    x = torch.from_numpy(arr)
    sp = model.special
    real = x != sp.pad
    gen = torch.Generator().manual_seed(0)
    masked = (torch.rand(x.shape, generator=gen) < 0.15) & real
    inp = torch.where(masked, sp.mask, x)
    with torch.no_grad():
        logits = model(inp, torch.full((len(x),), 5), model.zero_cond(inp))[0]
    acc = float((logits.argmax(-1) == x)[masked].float().mean())
    unigram = float((x[real] == torch.mode(x[real]).values).float().mean())
    assert acc > 0.9 > unigram, (acc, unigram)

    runtime = Generator(str(export_checkpoint(run, tmp_path / "m32.onnx")))
    seen = _fill_in_exact(runtime, molecules, 0.3, seed=0)
    unseen = _fill_in_exact(runtime, MOSES_SAMPLE.read_text().split()[101:133], 0.3, seed=0)
    assert seen >= 0.75, seen  # 1.00 measured
    assert unseen < seen - 0.4, (seen, unseen)  # 0.00 measured


def test_bundled_model_predicts_held_out_molecules_and_drafts_well_enough_to_save_calls():
    """The shipped causal model on 200 MOSES test molecules it never saw: next-token NLL (0.578 nats
    measured), draft heads' top-1 accuracy (0.72 / 0.64 / 0.57 for 1, 2, 3 tokens ahead), and
    draft-and-verify committing well over two tokens per call."""
    from imadarem.runtime import Generator
    from imadarem.runtime.formats import open_model

    model = open_model(None, expect="causal")
    tok, sp = model.tokenizer, model.special
    nll, tokens, hits, heads = 0.0, 0, np.zeros(model.typed.num_drafts), np.zeros(model.typed.num_drafts)
    for smi in MOSES_SAMPLE.read_text().split()[1:201]:
        ids = tok.encode(smi) + [sp.eos]
        past, valid = model.empty_cache(1)
        logits, drafts, _ = model.run(np.array([[sp.mask] + ids[:-1]]), np.arange(len(ids))[None], past, valid)
        logp = logits[0] - np.log(np.exp(logits[0]).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(ids)), ids].sum()
        tokens += len(ids)
        for d in range(model.typed.num_drafts):
            target = np.array(ids[d + 1:])
            hits[d] += (drafts[0, : len(target), d].argmax(-1) == target).sum()
            heads[d] += len(target)
    assert nll / tokens < 0.65, nll / tokens
    accuracy = hits / heads
    assert accuracy[0] > 0.6 and (np.diff(accuracy) < 0).all(), accuracy
    samples = Generator().generate(64, seed=0, decode=False)
    assert sum(len(s.ids) for s in samples) / sum(s.steps for s in samples) > 2.2


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(tiny_args(whole, steps=16, dropout=0.1))
    train(tiny_args(split, steps=16, dropout=0.1), max_new_steps=7)
    assert load_checkpoint(split).step == 7
    train(tiny_args(split, steps=16, dropout=0.1), resume=True)
    a, b = _log(whole), _log(split)
    assert [r["step"] for r in b] == list(range(16))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa = load_checkpoint(whole).weights
    wb = load_checkpoint(split).weights
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_continued_run_reuses_the_encoding_its_tokenizer_was_built_from(tmp_path, monkeypatch):
    """The tokenizer a first run built from a file, passed back with that file (--init-from), finds the
    first run's cached encoding instead of converting every molecule again; a different tokenizer does not."""
    from imadarem.training import data as data_module

    source = tmp_path / "m.csv"
    source.write_text("SMILES\n" + "\n".join(MOSES_SAMPLE.read_text().split()[1:41]) + "\n")
    first = data_module.encode_file(source, cache_dir=tmp_path / "c")
    conversions = []
    convert = data_module.smiles_to_selfies_batch
    monkeypatch.setattr(data_module, "smiles_to_selfies_batch", lambda *a: conversions.append(1) or convert(*a))
    again = data_module.encode_file(source, tokenizer=first.tokenizer, cache_dir=tmp_path / "c")
    assert not conversions and all(np.array_equal(a, b) for a, b in zip(first.sequences, again.sequences))
    other = data_module.build_tokenizer("selfies", ["[C][O][N][S]"], None)
    data_module.encode_file(source, tokenizer=other, cache_dir=tmp_path / "c")
    assert conversions == [1]


def test_random_writings_train_on_other_orders_of_the_same_molecules_and_hold_out_whole_molecules(tmp_path):
    """--writings 2: each molecule three times (its file writing first), every writing the same molecule by
    RDKit, the orders mostly new; a run holds out whole molecules (no writing of a validation molecule is
    trained on) and validates on file writings only."""
    Chem = pytest.importorskip("rdkit.Chem")
    from imadarem.training import data as data_module
    from imadarem.training.trainer import Trainer

    source = tmp_path / "m.csv"
    source.write_text("SMILES\n" + "\n".join(MOSES_SAMPLE.read_text().split()[1:61]) + "\n")
    plain = data_module.encode_file(source, cache_dir=tmp_path / "c")
    data = data_module.encode_file(source, cache_dir=tmp_path / "c", writings=2, seed=0)
    assert plain.molecules is None and len(data.sequences) == 3 * len(plain.sequences)
    tok = data.tokenizer
    canon = [Chem.CanonSmiles(tok.decode(list(s))) for s in data.sequences]
    assert all(canon[i] == canon[int(np.flatnonzero(data.molecules == m)[0])] for i, m in enumerate(data.molecules))
    texts = [tok.decode(list(s)) for s in data.sequences]
    assert all(np.array_equal(data.sequences[i], plain.sequences[i]) for i in range(len(plain.sequences)))
    assert sum(t not in set(texts[:60]) for t in texts[60:]) > 60  # new orders, not the file's again
    again = data_module.encode_file(source, cache_dir=tmp_path / "c", writings=2, seed=0)
    assert np.array_equal(again.molecules, data.molecules)  # seeded: the same writings again (its own cache key)

    args = tiny_args(tmp_path / "r", data=source)
    args.writings, args.val_fraction = 2, 0.2
    trainer = Trainer(args)
    trainer.prepare()
    eos = trainer.special.eos

    def molecule(row):
        return Chem.CanonSmiles(tok.decode([int(t) for t in row[: list(row).index(eos)]]))
    held = {molecule(row) for row in trainer.val_data}
    trained = {molecule(row) for row in trainer.train_data}
    assert len(trainer.val_data) == len(held) == 12 and not held & trained and len(trainer.train_data) == 3 * 48
    file_rows = {tuple(row) for row in plain.pack(64)[0].tolist()}
    assert all(tuple(row) in file_rows for row in trainer.val_data.tolist())  # validated in the file's writing


def test_random_writings_need_smiles_data(tmp_path):
    text = tmp_path / "lines.txt"
    text.write_text("hello\nworld\n")
    r = subprocess.run([sys.executable, "-m", "imadarem.training", "--data", str(text), "--data-format", "text",
                        "--tokenizer", "char", "--writings", "1", "--out-dir", str(tmp_path / "r")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--writings needs SMILES data" in r.stderr and r.stderr.count("\n") == 1


def test_init_from_starts_a_new_run_on_a_checkpoints_ema_weights(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train(tiny_args(first, steps=12))
    # the new run's own knobs (dropout) go over the stored config; lr ~0 leaves the weights where they started
    args = tiny_args(second, steps=2, dropout=0.1)
    args.lr, args.init_from, args.model = 1e-12, str(first), {"dropout": 0.1}
    train(args)
    start, after = load_checkpoint(first), load_checkpoint(second)
    assert after.step == 2 and after.state["config"]["dropout"] == 0.1
    assert after.state["config"]["hidden_size"] == start.state["config"]["hidden_size"] == 32
    assert after.state["tokenizer"] == start.state["tokenizer"]
    ema, raw = start.model_weights("ema"), after.model_weights("raw")
    assert any(not torch.equal(ema[k], start.model_weights("raw")[k]) for k in ema)  # EMA, not the raw weights
    assert all(torch.allclose(ema[k], raw[k], atol=1e-6) for k in ema)
    wrong = tiny_args(tmp_path / "wrong", steps=2, hidden_size=16)
    wrong.init_from, wrong.model = str(first), {"hidden_size": 16}
    with pytest.raises(CheckpointError, match="do not fit this run's model"):
        train(wrong)
    other = tiny_args(tmp_path / "other", steps=2)
    other.family, other.init_from, other.model = "causal", str(first), {}
    with pytest.raises(CheckpointError, match="is a refine model; this run trains --family causal"):
        train(other)


def test_more_draft_heads_train_on_a_frozen_causal_trunk(tmp_path):
    """--init-from a causal run with more --drafts and freeze_trunk: the trunk stays as it was (so draft-and-verify
    keeps its molecules), the heads learn, the new one from the next-token head's start."""
    first, second = tmp_path / "first", tmp_path / "second"
    causal = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_seq_len": 48, "num_drafts": 1}
    args = tiny_args(first, steps=6)
    args.family, args.model = "causal", causal
    train(args)
    more = tiny_args(second, steps=4)
    more.family, more.init_from, more.lr = "causal", str(first), 1e-2
    more.model = {"num_drafts": 2, "freeze_trunk": True}
    train(more)
    start, after = load_checkpoint(first).model_weights("ema"), load_checkpoint(second).model_weights("raw")
    assert load_checkpoint(second).state["config"]["num_drafts"] == 2
    trunk = [k for k in start if not k.startswith("draft.")]
    assert trunk and all(torch.equal(start[k], after[k]) for k in trunk)  # the trunk (next-token head included)
    assert not torch.equal(start["draft.0.weight"], after["draft.0.weight"])  # the old head trained too
    assert not torch.equal(after["draft.1.weight"], torch.zeros_like(after["draft.1.weight"]))  # learned from zeros
    alone = tiny_args(tmp_path / "alone", steps=2)
    alone.family, alone.model = "causal", {**causal, "freeze_trunk": True}
    with pytest.raises(ImadaremError, match="give it with --init-from"):
        train(alone)


@pytest.mark.slow
@pytest.mark.parametrize("family, model", [("causal", {"num_drafts": 2}), ("refine", {"objective": "block", "block_size": 4}),
                                           ("refine", {"objective": "mixture", "block_size": 4})])
def test_every_family_trains_under_torch_compile(tmp_path, family, model):
    """--compile (what every device run uses) compiles the training forward and, for the refine family,
    the EMA teacher's pass; a family without a teacher pass must not trip over it."""
    args = tiny_args(tmp_path / "run", steps=2, **({} if family == "causal" else model))
    args.family, args.compile = family, True
    if family == "causal":
        args.model = {k: v for k, v in args.model.items() if k in ("hidden_size", "num_layers", "num_heads",
                                                                    "max_seq_len", "dropout", "ema_decay")} | model
    train(args)
    assert load_checkpoint(tmp_path / "run").step == 2


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "imadarem.training", "--data", str(MOSES_SAMPLE), "--out-dir", str(run),
           "--steps", "100000", "--batch-size", "8", "--hidden-size", "16", "--layers", "1", "--heads", "2",
           "--checkpoint-interval", "5", "--no-progress", "--cache-dir", str(tmp_path / "c")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "latest").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: checkpoint at the current step, exit 130
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "imadarem train --resume" in err and "Traceback" not in err
    step = json.loads(out.strip().splitlines()[-1])["step"]
    assert load_checkpoint(run).step == step and step > 0
    # SIGKILL leaves the last periodic checkpoint intact
    proc = subprocess.Popen(cmd[:2] + ["--resume", "--out-dir", str(run), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    time.sleep(4)
    proc.kill()
    proc.wait()
    assert load_checkpoint(run).step >= step


def test_bad_checkpoints_and_data_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an Imadarem checkpoint"):
        load_checkpoint(tmp_path / "empty")
    r = subprocess.run([sys.executable, "-m", "imadarem.training", "--data", str(tmp_path / "missing.csv"),
                        "--out-dir", str(tmp_path / "r")], capture_output=True, text=True)
    assert r.returncode == 2 and "data file not found" in r.stderr and r.stderr.count("\n") == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("family", [["--family", "causal", "--drafts", "2"], ["--family", "refine", "--dropout", "0"]])
def test_ddp_two_processes_match_one(tmp_path, family):
    """torchrun --nproc_per_node 2 (gloo, CPU) gives the loss curve of one process with the same global batch,
    for every family (the trainer is one)."""
    common = ["--data", str(MOSES_SAMPLE), "--steps", "6", "--batch-size", "16", "--hidden-size", "32",
              "--layers", "1", "--heads", "2", *family, "--log-interval", "1", "--no-progress",
              "--cache-dir", str(tmp_path / "c"), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "imadarem.training", "--out-dir", str(tmp_path / "one"), *common],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "imadarem.training", "--out-dir", str(tmp_path / "two"), *common],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert two.returncode == 0, two.stderr[:3000] + "\n...\n" + two.stderr[-1000:]
    a = [r["loss"] for r in _log(tmp_path / "one")]
    b = [r["loss"] for r in _log(tmp_path / "two")]
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fixture_file_is_present():
    assert (FIXTURES / "moses_test_sample.csv").stat().st_size > 10_000


def test_ranger21_option_trains_and_resumes(tmp_path):
    pytest.importorskip("pytorch_optimizer")
    args = tiny_args(tmp_path / "r", steps=6, hidden_size=16)
    args.optimizer = "ranger21"
    train(args, max_new_steps=3)
    result = train(tiny_args(tmp_path / "r", steps=6), resume=True)
    assert result["step"] == 6
    assert all(np.isfinite(r["loss"]) for r in _log(tmp_path / "r"))


def test_a_fresh_run_restarts_the_log_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    from conftest import tiny_args
    from imadarem.training.trainer import train

    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 999, "loss": 1.0}\n')  # what the killed run had logged
    train(tiny_args(run, steps=3))
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines() if '"step"' in line]
    assert 999 not in steps and steps


@pytest.mark.parametrize("command", [["train", "--data", "x", "--out-dir", "y"], ["export", "run", "-o", "m.onnx"],
                                     ["bench"]])
def test_development_commands_without_torch_name_the_extra(command):
    code = ("import sys; sys.modules['torch'] = None\n"  # as on a quickstart install: `import torch` fails
            "import importlib.util; real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: None if name == 'torch' else real(name, *a)\n"
            "from imadarem.runtime.cli import main; main(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "pip install 'imadarem[train]'" in r.stderr

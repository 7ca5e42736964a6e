"""How far an exported file is from the PyTorch model it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def parity_report(checkpoint, model_path: Path, weights: str = "ema", batches=((1, 7), (4, None), (9, 19)),
                  seed: int = 0) -> dict[str, Any]:
    """max |logits difference| over random batches/lengths, and greedy-refinement token agreement."""
    import torch
    from imadarem.runtime.formats import open_model
    from imadarem.runtime.formats.refine import OUTPUTS
    from imadarem.training.checkpoint import build_model, load_checkpoint

    model = build_model(load_checkpoint(checkpoint), weights).eval()
    mfile = open_model(model_path, expect="refine")
    cfg = model.config
    rng = np.random.default_rng(seed)
    worst = {"logits": 0.0, "gate": 0.0, "cond_next": 0.0}
    for b, length in batches:
        length = cfg.max_seq_len if length is None else min(length, cfg.max_seq_len)
        tokens = rng.integers(0, cfg.vocab_size, (b, length))
        tokens[rng.random((b, length)) < 0.3] = model.special.mask
        step = rng.integers(0, cfg.max_refinement_steps, b)
        cond = (rng.normal(size=(b, length, cfg.hidden_size)) * 0.1).astype(np.float32)
        feeds = [None]  # the model's own positions and attention, and on a packing file arbitrary ones too
        if mfile.packs:
            feeds.append((rng.integers(0, cfg.max_seq_len, (b, length)), rng.random((b, length, length)) < 0.5))
        for packed in feeds:
            ort_out = mfile.session.run(list(OUTPUTS), mfile.feed(tokens, step, cond, packed=packed))
            extra = {} if packed is None else {"positions": torch.from_numpy(packed[0]),
                                               "attend": torch.from_numpy(packed[1])}
            with torch.no_grad():
                ref = model(torch.from_numpy(tokens), torch.from_numpy(step), torch.from_numpy(cond), **extra)
            for name, a, r in zip(worst, ort_out, ref):
                worst[name] = max(worst[name], float(np.abs(a - r.numpy()).max()))
    report: dict[str, Any] = {"max_abs_diff": worst}
    if cfg.objective != "block":  # the PyTorch reference loop decodes all positions at once, a block model does not
        report["greedy_token_agreement"] = greedy_agreement(model, mfile, n=16)
    return report


def greedy_agreement(model, mfile, n: int = 16) -> float:
    """Fraction of positions where the file's greedy refinement matches PyTorch's (gate selector)."""
    from imadarem.training.reference import torch_refine

    ours = _ort_greedy(mfile, n, model.config.max_refinement_steps)
    ref = torch_refine(model, n, steps=model.config.max_refinement_steps, temperature=0.0, seed=0)
    return float((ours == ref).mean())


def _ort_greedy(mfile, n: int, steps: int) -> np.ndarray:
    from imadarem.runtime.generator import Generator

    gen = Generator(mfile)
    samples = gen.generate(n, selector="gate", steps=steps, temperature=0.0, seed=0)
    out = np.full((n, mfile.max_seq_len), mfile.special.pad, dtype=np.int64)
    for i, s in enumerate(samples):
        out[i, : len(s.ids)] = s.ids
    return out

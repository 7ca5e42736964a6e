"""Export a causal model (``imadarem.training.causal``) as one ONNX step with a KV cache: model format "2".

The graph is ``CausalLM.step``: inputs ``tokens``/``positions`` int64 [batch, new], ``past`` float32
[layers, 2, batch, heads, cached, head_dim] and ``past_valid`` bool [batch, cached]; outputs ``logits``
[batch, new, vocab], ``drafts`` [batch, new, drafts, vocab] and ``present`` (the cache with the new
tokens appended). Batch, new and cached positions are dynamic (cached >= 1: the runtime starts from one
entry that counts for nothing). The metadata follows format 1's keys, with ``imadarem.config`` holding
the causal config (``"kind": "causal"``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from imadarem.export.onnx_export import (
    OPSET,
    _quiet_exporters,
    _versions,
    build_metadata,
    check_writable,
    write_with_metadata,
)
from imadarem.runtime.formats.causal import FORMAT, INPUTS, OUTPUTS


def _step_module(model):
    """``CausalLM.step`` as the ``forward`` of a module, which is what torch.onnx exports."""
    import torch

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tokens, positions, past, past_valid):
            return self.model.step(tokens, positions, past, past_valid)

    return Step().eval()


def export_causal(model, out_path: str | os.PathLike, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a CausalLM with a tokenizer) to ``out_path`` as a format-2 model file (fp32)."""
    import onnx
    import torch

    out_path = Path(out_path)
    check_writable(out_path)
    model = model.eval().cpu()
    c = model.config
    batch, new, cached = 2, 3, 2
    tokens = torch.full((batch, new), model.special.mask, dtype=torch.long)
    positions = torch.arange(new)[None].repeat(batch, 1) + cached
    past = torch.zeros(c.num_layers, 2, batch, c.num_heads, cached, c.head_dim)
    valid = torch.ones(batch, cached, dtype=torch.bool)
    B = torch.export.Dim("batch", min=1, max=1 << 20)
    T = torch.export.Dim("new", min=1, max=c.max_seq_len + 1)
    P = torch.export.Dim("cached", min=1, max=4 * (c.max_seq_len + 1) * max(1, c.num_drafts + 1))
    dynamic = {"tokens": {0: B, 1: T}, "positions": {0: B, 1: T}, "past": {2: B, 4: P}, "past_valid": {0: B, 1: P}}
    info = {"tools": _versions(), "parameters": model.num_parameters(), **(provenance or {})}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _quiet_exporters():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "step.onnx"
        program = torch.onnx.export(_step_module(model), (tokens, positions, past, valid), dynamo=True, input_names=list(INPUTS),
                                    output_names=list(OUTPUTS), dynamic_shapes=dynamic, opset_version=OPSET,
                                    optimize=True, verbose=False)
        program.save(str(raw), external_data=False)
        proto = onnx.load(str(raw))
    write_with_metadata(proto, out_path, build_metadata(model, info, FORMAT))
    return out_path


def calibration_feeds(path: str | os.PathLike, n: int = 256, seed: int = 0, batch: int = 32) -> list[dict[str, Any]]:
    """Inputs of a causal step file that cover what decoding feeds it: ``n`` molecules the file samples
    itself (left to right, seed ``seed``), teacher-forced in one call each, BOS first. Static int8
    quantisation fixes its activation scales from these (no training data needed)."""
    import numpy as np
    from imadarem.runtime.generator import Generator

    gen = Generator(path)
    ids = np.concatenate([r.ids for r in gen.iter_results(n, seed=seed, batch_size=64, drafts=0)])
    model = gen.model
    sp, L = model.special, ids.shape[1]
    tokens = np.concatenate([np.full((len(ids), 1), sp.mask), ids[:, : L - 1]], 1).astype(np.int64)
    feeds = []
    for i in range(0, len(tokens), batch):
        part = tokens[i : i + batch]
        past, valid = model.empty_cache(len(part))
        feeds.append({"tokens": part, "positions": np.broadcast_to(np.arange(L, dtype=np.int64), part.shape).copy(),
                      "past": past, "past_valid": valid})
    return feeds


def causal_parity(model, path: str | os.PathLike, batch: int = 4, seed: int = 0) -> dict[str, Any]:
    """The file against the PyTorch model: the whole sequence in one call, then the same tokens fed in
    two calls through the cache (what decoding does); the largest logit differences of each."""
    import numpy as np
    import onnxruntime as ort
    import torch

    c = model.config
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, c.vocab_size, (batch, c.max_seq_len)).astype(np.int64)
    tokens[:, 0] = model.special.mask  # BOS
    positions = np.broadcast_to(np.arange(c.max_seq_len), tokens.shape).astype(np.int64)
    past, valid = (t.numpy() for t in model.empty_cache(batch))
    with torch.no_grad():
        want = model.step(torch.from_numpy(tokens), torch.from_numpy(positions), torch.from_numpy(past),
                          torch.from_numpy(valid))[0].numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"tokens": tokens, "positions": positions, "past": past, "past_valid": valid}
    whole = sess.run(["logits"], feed)[0]
    half = c.max_seq_len // 2
    first = sess.run(None, {**feed, "tokens": tokens[:, :half], "positions": positions[:, :half]})
    cache_valid = np.concatenate([valid, np.ones((batch, half), bool)], 1)
    second = sess.run(["logits"], {"tokens": tokens[:, half:], "positions": positions[:, half:], "past": first[2],
                                   "past_valid": cache_valid})[0]
    cached = np.concatenate([first[0], second], 1)
    return {"max_abs_diff": {"logits": float(np.abs(whole - want).max()),
                             "logits_through_cache": float(np.abs(cached - want).max())},
            "greedy_token_agreement": float((cached.argmax(-1) == want.argmax(-1)).mean())}


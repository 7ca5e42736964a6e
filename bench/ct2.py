"""``ctranslate2-<p>`` rows of ``imadarem bench`` for a causal model (issue #26): CTranslate2, the usual fast
CPU engine for one-token-per-step decoding, on the same weights.

- **The model.** The trunk rebuilt from the model file (the PyTorch rows' source; draft heads dropped) goes
  through ``export/transformers_export.py`` (GPT-2 layout, our token ids) and CTranslate2's
  ``TransformersConverter`` (``int8``: weights quantised at conversion, ``compute_type="int8"``; ``fp32``:
  float32 throughout), then runs in a ``ctranslate2.Generator`` on the CPU (``intra_threads`` = the
  bench's threads, ``inter_threads=1``).
- **The decoding.** CTranslate2 decodes one token per call with its own KV cache and no draft heads, so its
  baseline is our one-token decoder at the same precision, ``ort-decode-l2r-<p>`` (``vs_baseline``): the
  row says how our own left-to-right engine compares with CTranslate2's, and the summary how our
  refinement loop does. Every molecule starts from BOS (our mask id at position 0), draws from the full
  distribution (``sampling_topk=0``) at the model's sampling temperature with MASK, PAD and UNK suppressed
  (our decoder's bans: ``runtime/bans.py``) and runs up to ``max_seq_len`` tokens or its EOS; the EOS is
  kept, so calls per molecule (one per generated token) count it as ours do, and the ids are detokenised
  by the model's tokenizer like every other row's. CTranslate2 feeds BOS in its first call; the decode
  file draws the first token from logits stored in it (the BOS call is the same for every molecule), so
  the baseline makes one call fewer per molecule of the same length.
- **Not the same molecules.** CTranslate2 samples with its own RNG (``ctranslate2.set_random_seed(seed)``
  before each run), not our per-sample counter noise: the distribution is the same, the molecules are
  not, so ``identical_to_baseline`` stays None and ``--samples`` scores (FCD/Test) show the distribution.
- **Timing.** One ``generate_batch`` call per batch, timed like the other rows' batches. CTranslate2 does
  not expose its steps, so a batch's wall time is spread evenly over its sequential steps (its longest
  molecule's tokens): step p50/p95 are per-batch means and ``outside_run`` is None.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from imadarem.runtime.bans import banned_ids
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.results import LoopTimings

COMPUTE_TYPES = {"int8": "int8", "fp32": "float32"}


def require() -> None:
    """One line, before any export, when the rows cannot run."""
    missing = [m for m in ("ctranslate2", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImadaremError(f"the ctranslate2 rows need {' and '.join(missing)}: pip install 'imadarem[bench,hf]'")


def convert(trunk, precision: str, work: Path) -> Path:
    """The CTranslate2 folder of ``trunk`` (a CausalLM) at ``precision``, via the GPT-2 folder."""
    from ctranslate2.converters import TransformersConverter
    from imadarem.export.transformers_export import save_transformers

    hf, out = work / "ctranslate2-hf", work / f"ctranslate2-{precision}"
    with _quiet():
        if not hf.is_dir():
            save_transformers(trunk, hf)
        TransformersConverter(str(hf)).convert(str(out), quantization="int8" if precision == "int8" else None)
    config = json.loads((out / "config.json").read_text())
    if config.get("unk_token") is None:  # CTranslate2 will not load without one; PAD stands in (never sampled)
        config["unk_token"] = trunk.tokenizer.id_to_token(trunk.special.pad)
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def load(path: Path, precision: str, threads: int):
    import ctranslate2

    return ctranslate2.Generator(str(path), device="cpu", compute_type=COMPUTE_TYPES[precision],
                                 intra_threads=threads, inter_threads=1)


def sampling_options(model) -> dict[str, Any]:
    """``generate_batch``'s options for our decoder's distribution: BOS is fed (not returned), the full
    distribution at the model's temperature (argmax at 0), our bans, EOS kept in the result."""
    tok, sp, cfg = model.tokenizer, model.special, model.config
    temperature = float(cfg.sampling_temperature)
    banned = banned_ids(sp, getattr(tok, "unk_token_id", None))
    return {"max_length": cfg.max_seq_len, "sampling_topk": 0 if temperature > 0 else 1,
            "sampling_temperature": temperature if temperature > 0 else 1.0,
            "suppress_sequences": [[tok.id_to_token(int(i))] for i in banned],
            "end_token": tok.id_to_token(sp.eos) if sp.eos is not None else None, "return_end_token": True,
            "include_prompt_in_result": False}


def sampler(generator, model, batch: int) -> Callable[[LoopTimings, int, int], tuple[np.ndarray, np.ndarray]]:
    """``run(timings, seed, n)`` -> ids [n, max_seq_len] (PAD after the EOS) and calls per molecule, in
    batches of ``batch``: the bench's runner interface."""
    import ctranslate2

    sp, length = model.special, model.config.max_seq_len
    start, options = [model.tokenizer.id_to_token(sp.mask)], sampling_options(model)

    def run(tm: LoopTimings, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        ctranslate2.set_random_seed(seed)
        ids = np.full((n, length), sp.pad, dtype=np.int64)
        calls = np.zeros(n, dtype=np.int64)
        started = time.perf_counter()
        for first in range(0, n, batch):
            count = min(batch, n - first)
            call_started = time.perf_counter()
            results = generator.generate_batch([start] * count, **options)
            seconds = time.perf_counter() - call_started
            for i, result in enumerate(results):
                seq = result.sequences_ids[0]
                ids[first + i, : len(seq)] = seq
                calls[first + i] = len(seq)
            steps = max(1, int(calls[first : first + count].max()))
            tm.step_seconds.extend([seconds / steps] * steps)
        tm.total_seconds += time.perf_counter() - started
        return ids, calls
    return run


def settings(model, threads: int) -> dict[str, Any]:
    """What bench.json records of the rows."""
    import ctranslate2

    options = sampling_options(model)
    return {"version": ctranslate2.__version__, "device": "cpu", "compute_types": COMPUTE_TYPES,
            "intra_threads": threads, "inter_threads": 1, "start_token": model.tokenizer.id_to_token(model.special.mask),
            "seed": "ctranslate2.set_random_seed(seed) before each run",
            "sampling": {k: options[k] for k in ("sampling_topk", "sampling_temperature", "max_length",
                                                 "suppress_sequences", "end_token")}}


def notes(model, precision: str, threads: int) -> list[str]:
    import ctranslate2

    options = sampling_options(model)
    return [f"CTranslate2 {ctranslate2.__version__}, compute_type {COMPUTE_TYPES[precision]}, intra_threads "
            f"{threads}, inter_threads 1",
            f"sampling_topk {options['sampling_topk']} (full distribution), temperature "
            f"{options['sampling_temperature']:g}, max_length {options['max_length']}, suppressed "
            f"{[s[0] for s in options['suppress_sequences']]}",
            "own RNG (set_random_seed per run): same distribution as the baseline, not the same molecules",
            "one generate_batch per batch: step times are the batch's wall time over its longest molecule's tokens"]


@contextlib.contextmanager
def _quiet():
    """Transformers' progress bars and warnings while writing and converting are not the reader's business."""
    from imadarem.export.onnx_export import _quiet_exporters
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with _quiet_exporters():
            yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


__all__ = ["convert", "load", "notes", "require", "sampler", "sampling_options", "settings"]

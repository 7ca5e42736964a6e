"""Causal model files (format "2"): the reader, and the left-to-right decoder that is their yardstick.

A format-2 file is one causal step (``export/causal_export.py``): it takes the new tokens, their
positions, the KV cache of the tokens before them and which cache entries count, and returns the next-
token logits after each new token, the draft heads' logits (the tokens 2..D+1 places ahead) and the
cache with the new tokens appended.

Two ways to decode one:

- the refinement loop (``Generator``, any selector): ``causal_step.CausalLoopState`` verifies the drafts
  the selector placed and commits at least one exact token per call; with the default ``gate`` selector
  that is draft-and-verify over the draft heads;
- ``CausalGenerator`` here: plain ancestral sampling, one token per call with a KV cache and no selector
  machinery, the lean left-to-right decoder that ``imadarem bench`` times as the baseline
  (``ort-causal-l2r``).

Both draw token j of sample i with the same noise, a pure function of (the sample's key, j, token)
(``rules.counter_gumbel``), so for the same seed they give the same molecules, token for token, for any
batch size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.causal_step import PRESENTED_OUTPUTS, position_noise
from imadarem.runtime.errors import ModelFileError, SelectorError
from imadarem.runtime.generator import LoopTimings, Sample, banned_ids, logit_bias, plain_request
from imadarem.runtime.modelfile import (
    CAUSAL_FORMAT,
    ModelConfig,
    check_metadata,
    checked_fields,
    open_session,
)
from imadarem.runtime.prompt import blank_layout
from imadarem.runtime.randomness import SampleStreams
from imadarem.runtime.tokenizer import SpecialIds, TokenizerAdapter

INPUTS = ("tokens", "positions", "past", "past_valid")
OUTPUTS = ("logits", "drafts", "present")


@dataclass(frozen=True)
class CausalConfig:
    """The typed view of a format-2 file's config (``"kind": "causal"``)."""

    vocab_size: int
    max_seq_len: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_drafts: int = field(metadata={"min": 0})
    sampling_temperature: float

    @classmethod
    def from_dict(cls, config: dict[str, Any], path: str = "model") -> CausalConfig:
        if config.get("kind") != "causal":
            raise ModelFileError(f"{path}: a format {CAUSAL_FORMAT} model config must say \"kind\": \"causal\"")
        values = checked_fields(cls, config, path)
        if values["hidden_size"] % values["num_heads"]:
            raise ModelFileError(f"{path}: model config hidden_size {values['hidden_size']} is not a multiple of "
                                 f"num_heads {values['num_heads']}")
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class CausalModelFile:
    path: str
    session: Any
    config: dict[str, Any]
    typed: CausalConfig
    tokenizer: TokenizerAdapter
    special: SpecialIds
    provenance: dict[str, Any]
    metadata: dict[str, str]

    #: the refinement loop runs this file through ``causal_step.CausalLoopState``
    causal = True
    graph_sampling = False
    device_state = False
    outputs = list(PRESENTED_OUTPUTS)  # what selectors see (computed from the heads, not graph outputs)

    @property
    def vocab_size(self) -> int:
        return self.typed.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.typed.max_seq_len

    @property
    def hidden_size(self) -> int:
        return self.typed.hidden_size

    @cached_property
    def typed_config(self) -> ModelConfig:
        """The loop's view: at most max_seq_len + 1 steps (each call commits at least one exact token, so
        every row ends verified), no early stop on a quiet step (a row ends when it is all verified)."""
        c = self.typed
        return ModelConfig(c.vocab_size, c.hidden_size, c.max_seq_len, c.max_seq_len + 1, 0.0,
                           c.sampling_temperature, float(self.config.get("min_refine_uncertainty", 0.1)), True)

    def run(self, tokens: np.ndarray, positions: np.ndarray, past: np.ndarray, valid: np.ndarray):
        return self.session.run(list(OUTPUTS), {"tokens": tokens, "positions": positions, "past": past,
                                                "past_valid": valid})

    def empty_cache(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.typed
        return (np.zeros((c.num_layers, 2, batch, c.num_heads, 1, c.head_dim), np.float32),
                np.zeros((batch, 1), bool))


def load_causal_file(path: str, provider: str = "cpu", threads: int | None = None,
                     opened: tuple | None = None) -> CausalModelFile:
    """Open and check a format-2 file: metadata, the graph's inputs and outputs, and one probe call."""
    path = str(path)
    session, meta = opened or open_session(path, provider, threads)
    config, tokenizer, special, provenance = check_metadata(meta, path, CausalConfig, CAUSAL_FORMAT)
    typed = CausalConfig.from_dict(config, path)
    names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    for want, have, kind in ((INPUTS, names[0], "input"), (OUTPUTS, names[1], "output")):
        missing = [n for n in want if n not in have]
        if missing:
            raise ModelFileError(f"{path}: a causal graph needs the {kind}s {', '.join(want)} (missing "
                                 f"{', '.join(missing)})")
    model = CausalModelFile(path, session, config, typed, tokenizer, special, provenance, meta)
    past, valid = model.empty_cache(1)
    try:
        logits, drafts, present = model.run(np.full((1, 1), special.mask, np.int64), np.zeros((1, 1), np.int64),
                                            past, valid)
    except Exception as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelFileError(f"{path}: the causal graph does not run with its config (onnxruntime: "
                             f"...{detail[-120:]})") from None
    want = {"logits": (1, 1, typed.vocab_size), "drafts": (1, 1, typed.num_drafts, typed.vocab_size),
            "present": (typed.num_layers, 2, 1, typed.num_heads, 2, typed.head_dim)}
    for name, value in zip(OUTPUTS, (logits, drafts, present)):
        if value.shape != want[name]:
            raise ModelFileError(f"{path}: the probe call gave {name} of shape {list(value.shape)}; the config "
                                 f"says {list(want[name])}")
    return model


class CausalGenerator:
    """Ancestral left-to-right decoding of a format-2 file: one token per call, KV cache, nothing else."""

    def __init__(self, model_path, provider: str = "cpu", threads: int | None = None, opened: tuple | None = None):
        self.model = load_causal_file(str(model_path), provider, threads, opened)
        self.provider = provider
        self.config = self.model.config
        self.model_config = self.model.typed
        self.tokenizer, self.special = self.model.tokenizer, self.model.special
        # the loop's bans for a blank layout (the same at every position), as the decode graphs apply them
        self._bias = blank_bans(self.tokenizer, self.special, self.model_config.vocab_size,
                                self.model_config.max_seq_len)[0]

    def generate(self, n: int = 1, **kwargs: Any) -> list[Sample]:
        return list(self.iter_generate(n, **kwargs))

    def iter_generate(self, n: int = 1, selector: str | None = None, temperature: float | None = None,
                      seed: int | None = None, batch_size: int | None = None, timings: LoopTimings | None = None,
                      decode: bool = True) -> Iterator[Sample]:
        """The samples, batch by batch (as ``Generator.iter_generate``); ``selector`` may only be ``l2r``."""
        if selector not in (None, "l2r"):
            raise SelectorError(f"CausalGenerator decodes left to right only, not with {selector!r} (run "
                                "selectors on a causal file with Generator)")
        n, temp, batch, root = plain_request(n, temperature, seed, batch_size, self.model_config.sampling_temperature)
        return self._batches(n, batch, root, temp, timings, decode)

    def _batches(self, n, batch, root, temp, timings, decode) -> Iterator[Sample]:
        for first in range(0, n, batch):
            started = time.perf_counter()
            size = min(batch, n - first)
            samples = self._decode(size, SampleStreams(root, first, size), temp, timings, decode)
            if timings is not None:
                timings.total_seconds += time.perf_counter() - started
            yield from samples

    def _decode(self, n: int, streams: SampleStreams, temp: float, timings, decode: bool) -> list[Sample]:
        sp, L, V = self.special, self.model_config.max_seq_len, self.model_config.vocab_size
        ids = np.full((n, L), sp.pad, dtype=np.int64)
        calls = np.zeros(n, dtype=np.int64)
        active = np.arange(n)
        noise = position_noise(streams.keys(), L, V)
        past, valid = self.model.empty_cache(n)
        token = np.full((n, 1), sp.mask, np.int64)  # BOS
        for j in range(L):
            started = time.perf_counter()
            logits, _, past = self.model.run(token, np.full((active.size, 1), j, np.int64), past, valid)
            run_seconds = time.perf_counter() - started
            valid = np.concatenate([valid, np.ones((active.size, 1), bool)], 1)
            token = rules.coupled_sample(logits[:, 0] + self._bias, temp, noise[:, j])
            ids[active, j] = token
            calls[active] += 1
            self._time(timings, started, run_seconds, active.size)
            done = token == sp.eos if sp.eos is not None else np.zeros(active.size, bool)
            keep = ~done
            active, token, noise = active[keep], token[keep][:, None], noise[keep]
            past, valid = past[:, :, keep], valid[keep]
            if not active.size:
                break
        return [self._finish(ids[i], int(calls[i]), decode) for i in range(n)]

    def _finish(self, row: np.ndarray, calls: int, decode: bool) -> Sample:
        ids = row.tolist()
        eos = self.special.eos
        ids = ids[: ids.index(eos) + 1] if eos is not None and eos in ids else ids[:calls]
        return Sample(self.tokenizer.decode(ids) if decode else None, ids, calls, [1] * calls, False)

    @staticmethod
    def _time(timings: LoopTimings | None, started: float, run_seconds: float, rows: int) -> None:
        """One call's entry: its wall time from ``started`` (sampling included), the seconds inside
        onnxruntime, the rows it ran and the tokens fed per row (1)."""
        if timings is None:
            return
        timings.step_seconds.append(time.perf_counter() - started)
        timings.run_seconds.append(run_seconds)
        timings.active_rows.append(rows)
        timings.run_lengths.append(1)


def blank_bans(tokenizer, special, vocab_size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The bans of a causal decoder's exact tokens (the loop's for a blank layout, the same at every
    position: MASK, PAD, UNK never) and of its drafts (EOS too: an EOS comes only from an exact token),
    float32 [V] each."""
    bias = logit_bias(blank_layout(length, special), vocab_size,
                      banned_ids(special, getattr(tokenizer, "unk_token_id", None)), special.eos)[0].copy()
    draft = bias.copy()
    if special.eos is not None:
        draft[special.eos] = -np.inf
    return bias, draft


def is_causal(meta: dict[str, str]) -> bool:
    from imadarem.runtime.modelfile import KEY_FORMAT

    return meta.get(KEY_FORMAT) == CAUSAL_FORMAT


__all__ = ["CausalConfig", "CausalGenerator", "CausalModelFile", "blank_bans", "is_causal", "load_causal_file"]

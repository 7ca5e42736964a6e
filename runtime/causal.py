"""Causal model files (format "2"): left-to-right and draft-and-verify decoding with a KV cache.

A format-2 file is one causal step (``export/causal_export.py``): it takes the new tokens, their
positions, the KV cache of the tokens before them and which cache entries count, and returns the next-
token logits after each new token, the draft heads' logits (the tokens 2..D+1 places ahead) and the
cache with the new tokens appended.

Two decoders, both in numpy around ``session.run``:

- ``l2r``: one token per call (ancestral sampling; the left-to-right yardstick).
- ``verify`` (the default when the file has draft heads): draft-and-verify. A call feeds the next token,
  already sampled from its exact conditional, plus D drafts sampled from the draft heads; the main head's
  output before each draft is that draft's exact conditional p, and the draft is kept with probability
  min(1, p/q) (q: the distribution it was drawn from), the first rejected one replaced by a sample of
  max(0, p - q) (speculative sampling, Leviathan et al. 2023). The molecules are distributed exactly as
  ``l2r``'s; a call commits 1 + (accepted drafts) tokens. Rejected drafts stay in the cache, masked out by
  ``past_valid``, so nothing is copied.

Randomness is per sample (``randomness.SampleStreams``), as in the refinement loop: the same seed gives
the same molecules for any batch size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.errors import ImadaremError, ModelFileError, SelectorError
from imadarem.runtime.generator import LoopTimings, Sample, _check_seed, _number, _positive_int
from imadarem.runtime.limits import DEFAULT_BATCH_SIZE
from imadarem.runtime.modelfile import CAUSAL_FORMAT, check_metadata, checked_fields, open_session
from imadarem.runtime.randomness import SampleStreams
from imadarem.runtime.tokenizer import SpecialIds, TokenizerAdapter

DECODERS = ("verify", "l2r")
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


class _Rows:
    """The decoding state of one batch: committed tokens, the next exact token, the drafts and their
    distributions, the cache and which of its entries count; rows leave as they finish."""

    def __init__(self, n: int, length: int, pad: int):
        self.active = np.arange(n)
        self.ids = np.full((n, length), pad, dtype=np.int64)
        self.count = np.zeros(n, dtype=np.int64)  # committed tokens per row
        self.calls = np.ones(n, dtype=np.int64)  # the first call, on BOS
        self.commits: list[np.ndarray] = []  # per loop call: [n] tokens committed, 0 for rows that had left

    def record(self, committed: np.ndarray) -> None:
        """The tokens the active rows committed in one call (and their new counts)."""
        per_row = np.zeros(self.ids.shape[0], dtype=np.int64)
        per_row[self.active] = committed
        self.commits.append(per_row)
        self.count[self.active] += committed

    def row_commits(self, i: int) -> list[int]:
        return [int(c[i]) for c in self.commits[: self.calls[i] - 1]]

    def keep(self, mask: np.ndarray) -> None:
        self.active = self.active[mask]


class CausalGenerator:
    """Generate from a format-2 file: ``l2r`` (one token per call) or ``verify`` (draft-and-verify)."""

    def __init__(self, model_path, provider: str = "cpu", threads: int | None = None, opened: tuple | None = None):
        self.model = load_causal_file(str(model_path), provider, threads, opened)
        self.provider = provider
        self.config = self.model.config
        self.model_config = self.model.typed
        self.tokenizer, self.special = self.model.tokenizer, self.model.special
        self._banned = sorted({self.special.mask, self.special.pad} |
                              ({self.tokenizer.unk_token_id} if getattr(self.tokenizer, "unk_token_id", None)
                               is not None else set()))

    @property
    def default_decoder(self) -> str:
        return "verify" if self.model_config.num_drafts > 0 else "l2r"

    def generate(self, n: int = 1, selector: str | None = None, **kwargs: Any) -> list[Sample]:
        return list(self.iter_generate(n, selector, **kwargs))

    def iter_generate(self, n: int = 1, selector: str | None = None, steps: int | None = None,
                      temperature: float | None = None, stop_threshold: float | None = None, seed: int | None = None,
                      prompt: str | None = None, batch_size: int | None = None, trajectory: bool = False,
                      timings: LoopTimings | None = None, decode: bool = True, drafts: int | None = None,
                      **options: Any) -> Iterator[Sample]:
        """The samples, batch by batch (as ``Generator.iter_generate``). ``selector``: ``verify`` or
        ``l2r`` (default: ``verify`` when the file has draft heads); ``drafts``: how many of the file's
        draft heads ``verify`` uses (default: all)."""
        n = _positive_int("n", n)
        decoder = self.default_decoder if selector is None else selector
        if decoder not in DECODERS:
            raise SelectorError(f"a causal model file decodes with {' or '.join(DECODERS)}, not {decoder!r} "
                                "(selector plugins apply to refinement model files)")
        if decoder == "verify" and self.model_config.num_drafts == 0:
            raise SelectorError(f"{self.model.path} has no draft heads: decode it with l2r")
        for name, value in (("steps", steps), ("stop_threshold", stop_threshold), ("prompt", prompt),
                            ("trajectory", trajectory or None), *options.items()):
            if value is not None:
                raise ImadaremError(f"{name} does not apply to a causal model file")
        heads = self.model_config.num_drafts if drafts is None else drafts
        if decoder == "verify" and not 1 <= _positive_int("drafts", heads) <= self.model_config.num_drafts:
            raise ImadaremError(f"drafts must be 1..{self.model_config.num_drafts}, got {drafts!r}")
        temp = self.model_config.sampling_temperature if temperature is None else _number("temperature", temperature)
        if not temp >= 0:
            raise ImadaremError(f"temperature must be >= 0, got {temperature!r}")
        batch = DEFAULT_BATCH_SIZE if batch_size is None else _positive_int("batch_size", batch_size)
        root = np.random.SeedSequence(_check_seed(seed))
        return self._batches(n, batch, root, temp, heads if decoder == "verify" else 0, timings, decode)

    def _batches(self, n, batch, root, temp, D, timings, decode) -> Iterator[Sample]:
        for first in range(0, n, batch):
            started = time.perf_counter()
            size = min(batch, n - first)
            samples = self._decode(size, SampleStreams(root, first, size), temp, D, timings, decode)
            if timings is not None:
                timings.total_seconds += time.perf_counter() - started
            yield from samples

    # -- sampling ------------------------------------------------------------------------------------
    def _probs(self, logits: np.ndarray, temp: float) -> np.ndarray:
        """softmax(logits / T) with PAD, MASK and UNK banned; one-hot argmax at T = 0."""
        z = logits.astype(np.float64)
        z[..., self._banned] = -np.inf
        if temp <= rules.GREEDY_TEMPERATURE:
            out = np.zeros_like(z)
            np.put_along_axis(out, z.argmax(-1)[..., None], 1.0, -1)
            return out
        z = z / temp
        z -= z.max(-1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(-1, keepdims=True)
        return z

    @staticmethod
    def _draw(probs: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        """One token per row of ``probs`` (Gumbel-max on log probs; zero-probability tokens never)."""
        with np.errstate(divide="ignore"):
            return (np.log(probs) + rules.gumbel(uniform.astype(np.float64))).argmax(-1)

    # -- the decoding loop ------------------------------------------------------------------------------
    def _decode(self, n: int, streams: SampleStreams, temp: float, D: int, timings, decode: bool) -> list[Sample]:
        cfg, sp, V = self.model_config, self.special, self.model_config.vocab_size
        L, eos = cfg.max_seq_len, sp.eos
        rows = _Rows(n, L, sp.pad)
        past, valid = self.model.empty_cache(n)
        started = time.perf_counter()
        logits, drafts, past = self.model.run(np.full((n, 1), sp.mask, np.int64), np.zeros((n, 1), np.int64), past, valid)
        self._time(timings, started, time.perf_counter() - started, n, 1)
        valid = np.concatenate([valid, np.ones((n, 1), bool)], 1)
        u = streams.uniforms(rows.active, ((1 + D) * V + D,))
        pend = self._draw(self._probs(logits[:, 0], temp), u[:, :V])
        q = self._probs(drafts[:, 0, :D], temp)  # [b, D, V]
        d = self._draw(q, u[:, V: (1 + D) * V].reshape(n, D, V)) if D else np.zeros((n, 0), np.int64)
        while rows.active.size:
            b = rows.active.size
            count = rows.count[rows.active]
            tokens = np.concatenate([pend[:, None], d], 1)
            positions = np.minimum(count[:, None] + 1 + np.arange(1 + D)[None], L)
            step_started = time.perf_counter()
            logits, drafts_out, present = self.model.run(tokens, positions, past, valid)
            run_seconds = time.perf_counter() - step_started
            rows.calls[rows.active] += 1
            u = streams.uniforms(rows.active, ((1 + D) * V + D,))
            u_next, u_drafts, u_accept = u[:, :V], u[:, V: (1 + D) * V].reshape(b, D, V), u[:, (1 + D) * V:]
            # verify the drafts left to right: draft m is token count + 1 + m, its exact conditional is the
            # main head after new token m
            accepted = np.zeros(b, np.int64)
            alive = (pend != eos) & (count + 1 < L)
            rejected = np.zeros(b, bool)
            residual = np.zeros((b, V))
            for m in range(D):
                p = self._probs(logits[:, m], temp)
                ok = alive & (count + 1 + m < L)
                pd, qd = p[np.arange(b), d[:, m]], q[np.arange(b), m, d[:, m]]
                keep = u_accept[:, m] * qd < pd  # u < p/q without dividing by a zero q
                reject = ok & ~keep
                if reject.any():
                    r = np.clip(p[reject] - q[reject, m], 0.0, None)
                    total = r.sum(-1, keepdims=True)
                    residual[reject] = np.where(total > 0, r / np.where(total > 0, total, 1), p[reject])
                rejected |= reject
                accepted += ok & keep
                alive = ok & keep & (d[:, m] != eos)
            # commit the exact token and the accepted drafts
            committed = 1 + accepted
            new_valid = np.arange(1 + D)[None] < committed[:, None]
            at = np.nonzero(new_valid)
            rows.ids[rows.active[at[0]], count[at[0]] + at[1]] = tokens[at]
            rows.record(committed)
            valid = np.concatenate([valid, new_valid], 1)
            past = present
            # the next exact token: after a rejection the residual sample, else the main head after the
            # last committed token; the next drafts from the draft heads there
            last = committed - 1
            nxt = self._probs(logits[np.arange(b), last], temp)
            nxt[rejected] = residual[rejected]
            pend = self._draw(nxt, u_next)
            if D:
                q = self._probs(drafts_out[np.arange(b), last][:, :D], temp)
                d = self._draw(q, u_drafts)
            has_eos = (tokens == eos) & new_valid
            done = has_eos.any(1) | (rows.count[rows.active] >= L)
            if done.any():
                keep = ~done
                rows.keep(keep)
                past, valid = past[:, :, keep], valid[keep]
                pend, d = pend[keep], d[keep]
                if D:
                    q = q[keep]
            self._time(timings, step_started, run_seconds, b, 1 + D)
        return [self._finish(rows, i, decode) for i in range(n)]

    def _finish(self, rows: _Rows, i: int, decode: bool) -> Sample:
        ids = rows.ids[i].tolist()
        eos = self.special.eos
        ids = ids[: ids.index(eos) + 1] if eos is not None and eos in ids else ids[: int(rows.count[i])]
        text = self.tokenizer.decode(ids) if decode else None
        return Sample(text, ids, int(rows.calls[i]), rows.row_commits(i), False)

    @staticmethod
    def _time(timings: LoopTimings | None, started: float, run_seconds: float, rows: int, new: int) -> None:
        """One call's entry: its wall time from ``started`` (sampling and verification included), the
        seconds inside onnxruntime, the rows it ran and the tokens fed per row."""
        if timings is None:
            return
        timings.step_seconds.append(time.perf_counter() - started)
        timings.run_seconds.append(run_seconds)
        timings.active_rows.append(rows)
        timings.run_lengths.append(new)


def is_causal(meta: dict[str, str]) -> bool:
    from imadarem.runtime.modelfile import KEY_FORMAT

    return meta.get(KEY_FORMAT) == CAUSAL_FORMAT


__all__ = ["CausalConfig", "CausalGenerator", "CausalModelFile", "DECODERS", "is_causal", "load_causal_file"]

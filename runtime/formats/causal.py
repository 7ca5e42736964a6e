"""Format 2, the causal step: a left-to-right model with draft heads, one call with a KV cache.

**Contract** (``imadarem.format`` "2", config ``"kind": "causal"``: :class:`CausalConfig`). Inputs
``tokens`` and ``positions`` int64 [batch, new], ``past`` float32 [layers, 2, batch, heads, cached,
head_dim] (the KV cache) and ``past_valid`` bool [batch, cached] (which cache entries count); outputs
``logits`` [batch, new, vocab] (the next token after each new token), ``drafts`` [batch, new, D, vocab]
(draft head k: the token k + 2 places ahead) and ``present`` [layers, 2, batch, heads, cached + new,
head_dim] (the cache with the new tokens appended). BOS is ``mask_id`` at position 0; sequence position j
is model position j + 1. Files keep cached >= 1: decoding starts from one entry that counts for nothing.

**Decoding.** Sample i has its own sampling noise, a pure function of (its key, position, token)
(``rules.counter_gumbel``), and every token is drawn as the *exact* token of its position: argmax((logits
+ bans) + T g). So every way of decoding gives the left-to-right decoder's molecule, token for token:

- **draft-and-verify** (default; ``drafts`` = how many draft heads a call may use, default all): the
  refinement loop with any selector (``runtime/refinement.py``). Every token a selector places is a draft;
  each call (:class:`DraftVerifyStep`) feeds the newest exact token and the drafts after it (at most
  ``drafts``; those placed further on go back to mask unverified), keeps a draft iff it *is* the exact
  token of its position, commits the exact token of the first position not kept, freezes the verified
  prefix, and presents to the selector the draft heads' predictions for the next ``drafts`` positions
  (``gate`` 1 there, so the gate selector drafts exactly the window; EOS never drafted). The selector sets
  only the number of calls.
- **one token per call** (``drafts=0``, or a file without draft heads): :class:`AncestralDecoding`, the
  plain left-to-right decoder with nothing else in its loop (the baseline ``imadarem bench`` times). A
  template with literals after a blank, a step budget or a trajectory take the loop with no drafts
  instead, which gives the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.bans import run_bias
from imadarem.runtime.errors import ImadaremError, ModelFileError, PromptError
from imadarem.runtime.formats.base import Format, ModelFile
from imadarem.runtime.limits import MAX_SEQ_LEN, MAX_VOCAB
from imadarem.runtime.metadata import KEY_FORMAT, check_metadata, checked_fields, config_of
from imadarem.runtime.prompt import Layout, prompt_layout
from imadarem.runtime.randomness import SampleStreams
from imadarem.runtime.refinement import (
    PRESENTED_OUTPUTS,
    LoopSettings,
    ModelStep,
    RefinementPlan,
    Shown,
    make_selector,
)
from imadarem.runtime.request import Request
from imadarem.runtime.results import BatchResult, CallReport
from imadarem.runtime.session import run_failure
from imadarem.runtime.strategy import Decoding, Plan

FORMAT = "2"
KIND = "causal"
INPUTS = ("tokens", "positions", "past", "past_valid")
OUTPUTS = ("logits", "drafts", "present")
#: the largest sizes a config may ask for (a file claiming more is refused before anything is allocated)


@dataclass(frozen=True)
class CausalConfig:
    """A causal model's shape: the one definition, which training builds models from and files carry."""

    vocab_size: int = field(metadata={"max": MAX_VOCAB})
    max_seq_len: int = field(default=56, metadata={"max": MAX_SEQ_LEN})  # tokens after BOS
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_drafts: int = field(default=0, metadata={"min": 0, "max": 64})
    sampling_temperature: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, config: dict[str, Any], path: str = "model") -> CausalConfig:
        """Check kind, types and ranges (one-line ModelFileError naming the field)."""
        if config.get("kind") != KIND:
            raise ModelFileError(f"{path}: a format {FORMAT} model config must say \"kind\": \"{KIND}\"")
        values = checked_fields(cls, config, path)
        if values["hidden_size"] % values["num_heads"]:
            raise ModelFileError(f"{path}: model config hidden_size {values['hidden_size']} is not a multiple of "
                                 f"num_heads {values['num_heads']}")
        return cls(**values)


def matches(meta: dict[str, str]) -> bool:
    return meta.get(KEY_FORMAT) == FORMAT and (config_of(meta) or {}).get("graph") is None


class CausalFile(ModelFile):
    """A checked causal step file."""

    format_name = "causal"
    outputs = list(PRESENTED_OUTPUTS)  # what selectors see

    def run(self, tokens: np.ndarray, positions: np.ndarray, past: np.ndarray, valid: np.ndarray):
        return self.session.run(list(OUTPUTS), {"tokens": tokens, "positions": positions, "past": past,
                                                "past_valid": valid})

    def empty_cache(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.typed
        return (np.zeros((c.num_layers, 2, batch, c.num_heads, 1, c.head_dim), np.float32),
                np.zeros((batch, 1), bool))

    def plan(self, request: Request) -> Plan:
        cfg = self.typed
        drafts = self.chosen_drafts(request)
        drafts = cfg.num_drafts if drafts is None else drafts
        if drafts > cfg.num_drafts:
            raise ImadaremError(f"drafts {drafts}: {self.name} has {cfg.num_drafts} draft heads")
        layout = prompt_layout(request, self.tokenizer, self.special, cfg.max_seq_len)
        if not _prefix_only(layout):
            raise PromptError(f"{self.name} is a left-to-right model: a blank before fixed symbols would not see "
                              "them; keep blanks at the end of the prompt (a prefix), or use a refinement model")
        temperature = cfg.sampling_temperature if request.temperature is None else request.temperature
        bias = run_bias(layout, self.tokenizer, self.special, cfg.vocab_size)
        if drafts == 0 and request.steps is None and not request.trajectory and _prefix_only(layout):
            if request.selector is not None:  # checked as any request's, though it has nothing to place
                make_selector(request.selector, request.selector_options, self.outputs, self.path)
            return AncestralPlan(self, layout, bias, temperature)
        settings = LoopSettings(
            # each call commits at least one exact token, so max_seq_len + 1 calls verify every row; no early
            # stop on a quiet step (a row ends when it is all verified)
            num_steps=cfg.max_seq_len + 1 if request.steps is None else request.steps,
            temperature=temperature, stop_threshold=0.0 if request.stop_threshold is None else request.stop_threshold,
            layout=layout, trajectory=request.trajectory, config=dict(self.config))

        def new_step(size: int, streams: SampleStreams) -> ModelStep:
            return DraftVerifyStep(self, size, layout, temperature, bias, streams.keys(), drafts)
        selector, options = self.chosen_selector(request, "gate")
        return RefinementPlan(settings, selector, options, self.outputs, self.path, self.special, new_step)


def _prefix_only(layout: Layout) -> bool:
    """Fixed positions form a prefix (a blank layout, a plain prefix or a prefix template)."""
    k = int(np.argmin(layout.fixed)) if not layout.fixed.all() else layout.length
    return not layout.fixed[k:].any()


# -- one token per call --------------------------------------------------------------------------------
class AncestralPlan(Plan):
    def __init__(self, model: CausalFile, layout: Layout, bias: np.ndarray, temperature: float):
        self.model, self.layout, self.bias, self.temperature = model, layout, bias, temperature

    def start(self, size: int, streams: SampleStreams) -> Decoding:
        return AncestralDecoding(self.model, size, self.layout, self.bias, self.temperature, streams.keys())


class AncestralDecoding(Decoding):
    """Plain left-to-right decoding: the first call feeds BOS and the layout's prefix, every later call the
    token sampled last; each samples the exact token of the next position."""

    def __init__(self, model: CausalFile, n: int, layout: Layout, bias: np.ndarray, temperature: float,
                 keys: np.ndarray):
        sp = model.special
        self.model, self.bias, self.temperature, self.eos = model, bias, temperature, sp.eos
        self.length = layout.length
        k = int(layout.fixed.sum())  # the prefix
        self.ids = np.full((n, self.length), sp.pad, dtype=np.int64)
        self.ids[:, :k] = layout.ids[:k]
        self.calls = np.zeros(n, dtype=np.int64)
        self.rows = np.arange(n)
        self.noise = rules.position_noise(keys, self.length, model.vocab_size)
        self.past, self.valid = model.empty_cache(n)
        self.tokens = np.broadcast_to(np.concatenate([[sp.mask], layout.ids[:k]]), (n, k + 1)).astype(np.int64)
        self.positions = np.broadcast_to(np.arange(k + 1, dtype=np.int64), (n, k + 1)).copy()
        self.j = k  # the position sampled next

    @property
    def active(self) -> int:
        return int(self.rows.size)

    def step(self) -> CallReport:
        j, rows = self.j, self.rows.size
        started = time.perf_counter()
        logits, _, self.past = self.model.run(self.tokens, self.positions, self.past, self.valid)
        seconds = time.perf_counter() - started
        width = self.tokens.shape[1]
        self.valid = np.concatenate([self.valid, np.ones((rows, width), bool)], 1)
        token = rules.coupled_sample(logits[:, -1] + self.bias[j], self.temperature, self.noise[:, j])
        self.ids[self.rows, j] = token
        self.calls[self.rows] += 1
        done = token == self.eos if self.eos is not None else np.zeros(rows, bool)
        if j + 1 >= self.length:
            done[:] = True
        keep = ~done
        self.rows, self.noise = self.rows[keep], self.noise[keep]
        self.past, self.valid = self.past[:, :, keep], self.valid[keep]
        self.tokens = token[keep][:, None]
        self.positions = np.full((self.rows.size, 1), j + 1, np.int64)
        self.j = j + 1
        return CallReport(rows, seconds, width)

    def result(self) -> BatchResult:
        return BatchResult(self.ids, self.calls, [[1] * int(c) for c in self.calls])


# -- draft-and-verify inside the refinement loop ---------------------------------------------------------
class DraftVerifyStep(ModelStep):
    """The per-batch state of a causal file in the loop: the KV cache and which entries count, how many
    sequence positions each row has verified in it, and each row's sampling noise; one call feeds, samples,
    verifies, commits and presents (the module docstring). Rows leave with ``keep`` as the loop compacts."""

    def __init__(self, model: CausalFile, n: int, layout: Layout, temperature: float, bias: np.ndarray,
                 keys: np.ndarray, drafts: int):
        self.model, self.temperature, self.bias, self.window = model, temperature, bias, drafts
        self.past, self.valid = model.empty_cache(n)
        self.cached = np.zeros(n, dtype=np.int64)  # sequence positions whose keys and values count
        self.started = np.zeros(n, dtype=bool)  # BOS fed
        self.noise = rules.position_noise(keys, layout.length, model.vocab_size)
        self.eos_only = layout.eos_only
        self._base: np.ndarray | None = None
        self._tempered_noise: np.ndarray | None = None
        self._tempered_at: float | None = None

    def keep(self, rows: np.ndarray) -> None:
        if rows.all():
            return
        self.past, self.valid = self.past[:, :, rows], self.valid[rows]
        self.cached, self.started, self.noise = self.cached[rows], self.started[rows], self.noise[rows]
        if self._tempered_noise is not None:
            self._tempered_noise = self._tempered_noise[rows]

    def run(self, x, fz, t, num_steps, step_temperature, rows) -> Shown:
        """Feed, sample, verify and resolve for the active rows; present the next window with the
        ``proposals`` drawn at ``step_temperature`` (a selector may anneal it). Every exact token is drawn
        at the run's temperature."""
        sp = self.model.special
        b, L = x.shape
        V, D = self.model.vocab_size, self.window
        idx = np.arange(b)
        feed, n_feed, first_pos, end = self._feed(x, fz, sp)
        width = feed[0].shape[1]
        started = time.perf_counter()
        logits, drafts, present = self.model.run(*feed, self.past, self.valid)
        seconds = time.perf_counter() - started

        # the exact token of the position after each fed token
        after = np.clip(first_pos[:, None] + 1 + np.arange(width)[None, :], 0, L - 1)  # [b, width]
        noise = np.take_along_axis(self.noise, after[:, :, None], 1)
        exact = rules.coupled_sample(logits + self.bias[after], self.temperature, noise)  # [b, width]

        # verify: fed token k (k >= 1) sits at position first_pos + k; frozen ones (prompt literals) are
        # verified for free, drafts iff they are the exact token there
        k = np.arange(1, width)[None, :]
        at = np.clip(first_pos[:, None] + k, 0, L - 1)
        in_run = k < n_feed[:, None]
        kept = fz[idx[:, None], at] | (x[idx[:, None], at] == exact[:, :-1])
        failed = in_run & ~kept
        rejected = failed.any(1)
        first_failure = failed.argmax(1) if width > 1 else np.zeros(b, dtype=np.int64)
        r = np.where(rejected, first_pos + 1 + first_failure, end)  # the first position not verified
        complete = r >= L
        if sp.eos is not None:  # the run ended just after a (frozen) EOS
            complete |= ~rejected & (end > 0) & (x[idx, np.clip(end - 1, 0, L - 1)] == sp.eos)
        go = ~complete
        k_r = np.clip(r - 1 - first_pos, 0, width - 1)  # the fed token just before r

        # commit the exact token at r, freeze the verified prefix and it; mask what follows
        new_x, new_frozen = x.copy(), fz.copy()
        new_x[idx[go], r[go]] = exact[idx[go], k_r[go]]
        pos = np.arange(L)[None, :]
        new_frozen |= (pos <= r[:, None]) | complete[:, None]
        new_x[~new_frozen] = sp.mask
        # the cache: entries of fed tokens before r count
        fed_pos = first_pos[:, None] + np.arange(width)[None, :]
        counts = (np.arange(width)[None, :] < n_feed[:, None]) & (fed_pos < r[:, None])
        self.past, self.valid = present, np.concatenate([self.valid, counts], 1)
        self.cached = np.where(go, r, self.cached)
        self.started[:] = True
        self._compact_cache()

        # present: the draft heads after the resolved token, uniform beyond, EOS only where forced
        shown = np.broadcast_to(self._presented_bias(sp.eos), (b, L, V)).copy()
        gate = np.zeros((b, L), dtype=np.float32)
        for m in range(D):
            at = r + 1 + m
            ok = go & (at < L)
            if ok.any():
                sel = idx[ok]
                shown[sel, at[sel]] += drafts[sel, k_r[sel], m]
                gate[sel, at[sel]] = 1.0
        gate[new_frozen] = 0.0
        proposals = rules.coupled_argmax(shown, self._tempered(step_temperature))
        shown.flags.writeable = False
        return Shown(new_x, new_frozen, proposals, shown, gate, (~new_frozen).astype(np.float32), None, seconds,
                     width, committed=True)

    def _presented_bias(self, eos: int | None) -> np.ndarray:
        """[L, V]: the run's bans plus EOS banned from what is presented, except in a template's EOS-only
        slot (built once per batch: the run's bans do not change between steps)."""
        if self._base is None:
            self._base = self.bias.copy()
            if eos is not None:
                self._base[~self.eos_only, eos] = -np.inf
        return self._base

    def _tempered(self, temperature: float) -> np.ndarray:
        """T g over every row, position and token, computed once per step temperature and compacted with
        the rows."""
        if self._tempered_at != temperature:
            self._tempered_noise, self._tempered_at = rules.tempered_noise(self.noise, temperature), temperature
        return self._tempered_noise

    def _feed(self, x: np.ndarray, frozen: np.ndarray, sp):
        """The call's inputs: per row BOS (first call only), then the tokens from the first uncached
        position up to the first mask, just after an EOS, or before the draft beyond the first ``window``
        (a call verifies at most that many drafts, so a selector that fills every mask costs what the gate
        does; the drafts beyond go back to mask). Also how many each row feeds, the sequence position of
        fed index 0 (-1 for BOS) and where the run ends."""
        b, L = x.shape
        pos = np.arange(L)[None, :]
        after = pos >= self.cached[:, None]
        stop = after & (x == sp.mask)
        drafts = after & ~frozen & (x != sp.mask)
        stop |= drafts & (np.cumsum(drafts, 1) > self.window)
        if sp.eos is not None:
            stop |= (pos > self.cached[:, None]) & (np.roll(x, 1, axis=1) == sp.eos)
        end = np.where(stop.any(1), stop.argmax(1), L)
        bos = (~self.started).astype(np.int64)
        n_feed = end - self.cached + bos
        first_pos = self.cached - bos
        M = int(n_feed.max())
        seq = first_pos[:, None] + np.arange(M)[None, :]
        tokens = np.take_along_axis(x, np.clip(seq, 0, L - 1), 1)
        tokens = np.where(seq < 0, sp.mask, tokens)  # BOS is the mask id
        tokens = np.where(np.arange(M)[None, :] < n_feed[:, None], tokens, sp.pad)
        positions = np.clip(seq + 1, 0, L)
        return (tokens.astype(np.int64), positions.astype(np.int64)), n_feed, first_pos, end

    def _compact_cache(self) -> None:
        """Drop cache entries that count for no row once they are most of the cache (rejected drafts and
        padding pile up), keeping at least one entry; positions are inputs, so order does not matter."""
        width = self.valid.shape[1]
        need = int(self.valid.sum(1).max())
        if width <= 2 * max(need, 1) + 8:
            return
        keep = max(need, 1)
        order = np.argsort(~self.valid, axis=1, kind="stable")[:, :keep]  # valid entries first, in order
        self.valid = np.take_along_axis(self.valid, order, 1)
        layers, two, b, heads, _, head_dim = self.past.shape
        idx = np.broadcast_to(order[None, None, :, None, :, None], (layers, two, b, heads, keep, head_dim))
        self.past = np.take_along_axis(self.past, idx, 4)


# -- opening a file ----------------------------------------------------------------------------------
def open_file(path: str, session, meta: dict[str, str], provider: str = "cpu", threads: int | None = None) -> CausalFile:
    """Check the metadata, the graph's inputs and outputs, and run one probe call."""
    common = check_metadata(meta, path, FORMAT, CausalConfig.from_dict)
    names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    for want, have, kind in ((INPUTS, names[0], "input"), (OUTPUTS, names[1], "output")):
        missing = [n for n in want if n not in have]
        if missing:
            raise ModelFileError(f"{path}: a causal graph needs the {kind}s {', '.join(want)} (missing "
                                 f"{', '.join(missing)})")
    model = CausalFile(path, session, meta, common, provider, threads)
    probe(model)
    return model


def probe(model: CausalFile) -> None:
    """BOS and then ``max_seq_len`` tokens in one call through the cache: a graph whose position table is
    shorter than the config's max_seq_len, or whose heads contradict it, fails here, not mid-run."""
    typed, sp = model.typed, model.special
    past, valid = model.empty_cache(1)
    T = typed.max_seq_len + 1
    tokens = np.full((1, T), sp.mask, np.int64)
    try:
        logits, drafts, present = model.run(tokens, np.arange(T, dtype=np.int64)[None], past, valid)
    except Exception as exc:
        raise run_failure(model.path, f"the causal graph does not run with its config (max_seq_len "
                          f"{typed.max_seq_len})", exc) from None
    want = {"logits": (1, T, typed.vocab_size), "drafts": (1, T, typed.num_drafts, typed.vocab_size),
            "present": (typed.num_layers, 2, 1, typed.num_heads, T + 1, typed.head_dim)}
    for name, value in zip(OUTPUTS, (logits, drafts, present)):
        if value.shape != want[name]:
            raise ModelFileError(f"{model.path}: the probe call gave {name} of shape {list(value.shape)}; the "
                                 f"config says {list(want[name])}")


SPEC = Format("causal", matches, open_file,
              "a left-to-right step with a KV cache and draft heads, decoded by draft-and-verify (format 2)")

"""Prompts: fixed tokens the loop must keep, and masks it must fill.

Two forms:
- a template with mask markers, e.g. ``CC(=O)<mask:12>`` or ``The <mask:5> sat``: the literal parts
  are encoded with the model's tokenizer (``encode_fragment``: a piece followed by blanks is a fragment
  to continue, not a whole text) and frozen, ``<mask:N>`` (or ``<mask>`` = 1) are blanks. Blanks
  after the last literal may end early with EOS; blanks between literals are filled exactly (no EOS).
- a plain prefix (no markers): the prefix is frozen and the rest, up to max_seq_len, is generated.

Anything that looks like a marker but is not one (``<mask:-1>``, ``<mask:x>``) is refused, never read as text.

Other prompt syntaxes come from plugins (``prompt_reader.PromptReader``, hook ``imadarem_prompt_readers``): e.g. SMILES
fragments with attachment points (``imadarem.chem``, the ``chem`` extra), which give each sample its own
layout and check the finished molecule against the prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from imadarem.runtime.errors import ImadaremError, PluginError, PromptError
from imadarem.runtime.tokenizer import SpecialIds, TokenizerAdapter

MASK_MARKER = re.compile(r"<mask(?::(\d+))?>")
MARKER_LIKE = re.compile(r"<\s*mask[^>]*>?", re.IGNORECASE)


@dataclass(frozen=True)
class Layout:
    """The starting sequence: ``ids`` (mask where blank), which positions are fixed, where EOS may go,
    and where only EOS may go (a template's closing slot)."""

    ids: np.ndarray  # [L] int64
    fixed: np.ndarray  # [L] bool
    eos_allowed: np.ndarray  # [L] bool
    eos_only: np.ndarray  # [L] bool
    #: ((position, ids), ...): blanks that may hold only these ids (no EOS), e.g. a fragment's chain atoms
    allowed: tuple[tuple[int, tuple[int, ...]], ...] = ()

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


def with_allowed(layout: Layout, allowed: dict[int, tuple[int, ...]]) -> Layout:
    """``layout`` with blanks restricted to the given ids (a fixed position cannot be restricted)."""
    for pos in allowed:
        if not 0 <= pos < layout.length or layout.fixed[pos]:
            raise PromptError(f"position {pos} of the prompt is not a blank and cannot be restricted")
    return Layout(layout.ids, layout.fixed, layout.eos_allowed, layout.eos_only,
                  tuple(sorted((int(p), tuple(sorted(map(int, ids)))) for p, ids in allowed.items())))


def layout_key(layout: Layout) -> tuple:
    """A hashable identity of a layout (samples with equal layouts share batches)."""
    return (layout.ids.tobytes(), layout.fixed.tobytes(), layout.eos_allowed.tobytes(), layout.eos_only.tobytes(),
            layout.allowed)


def prompt_layout(request: Any, tokenizer: TokenizerAdapter, special: SpecialIds, max_len: int) -> Layout:
    """A request's layout: the one a prompt reader drew for its samples, its template or prefix, or blanks."""
    if getattr(request, "layout", None) is not None:
        return request.layout
    if request.prompt is None:
        return blank_layout(max_len, special)
    return parse_prompt(request.prompt, tokenizer, special, max_len)


def blank_layout(length: int, special: SpecialIds) -> Layout:
    return Layout(np.full(length, special.mask, dtype=np.int64), np.zeros(length, bool), np.ones(length, bool),
                  np.zeros(length, bool))


def parse_prompt(prompt: str, tokenizer: TokenizerAdapter, special: SpecialIds, max_len: int) -> Layout:
    if not isinstance(prompt, str) or not prompt:
        raise PromptError("prompt must be a non-empty string")
    for match in MARKER_LIKE.finditer(MASK_MARKER.sub("", prompt)):
        raise PromptError(f"prompt marker {match.group(0)!r} is not <mask> or <mask:N> with N >= 1")
    if not MASK_MARKER.search(prompt):
        ids = _encode(tokenizer, prompt, first=True, open_end=True)
        if len(ids) >= max_len:
            raise PromptError(f"prompt has {len(ids)} tokens; the model allows at most {max_len - 1} "
                              f"before the end token (max_seq_len {max_len})")
        layout = blank_layout(max_len, special)
        layout.ids[: len(ids)] = ids
        layout.fixed[: len(ids)] = True
        return layout

    pieces: list[tuple[str, object, bool]] = []  # (kind, text or count, whether a mask marker gave its count)
    pos = 0
    for match in MASK_MARKER.finditer(prompt):
        if match.start() > pos:
            pieces.append(("text", prompt[pos : match.start()], False))
        count = int(match.group(1)) if match.group(1) is not None else 1
        if count < 1:
            raise PromptError(f"prompt marker {match.group(0)!r} asks for no blanks")
        if count > max_len:
            raise PromptError(f"prompt marker {match.group(0)!r} asks for more blanks than the model allows "
                              f"(at most {max_len} positions)")
        pieces.append(("mask", count, match.group(1) is not None))
        pos = match.end()
    if pos < len(prompt):
        pieces.append(("text", prompt[pos:], False))

    ids: list[int] = []
    fixed: list[bool] = []
    counted: list[int] = []  # positions of <mask:N> blanks (a counted run of new tokens, not one in place)
    for i, (kind, value, counted_marker) in enumerate(pieces):  # each marker holds <= max_len blanks (checked above)
        if kind == "text":
            enc = _encode(tokenizer, value, first=i == 0, open_end=i + 1 < len(pieces))  # type: ignore[arg-type]
            ids += enc
            fixed += [True] * len(enc)
        else:
            if counted_marker:
                counted += range(len(ids), len(ids) + int(value))  # type: ignore[arg-type]
            ids += [special.mask] * int(value)  # type: ignore[arg-type]
            fixed += [False] * int(value)  # type: ignore[arg-type]
    total = len(ids) + (1 if special.eos is not None else 0)
    if total > max_len:
        raise PromptError(f"prompt template needs {total} positions (end token included); "
                          f"the model allows at most {max_len}")
    last_fixed = max((i for i, f in enumerate(fixed) if f), default=-1)
    eos_allowed = [i > last_fixed for i in range(len(ids))]
    eos_only = [False] * len(ids)
    if special.eos is not None:
        # a closing slot that can only hold EOS, so the template ends where it says (or earlier, in
        # trailing blanks); it is not frozen, so an earlier EOS may still turn it into padding
        ids.append(special.mask)
        fixed.append(False)
        eos_allowed.append(True)
        eos_only.append(True)
    layout = Layout(np.array(ids, dtype=np.int64), np.array(fixed, bool), np.array(eos_allowed, bool),
                    np.array(eos_only, bool))
    # a <mask:N> before the last fixed piece inserts N tokens there: they may only be what leaves the fixed
    # tokens after them their meaning (SELFIES: atoms that carry the chain on). A bare <mask> stands for one
    # token in place (re-predicting a symbol of a known string) and may be anything.
    between = tokenizer.between_fixed_ids()
    middle = [i for i in counted if i < last_fixed]
    if between is not None and middle:
        layout = with_allowed(layout, {i: between for i in middle})
    return layout


def _encode(tokenizer: TokenizerAdapter, text: str, *, first: bool, open_end: bool) -> list[int]:
    try:
        return list(tokenizer.encode_fragment(text, first=first, open_end=open_end))
    except ImadaremError as exc:
        raise PromptError(f"prompt: {exc}") from None
    except Exception as exc:  # the adapter itself broke: name it and its distribution
        from imadarem.runtime.registry import plugin_label

        raise PluginError(f"{plugin_label('tokenizer', tokenizer)} failed to encode the prompt {text!r}: "
                          f"{type(exc).__name__}: {exc}") from exc

"""The base class of prompt readers: prompt syntaxes that plugins add (hook ``imadarem_prompt_readers``).

A template or a prefix gives every sample the same layout (``prompt.parse_prompt``). A reader's syntax may
give each sample its own (a fragment written from another atom, a linker of another length), drawn with the
sample's own generator, so a sample still depends only on the seed and its index; the Generator runs the
samples that drew equal layouts together. Readers may import what the runtime may not (RDKit), inside their
methods and behind their extra.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
from imadarem.runtime.tokenizer import SpecialIds, TokenizerAdapter


class PromptReader(abc.ABC):
    """A prompt syntax of a plugin: one prompt gives each sample its own layout (drawn with the sample's own
    generator, so a sample depends only on the seed and its index), and a finished sample can be checked
    against the prompt. The first installed reader that ``accepts`` a prompt reads it; a prompt no reader
    accepts is a template or a prefix (``prompt.parse_prompt``)."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""

    @abc.abstractmethod
    def accepts(self, prompt: str, tokenizer: TokenizerAdapter) -> bool:
        """Cheap: whether this prompt is in this reader's syntax, for this tokenizer."""

    @abc.abstractmethod
    def layout(self, prompt: str, tokenizer: TokenizerAdapter, special: SpecialIds, max_len: int,
               rng: np.random.Generator) -> Any:
        """One sample's ``prompt.Layout`` (``prompt.parse_prompt`` of a template, ``prompt.with_allowed``); a bad prompt raises :class:`PromptError` (one line)."""

    def keeps(self, prompt: str, text: str) -> bool | None:
        """Whether a finished sample honours the prompt (None: this reader does not check)."""
        return None

"""The base class of sample drawers: pictures of generated samples that plugins add (hook
``imadarem_sample_drawers``), e.g. molecules in a grid with a prompt's fragments highlighted
(``imadarem-run --grid FILE``). A drawer may import what the runtime may not (RDKit), inside its methods and
behind its extra.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

from imadarem.runtime.tokenizer import TokenizerAdapter


class SampleDrawer(abc.ABC):
    """Draws finished samples into one picture file."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    #: file suffixes it writes, lower case with the dot
    suffixes: ClassVar[tuple[str, ...]] = (".svg", ".png")

    @abc.abstractmethod
    def accepts(self, tokenizer: TokenizerAdapter) -> bool:
        """Cheap: whether it can draw this tokenizer's texts."""

    @abc.abstractmethod
    def draw(self, texts: Sequence[str | None], path: str, prompt: str | None = None) -> None:
        """Write the picture of ``texts`` (in sample order) to ``path``; ``prompt`` as the samples were asked
        for (what a drawer may highlight). A problem is an ``ImadaremError`` (one line)."""

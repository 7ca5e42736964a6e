"""Character-level tokenizer: one token per Unicode character, vocabulary built from a corpus."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from imadarem.runtime.tokenizer import VocabularyTokenizer


class CharTokenizer(VocabularyTokenizer):
    """One token per character; the vocabulary is every character seen in the training corpus."""

    name = "char"
    summary = "one token per character, vocabulary built from the corpus"

    @classmethod
    def split_symbols(cls, text: str) -> Iterable[str]:
        return text

    def encode(self, text: str) -> list[int]:
        return self.symbols_to_ids(text, text)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.ids_to_symbols(ids))

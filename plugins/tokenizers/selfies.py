"""SELFIES tokenizer for molecules: one token per SELFIES symbol; decoding returns SMILES.

Every string of SELFIES symbols decodes to a valid molecule, which is why molecules are modelled as
SELFIES rather than SMILES.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import selfies as sf
from imadarem.runtime.errors import TokenizerError
from imadarem.runtime.tokenizer import VocabularyTokenizer

_SELFIES_RE = re.compile(r"^(\[[^\[\]]+\])+$")


def smiles_to_selfies(smiles: str) -> str:
    try:
        return sf.encoder(smiles, strict=True)
    except Exception as exc:
        raise TokenizerError(f"cannot convert SMILES {smiles!r} to SELFIES: {exc}") from None


class SelfiesTokenizer(VocabularyTokenizer):
    """SELFIES symbols; ``encode`` takes SELFIES or SMILES, ``decode`` returns SMILES."""

    name = "selfies"
    summary = "SELFIES symbols (alphabet from the data); decodes to SMILES"

    @classmethod
    def split_symbols(cls, text: str) -> Iterable[str]:
        return sf.split_selfies(text)

    @staticmethod
    def is_selfies(text: str) -> bool:
        return bool(_SELFIES_RE.match(text))

    def to_selfies(self, text: str) -> str:
        """``text`` as SELFIES: kept when it already is a string of known SELFIES symbols, else read as SMILES."""
        if self.is_selfies(text) and all(sym in self._ids for sym in sf.split_selfies(text)):
            return text
        return smiles_to_selfies(text)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        selfies_text = self.to_selfies(text)
        return self.symbols_to_ids(sf.split_selfies(selfies_text), text)

    def decode_selfies(self, ids: Sequence[int]) -> str:
        return "".join(self.ids_to_symbols(ids))

    def decode(self, ids: Sequence[int]) -> str:
        return sf.decoder(self.decode_selfies(ids)) or ""

"""SELFIES tokenizer for molecules: one token per SELFIES symbol; decoding returns SMILES.

Every string of SELFIES symbols decodes to a valid molecule, which is why molecules are modelled as
SELFIES rather than SMILES.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

import selfies as sf
from imadarem.runtime.errors import TokenizerError
from imadarem.runtime.tokenizer import VocabularyTokenizer
from selfies.grammar_rules import process_atom_symbol

_SELFIES_RE = re.compile(r"^(\[[^\[\]]+\])+$")
#: an atom no molecule in the data holds, bonded to a fragment's last atom to read the fragment as a prefix
_PLACEHOLDER = "[Xe]"
_BONDS = "-=#$:/\\"


def open_ends(smiles: str) -> str | None:
    """Why a SMILES fragment cannot be continued as a SELFIES prefix, or None.

    SELFIES writes a branch's length before its atoms, a ring bond where it closes, and a bond inside the
    next atom's symbol; so a prefix must end outside branches, with its rings closed and on an atom.
    """
    depth, rings, i = 0, set(), 0
    while i < len(smiles):
        ch = smiles[i]
        if ch == "[":
            i = smiles.find("]", i)
            if i < 0:
                return "it has an unclosed bracket atom"
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch.isdigit() or ch == "%":
            label = smiles[i : i + 3] if ch == "%" else ch
            rings ^= {label}
            i += len(label) - 1
        i += 1
    if depth > 0:
        return ("it leaves a branch open (SELFIES writes a branch's length before its atoms: close it, "
                "e.g. 'CC(C)', and let the blanks continue the main chain)")
    if rings:
        return (f"it leaves ring bond {', '.join(sorted(r.lstrip('%') for r in rings))} open (SELFIES writes a ring "
                "bond where it closes: close the ring in the prompt, or leave ring closures to the model)")
    if smiles.rstrip()[-1:] and smiles.rstrip()[-1] in _BONDS + "(.":
        return "it ends with a bond or a branch opening; end the fragment on an atom"
    return None


def smiles_to_selfies(smiles: str) -> str:
    try:
        return sf.encoder(smiles, strict=True)
    except Exception as exc:
        raise TokenizerError(f"cannot convert SMILES {smiles!r} to SELFIES: {exc}") from None


_BRANCH_OR_RING = re.compile(r"\[.*(Branch|Ring)[123]\]")


@lru_cache(maxsize=4096)
def atom_bond(symbol: str) -> tuple[tuple, bool] | None:
    """(the bond it is written with, whether a free bond is left after it whatever came before) for a SELFIES
    atom symbol; None for anything else. SELFIES lowers a bond to what the atoms can take, so an atom whose
    valence exceeds its own bond's order always keeps one free."""
    if _BRANCH_OR_RING.fullmatch(symbol):
        return None
    try:
        parsed = process_atom_symbol(symbol)
    except Exception:  # noqa: BLE001 - not an atom symbol (e.g. [nop], a special token)
        return None
    if parsed is None:
        return None
    bond, atom = parsed
    return bond, atom.bonding_capacity > bond[0]


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

    def encode_fragment(self, text: str, *, first: bool, open_end: bool) -> list[int]:
        """A prompt piece: SELFIES symbols as they are; SMILES that starts the prompt and is followed by
        blanks as the SELFIES *prefix* of every molecule that continues it (``CC(=O)`` becomes
        ``[C][C][=Branch1][C][=O]``, not acetaldehyde's ``[C][C][=O]``, after which SELFIES derives no
        more atoms), or a one-line reason why it cannot be one."""
        if not text or (self.is_selfies(text) and all(sym in self._ids for sym in sf.split_selfies(text))):
            return self.encode(text)
        if not first:
            raise TokenizerError(f"SMILES {text!r} can only start a prompt (a SELFIES symbol's meaning depends "
                                 "on all before it); write later pieces as SELFIES symbols")
        if not open_end:
            return self.encode(text)
        reason = open_ends(text)
        if reason is not None:
            raise TokenizerError(f"the SMILES fragment {text!r} cannot start a molecule: {reason}")
        try:
            symbols = list(sf.split_selfies(sf.encoder(text + _PLACEHOLDER, strict=True)))
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0]
            if "constraints" in detail:
                detail = "its last atom has no free valence, so nothing can follow it"
            raise TokenizerError(f"the SMILES fragment {text!r} cannot start a molecule: {detail}") from None
        if not symbols or symbols[-1] != _PLACEHOLDER:
            raise TokenizerError(f"the SMILES fragment {text!r} cannot be read as a prefix")
        return self.symbols_to_ids(symbols[:-1], text)

    def between_fixed_ids(self) -> tuple[int, ...]:
        """Atoms that keep a free bond after them, whatever came before: in a blank between fixed symbols a
        branch or ring symbol would read the next symbols, fixed ones included, as its length, and an atom
        without a free bond would end the chain there; such atoms carry the chain on to the fixed symbols."""
        return tuple(self._ids[s] for s in self.symbols if (atom := atom_bond(s)) is not None and atom[1])

    def decode_selfies(self, ids: Sequence[int]) -> str:
        return "".join(self.ids_to_symbols(ids))

    def decode(self, ids: Sequence[int]) -> str:
        return sf.decoder(self.decode_selfies(ids)) or ""

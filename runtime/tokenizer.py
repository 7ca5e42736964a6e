"""The tokenizer contract every adapter follows, and the checks applied to its special ids.

An adapter is the only thing that knows how text maps to ids. The model file stores the adapter's
name and its JSON spec, so the runtime can rebuild the exact tokenizer a model was trained with.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from imadarem.runtime.errors import TokenizerError


class TokenizerAdapter(abc.ABC):
    """Base class of tokenizer plugins.

    Required: ``name`` (class attribute), ``vocab_size``, ``mask_token_id``, ``encode``, ``decode``,
    ``to_spec`` and ``from_spec``. ``pad_token_id`` falls back to 0 and ``eos_token_id`` to
    ``sep_token_id`` (else no EOS) when an adapter leaves them ``None``.
    """

    name: ClassVar[str]

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def mask_token_id(self) -> int | None: ...

    @property
    def pad_token_id(self) -> int | None:
        return None

    @property
    def eos_token_id(self) -> int | None:
        return None

    @property
    def sep_token_id(self) -> int | None:
        return None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens; raise TokenizerError on text the vocabulary cannot hold."""

    def encode_fragment(self, text: str, *, first: bool, open_end: bool) -> list[int]:
        """Ids of one literal piece of a prompt (optional hook; default: ``encode(text)``).

        ``first``: the piece starts the sequence; ``open_end``: blanks follow it, so it is a fragment to
        be continued rather than a whole text. Adapters whose encoding depends on the whole text (SELFIES
        read from SMILES) override this to encode a fragment as a prefix, or raise TokenizerError with
        the reason it cannot be one.
        """
        return self.encode(text)

    def between_fixed_ids(self) -> tuple[int, ...] | None:
        """Ids a blank *between* fixed pieces of a template may hold (optional hook; default None: any).

        An adapter whose tokens read the ones after them (SELFIES: a branch or ring symbol takes the next
        symbols as its length) names the ids that leave the fixed tokens after a blank their meaning."""
        return None

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` up to the first EOS, special tokens left out."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The token string of one id (used to draw trajectories)."""

    @abc.abstractmethod
    def to_spec(self) -> dict[str, Any]:
        """A JSON-serialisable dict from which ``from_spec`` rebuilds an identical adapter."""

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, spec: dict[str, Any]) -> TokenizerAdapter: ...


@dataclass(frozen=True)
class SpecialIds:
    mask: int
    pad: int
    eos: int | None

    def as_dict(self) -> dict[str, int | None]:
        return {"mask": self.mask, "pad": self.pad, "eos": self.eos}


def resolve_special_ids(tokenizer: TokenizerAdapter) -> SpecialIds:
    """Apply the fallbacks of docs/ARCHITECTURE.md ("Plugin hooks"), then check range and collisions.

    mask is required; pad falls back to 0; eos falls back to sep, else None.
    """
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    mask = tokenizer.mask_token_id
    if mask is None:
        raise TokenizerError(f"tokenizer {name!r} has no mask token: a refinement model needs one")
    pad = tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = tokenizer.sep_token_id
    ids = {"mask": mask, "pad": pad, "eos": eos}
    check_special_ids(ids, tokenizer.vocab_size, name)
    return SpecialIds(mask=int(mask), pad=int(pad), eos=None if eos is None else int(eos))


def check_special_ids(ids: dict[str, int | None], vocab_size: int, owner: str) -> None:
    """Raise TokenizerError when a special id is out of range or two special ids are the same."""
    if vocab_size < 2:
        raise TokenizerError(f"tokenizer {owner!r} has vocab_size {vocab_size}; it needs at least 2 tokens")
    present = {k: v for k, v in ids.items() if v is not None}
    for key, value in present.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
            raise TokenizerError(f"tokenizer {owner!r}: {key} id {value!r} is outside 0..{vocab_size - 1}")
    seen: dict[int, str] = {}
    for key, value in present.items():
        if value in seen:
            raise TokenizerError(f"tokenizer {owner!r}: {seen[value]} and {key} share id {value}")
        seen[value] = key


class VocabularyTokenizer(TokenizerAdapter):
    """An adapter over an explicit token list whose first four entries are the special tokens.

    ``[PAD]`` = 0, ``[MASK]`` = 1, ``[EOS]`` = 2, ``[UNK]`` = 3, then the data's symbols in sorted order.
    Subclasses say how text splits into symbols and how symbols join back into text.
    """

    SPECIALS: ClassVar[tuple[str, ...]] = ("[PAD]", "[MASK]", "[EOS]", "[UNK]")

    def __init__(self, symbols: Iterable[str]):
        symbols = [s for s in symbols if s not in self.SPECIALS]
        if len(set(symbols)) != len(symbols):
            raise TokenizerError(f"tokenizer {self.name!r}: the symbol list has duplicates")
        self.tokens: list[str] = list(self.SPECIALS) + symbols
        self._ids = {tok: i for i, tok in enumerate(self.tokens)}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def pad_token_id(self) -> int:
        return 0

    @property
    def mask_token_id(self) -> int:
        return 1

    @property
    def eos_token_id(self) -> int:
        return 2

    @property
    def unk_token_id(self) -> int:
        return 3

    @classmethod
    def split_symbols(cls, text: str) -> Iterable[str]:
        """The symbols of one corpus text; subclasses say how their notation splits."""
        raise NotImplementedError(f"{cls.__name__} does not say how to split text into symbols")

    @classmethod
    def from_corpus(cls, texts: Iterable[str]) -> VocabularyTokenizer:
        """A tokenizer whose vocabulary is every symbol in ``texts`` (``imadarem train`` builds the
        data's tokenizer this way)."""
        symbols: set[str] = set()
        for text in texts:
            symbols.update(cls.split_symbols(text))
        if not symbols:
            raise TokenizerError(f"cannot build a {getattr(cls, 'name', cls.__name__)!r} vocabulary from an empty corpus")
        return cls(sorted(symbols))

    @property
    def symbols(self) -> list[str]:
        return self.tokens[len(self.SPECIALS) :]

    def id_to_token(self, token_id: int) -> str:
        return self.tokens[token_id]

    def symbols_to_ids(self, symbols: Iterable[str], text: str) -> list[int]:
        ids = []
        for sym in symbols:
            idx = self._ids.get(sym)
            if idx is None or idx < len(self.SPECIALS):
                raise TokenizerError(f"unknown token {sym!r} in {text!r} for the {self.name!r} vocabulary")
            ids.append(idx)
        return ids

    def ids_to_symbols(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                break
            if i < len(self.SPECIALS):
                continue
            out.append(self.tokens[i])
        return out

    def to_spec(self) -> dict[str, Any]:
        return {"symbols": self.symbols}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> VocabularyTokenizer:
        try:
            symbols = spec["symbols"]
        except (KeyError, TypeError):
            raise TokenizerError(f"{cls.name!r} tokenizer spec needs a 'symbols' list") from None
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            raise TokenizerError(f"{cls.name!r} tokenizer spec: 'symbols' must be a list of strings")
        return cls(symbols)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.tokens == self.tokens  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.tokens)))

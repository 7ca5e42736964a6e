"""Adapter for a Hugging Face ``tokenizers`` tokenizer (a tokenizer.json); needs the ``hf`` extra.

The model file stores the whole tokenizer.json, so a model trained with it runs with nothing beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imadarem.runtime.errors import TokenizerError
from imadarem.runtime.tokenizer import TokenizerAdapter

MASK_CANDIDATES = ("[MASK]", "<mask>", "<|mask|>")
PAD_CANDIDATES = ("[PAD]", "<pad>", "<|pad|>")
EOS_CANDIDATES = ("[EOS]", "</s>", "<eos>", "<|endoftext|>", "<|eos|>")
SEP_CANDIDATES = ("[SEP]", "<sep>")


def _tokenizers_module():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("the 'hf' tokenizer needs the tokenizers package: pip install 'imadarem[hf]'") from None
    return tokenizers


class HFTokenizer(TokenizerAdapter):
    """Wraps ``tokenizers.Tokenizer``; special tokens are found by their usual spellings."""

    name = "hf"
    summary = "a Hugging Face tokenizers tokenizer.json (extra: hf)"

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        tokenizers = _tokenizers_module()
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as exc:
            raise TokenizerError(f"cannot read tokenizer file {str(path)!r}: {exc}") from None

    def _find(self, candidates: tuple[str, ...]) -> int | None:
        for tok in candidates:
            idx = self.tok.token_to_id(tok)
            if idx is not None:
                return idx
        return None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def mask_token_id(self) -> int | None:
        return self._find(MASK_CANDIDATES)

    @property
    def pad_token_id(self) -> int | None:
        return self._find(PAD_CANDIDATES)

    @property
    def eos_token_id(self) -> int | None:
        return self._find(EOS_CANDIDATES)

    @property
    def sep_token_id(self) -> int | None:
        return self._find(SEP_CANDIDATES)

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        unk = self._find(("[UNK]", "<unk>"))
        if unk is not None and unk in ids:
            raise TokenizerError(f"text {text!r} has tokens outside the 'hf' tokenizer's vocabulary")
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        eos = self.eos_token_id if self.eos_token_id is not None else self.sep_token_id
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        return self.tok.decode(ids, skip_special_tokens=True)

    def id_to_token(self, token_id: int) -> str:
        return self.tok.id_to_token(int(token_id)) or f"<{token_id}>"

    def to_spec(self) -> dict[str, Any]:
        return {"tokenizer_json": self.tok.to_str()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> HFTokenizer:
        tokenizers = _tokenizers_module()
        try:
            return cls(tokenizers.Tokenizer.from_str(spec["tokenizer_json"]))
        except Exception as exc:
            raise TokenizerError(f"'hf' tokenizer spec is unreadable: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

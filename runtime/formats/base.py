"""What every model-file format provides (the Generator's side of it is ``runtime/strategy.py``).

A format module (``formats/refine.py``, ``formats/causal.py``, ``formats/decode.py``) holds, once:

- its **contract**: input and output names and dtypes, its metadata keys, and the typed view of its
  config, each checked when a file is opened (one line for whatever contradicts it);
- ``matches(metadata)``: whether a file is of this format, which :func:`formats.open_model` asks;
- ``open(...)``: the checked :class:`ModelFile`, after one probe call, so a graph that contradicts its
  metadata fails when it is opened, not mid-run;
- its **decoding strategy**: ``ModelFile.plan(request)`` checks a request against the model (refusing,
  in one line, what the format cannot do) and returns a :class:`Plan`; ``Plan.start(size, streams)``
  returns a :class:`Decoding` for one batch; ``Decoding.step()`` is one model call on the batch's active
  rows. The Generator's batch loop does everything else (batches, seeds, streaming, timings, stopping).

"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imadarem.runtime.metadata import Common
from imadarem.runtime.strategy import Model


@dataclass
class ModelFile(Model):
    """A checked model file of some format: its session, metadata and what they say."""

    path: str
    session: Any
    metadata: dict[str, str]
    common: Common
    provider: str = "cpu"
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # a format's own checked values

    #: the format's name ("refine", "causal", "decode"), set by each subclass
    format_name = "?"

    @property
    def config(self) -> dict[str, Any]:
        """The whole config dict, as selectors see it (``StepState.config``)."""
        return self.common.config

    @property
    def typed(self):
        """The format's typed view of the config, checked when the file was opened."""
        return self.common.typed

    @property
    def tokenizer(self):
        return self.common.tokenizer

    @property
    def special(self):
        return self.common.special

    @property
    def provenance(self) -> dict[str, Any]:
        return self.common.provenance

    @property
    def vocab_size(self) -> int:
        return self.typed.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.typed.max_seq_len

    @property
    def sampling_temperature(self) -> float:
        return self.typed.sampling_temperature

    def chosen_selector(self, request, fallback: str) -> tuple[Any, dict[str, Any]]:
        """The selector and options a request runs with: its own when it names a selector; otherwise the file's
        recommended decoding (``imadarem.decoding``) with the request's options on top; otherwise ``fallback``."""
        if request.selector is not None:
            return request.selector, request.selector_options
        decoding = self.common.decoding
        if decoding:
            return decoding["selector"], {**decoding["options"], **request.selector_options}
        return fallback, request.selector_options

    def chosen_drafts(self, request) -> int | None:
        """The drafts a request runs with: its own; else the recommended decoding's when the request names no
        selector (a recommendation is one decoding: naming another selector leaves its drafts too); else None."""
        if request.drafts is not None or request.selector is not None:
            return request.drafts
        return self.common.decoding.get("drafts") if self.common.decoding else None

    @property
    def name(self) -> str:
        import os

        return os.path.basename(self.path)


@dataclass(frozen=True)
class Format:
    """One model-file format: its name, how to recognise its files and how to open one."""

    name: str
    matches: Callable[[dict[str, str]], bool]
    open: Callable[..., ModelFile]  # (path, session, metadata, provider, threads) -> ModelFile
    summary: str

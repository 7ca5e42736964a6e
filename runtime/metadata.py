"""The metadata every model file carries, whatever its format (docs/ARCHITECTURE.md, "The model file").

``imadarem.format`` names the format, ``imadarem.config`` its config (each format checks its own fields
through a typed view), ``imadarem.tokenizer`` the adapter and its spec, ``imadarem.special_ids`` the ids
the graph was built for, ``imadarem.provenance`` where the weights came from, and optionally
``imadarem.tokenizer_origin`` the distribution whose plugin made the tokenizer and ``imadarem.decoding`` the
selector and options a request that names no selector gets (the model's recommended decoding, as a
Hugging Face model's generation_config; ``imadarem export --selector``). Reading and checking these
is written once here; ``formats/`` adds each format's own keys and graph contract.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

from imadarem.runtime.errors import ImadaremError, ModelFileError
from imadarem.runtime.registry import tokenizer_from_json, tokenizer_origin
from imadarem.runtime.tokenizer import SpecialIds, TokenizerAdapter, check_special_ids, resolve_special_ids

KEY_FORMAT = "imadarem.format"
KEY_CONFIG = "imadarem.config"
KEY_TOKENIZER = "imadarem.tokenizer"
KEY_SPECIAL_IDS = "imadarem.special_ids"
KEY_PROVENANCE = "imadarem.provenance"
KEY_TOKENIZER_ORIGIN = "imadarem.tokenizer_origin"  # {"name", "version"} of the adapter's distribution
KEY_DECODING = "imadarem.decoding"  # {"selector", "options"[, "drafts"]}: a request without a selector gets these


class TokenizerOriginWarning(UserWarning):
    """A model file's tokenizer is rebuilt by another distribution or version than it was exported with."""


@dataclass(frozen=True)
class Common:
    """What every model file's metadata gives: the config dict, tokenizer, special ids and provenance."""

    config: dict[str, Any]
    typed: Any  # the format's typed view of the config
    tokenizer: TokenizerAdapter
    special: SpecialIds
    provenance: dict[str, Any]
    decoding: dict[str, Any] = dataclasses.field(default_factory=dict)  # {} or {"selector", "options"}


def json_field(meta: dict[str, str], key: str, path: str) -> Any:
    if key not in meta:
        raise ModelFileError(f"{path}: not an Imadarem model file (metadata {key!r} is missing)")
    try:
        return json.loads(meta[key])
    except ValueError as exc:
        raise ModelFileError(f"{path}: metadata {key!r} is not valid JSON ({exc})") from None


def json_object(meta: dict[str, str], key: str, path: str) -> dict[str, Any]:
    value = json_field(meta, key, path)
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: metadata {key!r} must be a JSON object")
    return value


def config_of(meta: dict[str, str]) -> dict[str, Any] | None:
    """The config JSON object, or None when it is missing or malformed (for ``matches``: the chosen
    format's ``check_metadata`` then reports what is wrong)."""
    try:
        value = json.loads(meta.get(KEY_CONFIG, ""))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def checked_fields(cls, config: dict[str, Any], path: str) -> dict[str, Any]:
    """The values of a typed config dataclass's fields, each checked: bool, int >= 1 (or the field's
    ``min`` metadata), or a finite number >= 0; a bad or missing one is a one-line ModelFileError naming it."""
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in config]
    if missing:
        raise ModelFileError(f"{path}: model config lacks {', '.join(missing)}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = config.get(f.name)
        if f.type == "bool":
            ok, value, kind = isinstance(raw, bool), raw, "true or false"
        elif f.type == "int":
            low, high = f.metadata.get("min", 1), f.metadata.get("max")
            ok = isinstance(raw, int) and not isinstance(raw, bool) and raw >= low and (high is None or raw <= high)
            value = raw
            kind = "a positive integer" if low == 1 else f"an integer >= {low}"
            if high is not None:
                kind += f" and <= {high:,}"
        else:
            ok = isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw) and raw >= 0
            value, kind = (float(raw) if ok else raw), "a number >= 0"
        if not ok:
            raise ModelFileError(f"{path}: model config {f.name} must be {kind}, got {raw!r}")
        values[f.name] = value
    return values


def check_metadata(meta: dict[str, str], path: str, fmt: str, typed) -> Common:
    """The common metadata, checked on its own: format ``fmt``, a config object and its typed view
    (``typed(config, path)``, the format's own checks, before anything reads a value), the tokenizer (its
    vocabulary against the config's vocab_size), the special ids and the provenance."""
    if meta.get(KEY_FORMAT) != fmt:
        raise ModelFileError(f"{path}: a format {meta.get(KEY_FORMAT)} model file where format {fmt} was expected")
    config = json_object(meta, KEY_CONFIG, path)
    view = typed(config, path)
    if KEY_TOKENIZER not in meta:
        raise ModelFileError(f"{path}: not an Imadarem model file (metadata {KEY_TOKENIZER!r} is missing)")
    try:
        tokenizer = tokenizer_from_json(meta[KEY_TOKENIZER])
        special = resolve_special_ids(tokenizer)
    except ImadaremError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    if tokenizer.vocab_size != config.get("vocab_size"):
        raise ModelFileError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model config says "
                             f"vocab_size {config.get('vocab_size')!r}")
    stored = json_object(meta, KEY_SPECIAL_IDS, path)
    try:
        check_special_ids(stored, int(config["vocab_size"]), tokenizer.name)
    except ImadaremError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    if stored != special.as_dict():
        raise ModelFileError(f"{path}: stored special ids {stored} contradict the tokenizer's {special.as_dict()}")
    provenance = json_object(meta, KEY_PROVENANCE, path) if KEY_PROVENANCE in meta else {}
    check_tokenizer_origin(meta, tokenizer, path)
    return Common(config, view, tokenizer, special, provenance, decoding_of(meta, path))


def decoding_of(meta: dict[str, str], path: str) -> dict[str, Any]:
    """The file's recommended decoding, checked in shape: {} when it has none, else a selector name and an
    options object (whether the selector exists and takes them is checked when a request uses them)."""
    if KEY_DECODING not in meta:
        return {}
    decoding = json_object(meta, KEY_DECODING, path)
    selector, options, drafts = decoding.get("selector"), decoding.get("options", {}), decoding.get("drafts")
    if not isinstance(selector, str) or not selector or not isinstance(options, dict) \
            or set(decoding) - {"selector", "options", "drafts"} \
            or (drafts is not None and (isinstance(drafts, bool) or not isinstance(drafts, int) or drafts < 0)):
        raise ModelFileError(f"{path}: metadata {KEY_DECODING!r} must be {{\"selector\": NAME, \"options\": {{...}}"
                             f"[, \"drafts\": N]}}, got {meta[KEY_DECODING][:200]!r}")
    return {"selector": selector, "options": options, **({"drafts": drafts} if drafts is not None else {})}


def check_tokenizer_origin(meta: dict[str, str], tokenizer: TokenizerAdapter, path: str) -> None:
    """Warn when the adapter that rebuilt the tokenizer comes from another distribution or version than
    the one the model was exported with (another plugin may use the same name and decode differently)."""
    if KEY_TOKENIZER_ORIGIN not in meta:
        return  # files written before the origin was recorded
    recorded = json_object(meta, KEY_TOKENIZER_ORIGIN, path)
    here = tokenizer_origin(tokenizer)
    if here != recorded:
        now = f"{here['name']} {here['version']}" if here else "a class from no installed distribution"
        warnings.warn(f"{path}: its tokenizer {tokenizer.name!r} was exported with {recorded.get('name')} "
                      f"{recorded.get('version')} but is read here by {now}; the ids may decode differently",
                      TokenizerOriginWarning, stacklevel=4)

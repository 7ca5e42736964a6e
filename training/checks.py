"""Checks of a model config that every family applies: field names and value types (one line each, never a
TypeError from deep inside a dataclass), and a size a machine can build."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from imadarem.runtime.errors import ImadaremError

#: the largest model a config may ask for: beyond it building the model is an allocation failure, not a
#: model (a checkpoint or a --set with a typo'd size gets one line instead)
MAX_PARAMETERS = 2_000_000_000


def check_size(hidden: int, layers: int, vocab: int, length: int, mlp: int = 4) -> None:
    """One line for a config whose model would not fit in memory (about 4 + 2 mlp h^2 per layer)."""
    estimate = layers * (4 + 2 * mlp) * hidden * hidden + (vocab + length) * hidden
    if estimate > MAX_PARAMETERS:
        raise ImadaremError(f"bad model config: about {estimate:.3g} parameters (hidden_size {hidden}, {layers} "
                            f"layers); the most this trainer builds is {MAX_PARAMETERS:.0e}")


def config_values(cls, fields: dict[str, Any], family: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``fields`` checked against the dataclass ``cls``: known names and values of the field's type (an int
    where an int is due, a finite number for a float, true/false for a bool), or a one-line error."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - set(skip)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ImadaremError(f"bad model config: {', '.join(unknown)} is not a setting of the {family} family "
                            f"(it has: {', '.join(sorted(known))})")
    out = {}
    for name, value in fields.items():
        kind = hints[name]
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        elif kind is str:
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            want = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[kind]
            raise ImadaremError(f"bad model config: {name} must be {want}, got {value!r}")
        out[name] = value
    return out

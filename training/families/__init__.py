"""The model families one trainer trains (``imadarem train --family NAME``); each a module of its own."""

from __future__ import annotations

from imadarem.runtime.errors import ImadaremError
from imadarem.training.families.base import Family, LossInput
from imadarem.training.families.causal import CausalFamily
from imadarem.training.families.refine import RefineFamily

FAMILIES: dict[str, Family] = {f.name: f for f in (CausalFamily(), RefineFamily())}
DEFAULT_FAMILY = "causal"


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ImadaremError(f"unknown model family {name!r} (choose from: {', '.join(FAMILIES)})")
    return FAMILIES[name]


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "Family", "LossInput", "get_family"]

"""Lazy public names (PEP 562) for Imadarem's packages.

``imadarem.training`` and ``imadarem.export`` name torch-backed classes in their ``__all__``, and
``imadarem.runtime`` names the loop, which loads onnxruntime's bindings; importing a command module or
listing plugins must not pay for them. Each package maps its public names to the modules that define them
and imports a module on first use of one of its names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``names[attr]`` (a module path) and returns its ``attr``."""

    def __getattr__(attr: str) -> Any:
        if attr in names:
            return getattr(importlib.import_module(names[attr]), attr)
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")

    return __getattr__

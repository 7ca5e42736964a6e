"""The models bundled with the package, chosen by name (``imadarem-run default``, ``imadarem models``).

``runtime/models/index.json`` lists each bundled file with what was measured of it; a name resolves to
its file. A path that exists always wins over a name, so a local file called like a bundled model is
still the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from imadarem.runtime.errors import ModelFileError

HERE = Path(__file__).resolve().parent / "models"
DEFAULT = "default"


def bundled() -> dict[str, dict[str, Any]]:
    """name -> its entry in the index (``file``, ``summary``, ``quality``), for the files installed."""
    index = HERE / "index.json"
    entries = json.loads(index.read_text()) if index.is_file() else {}
    return {name: entry for name, entry in entries.items() if (HERE / entry["file"]).is_file()}


def bundled_path(name: str) -> Path | None:
    entry = bundled().get(name)
    return HERE / entry["file"] if entry else None


def default_model_path() -> Path | None:
    """The bundled default model, if this installation has one."""
    return bundled_path(DEFAULT)


def resolve_model(path_or_name: str | os.PathLike | None) -> Path:
    """A model file's path: the bundled default for None, a bundled model for its name, else the path."""
    if path_or_name is None:
        path = default_model_path()
        if path is None:
            raise ModelFileError("no MODEL given and this installation has no bundled default model")
        return path
    path = Path(path_or_name)
    if path.exists() or os.sep in str(path_or_name) or path.suffix:
        if not path.exists():
            raise ModelFileError(f"model file not found: {path}")
        if not path.is_file():
            raise ModelFileError(f"{path} is not a regular file (a model file is one .onnx file)")
        return path
    found = bundled_path(str(path_or_name))
    if found is None:
        names = ", ".join(sorted(bundled())) or "none"
        raise ModelFileError(f"model file not found: {path_or_name} (bundled models: {names})")
    return found

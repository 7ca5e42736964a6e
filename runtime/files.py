"""Files the commands write (model files, JSON, plots, tables): checked before any long work starts, and
written atomically.

An output must be a new path or a regular file: a folder, a device node (``-o /dev/null``), a FIFO or a
socket is refused in one line, because writing atomically means replacing the path with a new file, which
would turn ``/dev/null`` into a regular file. The text is written to a temporary file in the same folder
and renamed over the target, so a reader never sees half a file and an interrupted write leaves the old
one.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from imadarem.runtime.errors import ImadaremError


def check_output(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` if it can take the output: a new path in a writable folder, or a regular file."""
    path = Path(path)
    if path.is_dir():
        raise ImadaremError(f"{what} {path} is a directory; give a file's path")
    if path.exists():
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ImadaremError(f"{what} {path} exists and is not a regular file; give a new path or a file to replace")
    elif path.is_symlink():
        raise ImadaremError(f"{what} {path} is a broken symbolic link")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".imadarem-write-test-"):
            pass
    except OSError as exc:
        raise ImadaremError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def replace_atomically(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished temporary file over ``path`` (checked again: it may have changed meanwhile), with the
    permissions a plain ``open(path, "w")`` would give it (a temporary file is private to its owner)."""
    check_output(path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    path = check_output(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        replace_atomically(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temporary_beside(path: str | os.PathLike, suffix: str = ".part") -> Path:
    """A fresh temporary path in ``path``'s folder (for writers that want a file name, e.g. onnx.save)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    return Path(tmp)

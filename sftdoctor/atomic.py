"""Atomic writes: a reader never sees half a file, and nothing of the user's is clobbered silently."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError


def write_atomic(path: str | os.PathLike, data: str | bytes, *, overwrite: bool = True) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and os.replace().

    overwrite=False refuses to replace an existing file (exit 2 with a clear line).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise UserError(f"{path} already exists; pass --force to overwrite it or choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: folder {parent} does not exist")
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_fallback(data: str | bytes, suffix: str) -> Path | None:
    """A copy of a report that could not be written where asked (disk full, read-only file
    system): in the temporary folder, then the home folder. Returns where it went, or None."""
    import time

    name = f"sftdoctor-report-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}{suffix}"
    for folder in (tempfile.gettempdir(), os.path.expanduser("~")):
        try:
            return write_atomic(Path(folder) / name, data)
        except (OSError, UserError):
            continue
    return None

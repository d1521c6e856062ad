"""Checks on the user's paths before sftdoctor reads or writes them.

Invariants: sftdoctor opens for reading only regular files (a FIFO or a device would block the
read forever); it replaces a file only when the file's content shows sftdoctor wrote it.
"""
from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from pathlib import Path

from .errors import UserError

REPORT_SCHEMA_PREFIX = "sftdoctor.report/"
# the marker every HTML report carries in its <head> (reports/templates/report.html)
HTML_MARKER = re.compile(rb'<meta name="sftdoctor-report" content="sftdoctor\.report/\d+">')
HTML_HEAD = 64 << 10
PROBE_PREFIX = ".sftdoctor-probe-"  # check_writable_folder's temporary file (removed at once)


def describe_kind(path: str | os.PathLike) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "unreadable"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def is_regular(path: str | os.PathLike) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return os.path.realpath(a) == os.path.realpath(b)


def require_regular_file(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """`path` as a Path when it is a regular file; else one clear UserError (never opens it)."""
    p = Path(path)
    if not os.path.lexists(p):
        raise UserError(f"{what} {path} does not exist" + (f"; {hint}" if hint else ""))
    if not is_regular(p):
        raise UserError(f"{what} {path} is {describe_kind(p)}, not a regular file" + (f"; {hint}" if hint else ""))
    return p


def is_report_file(path: str | os.PathLike) -> bool:
    """True only for a regular file whose content is an sftdoctor report: a JSON object whose
    `schema` is sftdoctor.report/N, or an HTML page with the report marker in its head. A file
    that merely mentions sftdoctor (a script that imports it, a pyproject.toml) is not one."""
    if not is_regular(path):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(HTML_HEAD)
            stripped = head.lstrip()
            if stripped.startswith(b"{"):
                try:
                    data = json.loads(head + f.read())
                except (ValueError, RecursionError):
                    return False
                schema = data.get("schema") if isinstance(data, dict) else None
                return isinstance(schema, str) and schema.startswith(REPORT_SCHEMA_PREFIX)
    except OSError:
        return False
    return stripped[:15].lower() == b"<!doctype html>" and HTML_MARKER.search(head) is not None


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """The folder exists and a file can be created in it (tried, not guessed from permission bits:
    root passes every access() check, and a read-only mount fails only on the write)."""
    folder = str(folder) or "."
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise UserError(f"cannot write {what}: {folder} is not a folder")
        raise UserError(f"cannot write {what}: folder {folder} does not exist; create it (mkdir -p {folder}) or choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
    except OSError as e:
        raise UserError(f"cannot write {what}: folder {folder} is not writable ({os.strerror(e.errno) if e.errno else e})") from None
    os.close(fd)
    os.unlink(probe)


def nearest_existing(path: str | os.PathLike) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p

"""User configuration: `[tool.sftdoctor]` in the nearest pyproject.toml (ignore = [ids])."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .errors import UserError
from .probes import REGISTRY


def find_pyproject(start: Path | None = None) -> Path | None:
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        p = d / "pyproject.toml"
        if p.is_file():
            return p
    return None


def load_settings(start: Path | None = None) -> dict[str, Any]:
    p = find_pyproject(start)
    if p is None:
        return {}
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p} is not valid TOML ({e}); fix it or run from another folder") from None
    settings = data.get("tool", {}).get("sftdoctor", {})
    ignore = settings.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise UserError(f"{p}: [tool.sftdoctor] ignore must be a list of finding ids")
    return settings


def ignored_ids(cli_ignore: list[str] | None) -> set[str]:
    """Ids to ignore: --ignore flags plus [tool.sftdoctor] ignore."""
    ids = set(cli_ignore or []) | set(load_settings().get("ignore", []))
    known = set(REGISTRY.ids)
    unknown = sorted(ids - known)
    if unknown:
        raise UserError(f"unknown finding id(s) to ignore: {', '.join(unknown)}; `sftdoctor probes` lists them")
    return ids

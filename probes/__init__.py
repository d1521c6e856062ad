"""The registry of sftdoctor's probes, listed explicitly (no entry-point magic).

Each module here is one probe: `id`, `level`, `summary`, `needs`, `check(ctx)`. Installed as
`sftdoctor.probes`; see docs/findings.md for what each id means.
"""
from __future__ import annotations

from importlib import import_module

from sftdoctor.engine import Probe

# Module names, in the order their findings are most useful to read.
_BATCH = [
    "labels_pad_not_ignored",
]
_STEP: list[str] = []
_RUN: list[str] = []
_CHECKPOINT: list[str] = []


def _load(names: list[str]) -> list[Probe]:
    return [Probe.from_module(import_module(f"{__name__}.{n}")) for n in names]


BATCH = _load(_BATCH)
STEP = _load(_STEP)
RUN = _load(_RUN)
CHECKPOINT = _load(_CHECKPOINT)
ALL = BATCH + STEP + RUN + CHECKPOINT


def by_level(*levels: str) -> list[Probe]:
    return [p for p in ALL if p.level in levels]

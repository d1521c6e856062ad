"""Findings and check results: the data every probe emits and every renderer reads.

A Finding is evidence, not prose: `evidence` holds numbers, ids and positions; renderers
format them. Ids are the public contract listed in docs/findings.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("fail", "warn", "info")
LEVELS = ("batch", "step", "run", "checkpoint", "dataset")  # dataset: aggregated over many batches
CHECK_STATUSES = ("pass", "warn", "fail", "skipped")

_RANK = {"fail": 3, "warn": 2, "info": 1, "pass": 0, "skipped": -1}


def worst(statuses) -> str:
    """The most severe of some severities/statuses ('pass' when there are none)."""
    best = "pass"
    for s in statuses:
        if _RANK.get(s, 0) > _RANK[best]:
            best = s
    return best


@dataclass
class Finding:
    id: str
    severity: str
    level: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: str = ""
    step: int | None = None
    rank: int | None = None  # distributed rank that saw it (None: single process)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")
        if self.level not in LEVELS:
            raise ValueError(f"unknown level {self.level!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["rank"] is None:
            del d["rank"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Finding":
        return cls(
            id=d["id"], severity=d["severity"], level=d["level"], message=d.get("message", ""),
            evidence=dict(d.get("evidence") or {}), fix=d.get("fix", ""),
            step=d.get("step"), rank=d.get("rank"),
        )


@dataclass
class CheckResult:
    id: str
    status: str  # pass | warn | fail | skipped
    reason: str | None = None  # why skipped (or ignored)
    level: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "status": self.status}
        if self.level:
            d["level"] = self.level
        if self.reason:
            d["reason"] = self.reason
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CheckResult":
        return cls(id=d["id"], status=d["status"], reason=d.get("reason"), level=d.get("level"))

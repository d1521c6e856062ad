"""The Report: plain data that every renderer reads, with a JSON round trip.

JSON (schema `sftdoctor.report/1`) is the source of truth: `sftdoctor report run.json` re-renders
console or HTML output from it without rerunning anything, so nothing a renderer shows may live
only in memory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from .atomic import write_atomic
from .errors import FailuresFound, UserError
from .findings import CheckResult, Finding, worst

SCHEMA = "sftdoctor.report/1"


@dataclass
class Report:
    command: str
    findings: list[Finding] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    # Summary numbers and series for renderers. Known keys (all optional):
    #   token_classes: {class: {"tokens": n, "supervised": n}}   per-token-class table
    #   steps: [{"step": i, "loss": x, "grad_norm": x, ...}]      one record per probed step
    #   activations: [{"module": name, "max_abs": x, "dtype": "float16", "limit": 65504.0}]
    #   argmax_histogram: [{"token_id": i, "text": s, "share": x}]
    metrics: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    # Token-view rows: [{"row": i, "ids": [...], "texts": [...], "classes": [...], "labels": [...], ...}]
    samples: list[dict[str, Any]] = field(default_factory=list)
    # How the run ended: {"status": "completed|crashed|interrupted|exited|stopped", "exit_code": n, ...}
    run: dict[str, Any] = field(default_factory=dict)
    # How often each finding id was seen after its first occurrence (watch/train see the same id many times).
    repeats: dict[str, int] = field(default_factory=dict)

    # ---- building -------------------------------------------------------------------------
    def add(self, findings: Iterable[Finding]) -> list[Finding]:
        """Add findings, keeping the first one per (id, rank); returns the ones that were new."""
        seen = {(f.id, f.rank) for f in self.findings}
        new = []
        for f in findings:
            key = (f.id, f.rank)
            if key in seen:
                self.repeats[f.id] = self.repeats.get(f.id, 0) + 1
                continue
            seen.add(key)
            self.findings.append(f)
            new.append(f)
        return new

    def record_checks(self, results: Iterable[CheckResult]) -> None:
        """Merge check results: a check that ran several times keeps its worst status; it is
        'skipped' only when it never ran."""
        by_id = {c.id: c for c in self.checks}
        for r in results:
            old = by_id.get(r.id)
            if old is None:
                self.checks.append(r)
                by_id[r.id] = r
            elif old.status == "skipped" and r.status != "skipped":
                old.status, old.reason = r.status, None
            elif r.status != "skipped":
                old.status = worst([old.status, r.status])

    def merge(self, other: "Report") -> None:
        self.add(other.findings)
        self.record_checks(CheckResult(**vars(c)) for c in other.checks)
        for k, n in other.repeats.items():
            self.repeats[k] = self.repeats.get(k, 0) + n

    # ---- reading --------------------------------------------------------------------------
    @property
    def verdict(self) -> str:
        """fail | warn | pass | inconclusive (rules in sftdoctor.verdict)."""
        from .verdict import decide

        return decide(self)[0]

    @property
    def verdict_reason(self) -> str:
        from .verdict import decide

        return decide(self)[1]

    def by_severity(self) -> list[Finding]:
        order = {"fail": 0, "warn": 1, "info": 2}
        return sorted(self.findings, key=lambda f: (order[f.severity], f.step or 0))

    def ids(self, severity: str | None = None) -> set[str]:
        return {f.id for f in self.findings if severity is None or f.severity == severity}

    def get(self, finding_id: str) -> Finding | None:
        return next((f for f in self.findings if f.id == finding_id), None)

    def raise_for_failures(self) -> None:
        """Raise FailuresFound listing every fail finding (for users' own tests and CI)."""
        fails = [f for f in self.findings if f.severity == "fail"]
        if fails:
            lines = "\n".join(f"  {f.id}: {f.message}" for f in fails)
            raise FailuresFound(f"sftdoctor found {len(fails)} failure(s):\n{lines}")

    # ---- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "command": self.command,
            "verdict": self.verdict,
            "verdict_reason": self.verdict_reason,
            "findings": [f.to_dict() for f in self.by_severity()],
            "checks": [c.to_dict() for c in self.checks],
            "metrics": self.metrics,
            "environment": self.environment,
            "samples": self.samples,
            "run": self.run,
            "repeats": self.repeats,
        }

    def to_json(self) -> str:
        # NaN/inf are not JSON: sanitize() writes them as the strings "nan"/"inf"/"-inf".
        return json.dumps(sanitize(self.to_dict()), indent=1, default=_json_default, allow_nan=False)

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        if d.get("schema") != SCHEMA:
            raise UserError(f"not an sftdoctor report (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        return cls(
            command=d.get("command", "?"),
            findings=[Finding.from_dict(f) for f in d.get("findings", [])],
            checks=[CheckResult.from_dict(c) for c in d.get("checks", [])],
            metrics=d.get("metrics") or {},
            environment=d.get("environment") or {},
            samples=d.get("samples") or [],
            run=d.get("run") or {},
            repeats=d.get("repeats") or {},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Report":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise UserError(f"report file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); pass a report written by --json") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} is not an sftdoctor report; pass a report written by --json")
        return cls.from_dict(data)


def _json_default(o: Any) -> Any:
    """Make tensors, numpy scalars, sets and paths JSON-able; non-finite floats become strings."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    return str(o)


def sanitize(value: Any) -> Any:
    """Replace NaN/inf floats (not valid JSON) by the strings 'nan', 'inf', '-inf', recursively."""
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    return value

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
    # Fail findings ranked upstream-first with their cause family and a one-line "what happened";
    # written by Session.finish() (sftdoctor.session.root_causes), None until a Session finished it.
    root_causes: list[dict[str, Any]] | None = None

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

    def merge(self, other: "Report") -> list[Finding]:
        """Findings, checks and repeats of another report (a part of this run); returns the new findings."""
        new = self.add(other.findings)
        self.record_checks(CheckResult(**vars(c)) for c in other.checks)
        for k, n in other.repeats.items():
            self.repeats[k] = self.repeats.get(k, 0) + n
        return new

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
            **({"root_causes": self.root_causes} if self.root_causes is not None else {}),
        }

    def to_json(self) -> str:
        # NaN/inf are not JSON: sanitize() writes them as the strings "nan"/"inf"/"-inf".
        return json.dumps(sanitize(self.to_dict()), indent=1, default=_json_default, allow_nan=False)

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "the report") -> "Report":
        """A Report from its JSON form. Every field is type-checked first (validate_report), so a
        damaged or hand-edited file is one clear UserError, never a traceback in a renderer."""
        validate_report(d, source)
        return cls(
            command=d.get("command", "?"),
            findings=[Finding.from_dict(f) for f in d.get("findings") or []],
            checks=[CheckResult.from_dict(c) for c in d.get("checks") or []],
            metrics=d.get("metrics") or {},
            environment=d.get("environment") or {},
            samples=d.get("samples") or [],
            run=d.get("run") or {},
            repeats=d.get("repeats") or {},
            root_causes=d.get("root_causes"),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Report":
        from .paths import require_regular_file

        hint = "pass a report written by --json"
        p = require_regular_file(path, "report file", hint)  # a FIFO would block the read
        try:
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); {hint}") from None
        except RecursionError:
            raise UserError(f"{path} nests JSON arrays/objects too deeply to be a report; {hint}") from None
        except OSError as e:
            raise UserError(f"cannot read {path}: {os.strerror(e.errno) if e.errno else e}") from None
        return cls.from_dict(data, source=str(path))


# ---- validation of a report read from JSON ----------------------------------------------------------

MAX_DEPTH = 64  # deeper JSON is no report of ours, and recursive renderers must not hit the recursion limit


class _Invalid(Exception):
    pass


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _need(ok: bool, where: str, expected: str, value: Any) -> None:
    if not ok:
        shown = repr(value) if isinstance(value, (str, int, float, bool)) and len(repr(value)) < 40 else _type_name(value)
        raise _Invalid(f"{where} is {shown}, expected {expected}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _depth(v: Any, limit: int) -> int:
    """Nesting depth of JSON data, iteratively (never recursion on hostile input)."""
    todo, deepest = [(v, 1)], 0
    while todo:
        x, d = todo.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            todo.extend((y, d + 1) for y in (x.values() if isinstance(x, dict) else x))
    return deepest


def _check_sample(row: Any, where: str) -> None:
    _need(isinstance(row, dict), where, "an object", row)
    ids = row.get("ids")
    _need(isinstance(ids, list) and all(_is_int(i) for i in ids), f"{where}.ids", "an array of token ids", ids)
    n = len(ids)
    for key, ok, expected in (("texts", lambda x: isinstance(x, str), "strings"),
                              ("classes", lambda x: _is_int(x) and 0 <= x < 5, "token classes 0-4"),
                              ("labels", _is_int, "integers"), ("attention", _is_int, "integers")):
        v = row.get(key)
        if v is None and key != "texts" and key != "classes":
            continue
        _need(isinstance(v, list) and len(v) == n and all(ok(x) for x in v), f"{where}.{key}",
              f"an array of {n} {expected}", v)
    for key in ("row", "length"):
        if key in row:
            _need(_is_int(row[key]), f"{where}.{key}", "an integer", row[key])


def _array_of_objects(v: Any, where: str) -> None:
    _need(isinstance(v, list) and all(isinstance(x, dict) for x in v), where, "an array of objects", v)


def _check_rendered_shapes(run: dict, metrics: dict) -> None:
    """The shapes of the run/metrics entries that renderers index into (reports/console.py, html.py)."""
    if "ranks" in run:
        _array_of_objects(run["ranks"], "run.ranks")
    if "internal_errors" in run:
        _need(isinstance(run["internal_errors"], list), "run.internal_errors", "an array", run["internal_errors"])
    logits = metrics.get("logits")
    if logits is not None:
        _need(isinstance(logits, dict) and all(isinstance(r, dict) for r in logits.values()), "metrics.logits",
              "an object of objects", logits)
        for dtype, row in logits.items():
            if row.get("argmax_top") is not None:
                _array_of_objects(row["argmax_top"], f"metrics.logits.{dtype}.argmax_top")
    for key in ("generations", "argmax_histogram", "activations", "steps"):
        if metrics.get(key) is not None:
            _array_of_objects(metrics[key], f"metrics.{key}")


def validate_report(d: Any, source: str = "the report") -> None:
    """Raise one UserError naming the first field of `d` that a report cannot hold."""
    if not isinstance(d, dict):
        raise UserError(f"{source} is not an sftdoctor report (its JSON is {_type_name(d)}, not an object); pass a report written by --json")
    schema = d.get("schema")
    if schema != SCHEMA:
        prefix = SCHEMA.rsplit("/", 1)[0] + "/"
        version = schema[len(prefix):] if isinstance(schema, str) and schema.startswith(prefix) else None
        if version is not None and version.isdigit() and int(version) > int(SCHEMA.rsplit("/", 1)[1]):
            from . import __version__

            raise UserError(f"{source} is a {schema} report, written by a newer sftdoctor; this sftdoctor {__version__} "
                            f"reads {SCHEMA}: upgrade it (pip install -U sftdoctor)")
        raise UserError(f"{source} is not an sftdoctor report (schema {schema!r}, expected {SCHEMA!r}); pass a report written by --json")
    try:
        if _depth(d, MAX_DEPTH) > MAX_DEPTH:
            raise _Invalid(f"its data is nested more than {MAX_DEPTH} levels deep")
        _need(isinstance(d.get("command", "?"), str), "command", "a string", d.get("command"))
        for key, kind, empty in (("findings", list, []), ("checks", list, []), ("samples", list, []), ("metrics", dict, {}),
                                 ("environment", dict, {}), ("run", dict, {}), ("repeats", dict, {}),
                                 ("root_causes", list, None)):
            v = d.get(key, empty)
            _need(v is None or isinstance(v, kind), key, "an array" if kind is list else "an object", v)
        from .findings import CHECK_STATUSES, LEVELS, SEVERITIES

        for i, f in enumerate(d.get("findings") or []):
            w = f"findings[{i}]"
            _need(isinstance(f, dict), w, "an object", f)
            _need(isinstance(f.get("id"), str) and f.get("id") != "", f"{w}.id", "a finding id (a string)", f.get("id"))
            _need(f.get("severity") in SEVERITIES, f"{w}.severity", " or ".join(SEVERITIES), f.get("severity"))
            _need(f.get("level") in LEVELS, f"{w}.level", " or ".join(LEVELS), f.get("level"))
            for key in ("message", "fix"):
                _need(isinstance(f.get(key, ""), str), f"{w}.{key}", "a string", f.get(key))
            _need(f.get("evidence") is None or isinstance(f.get("evidence"), dict), f"{w}.evidence", "an object", f.get("evidence"))
            for key in ("step", "rank"):
                _need(f.get(key) is None or _is_int(f.get(key)), f"{w}.{key}", "an integer or null", f.get(key))
        for i, c in enumerate(d.get("checks") or []):
            w = f"checks[{i}]"
            _need(isinstance(c, dict), w, "an object", c)
            _need(isinstance(c.get("id"), str) and c.get("id") != "", f"{w}.id", "a check id (a string)", c.get("id"))
            _need(c.get("status") in CHECK_STATUSES, f"{w}.status", " or ".join(CHECK_STATUSES), c.get("status"))
            for key in ("reason", "level"):
                _need(c.get(key) is None or isinstance(c.get(key), str), f"{w}.{key}", "a string or null", c.get(key))
        for i, row in enumerate(d.get("samples") or []):
            _check_sample(row, f"samples[{i}]")
        for k, n in (d.get("repeats") or {}).items():
            _need(_is_int(n), f"repeats.{k}", "an integer", n)
        _check_rendered_shapes(d.get("run") or {}, d.get("metrics") or {})
        for i, c in enumerate(d.get("root_causes") or []):
            w = f"root_causes[{i}]"
            _need(isinstance(c, dict), w, "an object", c)
            for key in ("id", "family", "what", "message", "level"):
                _need(isinstance(c.get(key, ""), str), f"{w}.{key}", "a string", c.get(key))
            for key in ("rank", "priority", "step"):
                _need(c.get(key) is None or _is_int(c.get(key)), f"{w}.{key}", "an integer or null", c.get(key))
        tc = (d.get("metrics") or {}).get("token_classes")
        if tc is not None:
            _need(isinstance(tc, dict), "metrics.token_classes", "an object", tc)
            for name, row in tc.items():
                _need(isinstance(row, dict) and all(_is_int(row.get(k, 0)) for k in ("tokens", "supervised")),
                      f"metrics.token_classes.{name}", "an object of integer counts", row)
    except _Invalid as e:
        raise UserError(f"{source} is a damaged sftdoctor report: {e}; re-create it with --json") from None


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

"""sftdoctor's own errors (a probe or hook that raised): recorded as data with what they affect.

An exception inside sftdoctor is our bug, never the user's: it is kept in
report.metrics["internal_errors"] as {"where", "error", "affects": [check ids], "message"}, the
checks it affects are recorded as skipped with the reason, and every renderer shows it with the
line `message` (what did not run). Older reports kept plain strings (report.run["internal_errors"]);
`collect` reads both.
"""
from __future__ import annotations

import traceback
from typing import Any, Iterable

MAX_KEPT = 20

# a readable name for the group of checks an error stops, by the first id it affects
_GROUPS = {
    "pad-token-missing": "the pad-token checks",
    "labels-pad-not-ignored": "the label checks",
    "grad-from-ignored-tokens": "the gradient checks (d loss / d logits)",
    "params-frozen": "the parameter and optimizer checks",
    "logits-nonfinite": "the logits checks",
    "precision-overflow": "the activation checks",
    "weights-nonfinite": "the saved-weight checks",
    "generation-degenerate": "the generation checks",
}


def entry(where: str, exc: BaseException | None = None, affects: Iterable[str] = (), *, error: str | None = None,
          with_traceback: bool = True) -> dict[str, Any]:
    """One internal error as data. `where`: what of ours failed; `affects`: the check ids that did not
    run (fully or on this step) because of it."""
    affects = [a for a in dict.fromkeys(affects)]
    err = error or (f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error")
    err = err.strip()[:1000]
    e = {"where": where, "error": err, "affects": affects, "message": message(where, err, affects)}
    if with_traceback and exc is not None:
        e["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-4))[-2000:]
    return e


def message(where: str, error: str, affects: list[str]) -> str:
    what = "the report may be incomplete"
    if affects:
        group = next((_GROUPS[a] for a in affects if a in _GROUPS), "these checks")
        what = f"{group} did not run ({', '.join(affects[:8])}{', ...' if len(affects) > 8 else ''})"
    return f"sftdoctor internal error in {where}: {error}; {what}. This is a bug in sftdoctor, not in your script."


def add(report: Any, e: dict[str, Any]) -> None:
    """Append to report.metrics["internal_errors"] (deduplicated by where + error) and mark the
    affected checks skipped where they never ran."""
    from .findings import CheckResult

    errs = report.metrics.setdefault("internal_errors", [])
    errs[:] = [x for x in errs if isinstance(x, dict)]
    if any(x.get("where") == e["where"] and x.get("error") == e["error"] for x in errs):
        return
    if len(errs) < MAX_KEPT:
        errs.append(e)
    short = str(e["error"]).strip().splitlines()[0][:200] if str(e["error"]).strip() else "error"
    report.record_checks(CheckResult(i, "skipped", f"sftdoctor internal error in {e['where']}: {short}")
                         for i in e.get("affects", []))


def collect(report: Any) -> list[dict[str, Any]]:
    """Every internal error of a report as dicts: metrics["internal_errors"], run["internal_errors"]
    (plain strings) and checks skipped by a probe's own exception."""
    out: list[dict[str, Any]] = []
    for x in list(report.metrics.get("internal_errors") or []) + list(report.run.get("internal_errors") or []):
        if isinstance(x, dict):
            out.append(x)
        elif isinstance(x, str):
            out.append({"where": "sftdoctor", "error": x.strip().splitlines()[-1] if x.strip() else x, "affects": [],
                        "message": message("sftdoctor", x.strip().splitlines()[-1] if x.strip() else x, [])})
    seen = {(e.get("where"), e.get("error")) for e in out}
    for c in report.checks:
        reason = c.reason or ""
        if c.status == "skipped" and reason.startswith(PROBE_ERROR):
            err = reason[len(PROBE_ERROR):].strip()
            key = (f"probe {c.id}", err)
            if key not in seen:
                seen.add(key)
                out.append({"where": f"probe {c.id}", "error": err, "affects": [c.id],
                            "message": message(f"probe {c.id}", err, [c.id])})
    return out


PROBE_ERROR = "sftdoctor internal error (probe raised):"

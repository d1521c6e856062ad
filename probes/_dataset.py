"""How batch findings add up over a whole dataset (a helper, not a probe: the registry never lists it).

A batch probe may define `dataset = DatasetRule(...)` next to its `check`: which evidence key counts
the rows it flags in one batch, how its examples are ranked (worst first), how severity follows
the rate, and how the dataset-level message reads. Probes without one get `DatasetRule()`.
sftdoctor.dataset streams every batch's findings into one Tally per id (constant memory: counts
and a few examples) and calls `rule.finding(tally)` once at the end.

Row numbers: `row` is the dataset index when the rows were drawn from a map-style dataset in
order, else the position in the stream; `batch` / `position` say where the row was in its batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from sftdoctor.findings import Finding, worst

EXAMPLES = 8  # example rows kept per finding id (worst first)


@dataclass
class Tally:
    """One finding id over every batch seen so far."""

    id: str
    rows_affected: int = 0
    batches_affected: int = 0
    exact: bool = True  # False when a batch listed only part of its rows (evidence capped)
    severities: dict[str, int] = field(default_factory=dict)  # batch severity -> batches
    examples: list[dict[str, Any]] = field(default_factory=list)
    first: Finding | None = None  # the first batch finding: its message, evidence and fix
    first_batch: int = 0  # the batch it came from
    rows_total: int = 0  # filled at the end: rows checked
    batches_total: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # numeric evidence summed over batches

    @property
    def share(self) -> float:
        return self.rows_affected / self.rows_total if self.rows_total else 0.0

    @property
    def worst_batch_severity(self) -> str:
        return worst(self.severities)


@dataclass
class DatasetRule:
    count: str | None = None  # evidence key with the exact number of flagged rows in one batch
    worst: str | None = None  # row statistic ranking examples: "supervised" (fewest first), "-length" (most first)
    what: str = ""  # "lose their answer to truncation": the rows' defect, for the message
    severity: Callable[[Tally], str] | None = None  # default: the worst severity any batch had
    detail: Callable[[Tally], str] | None = None  # extra clause after the rate (e.g. "at max_length 256")
    worst_text: Callable[[dict[str, Any]], str] | None = None  # "row 17 keeps 0 answer tokens"
    sum_keys: tuple[str, ...] = ()  # numeric evidence keys to sum over batches (e.g. positions)

    # ---- streaming ---------------------------------------------------------------------------------
    def add(self, tally: Tally, f: Finding, rows: list[int], stats: dict[str, list], batch_index: int) -> None:
        """Fold one batch finding in. rows: the global row number of each row of the batch;
        stats: per-row statistics of the batch (lists indexed by position in the batch)."""
        ev = f.evidence or {}
        listed = [int(r) for r in ev.get("rows") or [] if isinstance(r, int) and 0 <= r < len(rows)]
        n = ev.get(self.count) if self.count else None
        if not isinstance(n, int):
            n = len(listed) if "rows" in ev else 0
            if len(listed) >= 32:  # probes list at most 32 rows (probes._common.MAX_LISTED)
                tally.exact = False
        tally.rows_affected += n
        tally.batches_affected += 1
        tally.severities[f.severity] = tally.severities.get(f.severity, 0) + 1
        if tally.first is None:
            tally.first, tally.first_batch = f, batch_index
        for k in self.sum_keys:
            v = ev.get(k)
            if isinstance(v, (int, float)):
                tally.sums[k] = tally.sums.get(k, 0) + v
        for pos in listed:
            ex = {"row": rows[pos], "batch": batch_index, "position": pos}
            ex.update({k: v[pos] for k, v in stats.items()})
            tally.examples.append(ex)
        if len(tally.examples) > EXAMPLES:
            tally.examples.sort(key=self._key)
            del tally.examples[EXAMPLES:]

    def _key(self, ex: dict[str, Any]):
        if not self.worst:
            return (ex["row"],)
        name, sign = (self.worst[1:], -1) if self.worst.startswith("-") else (self.worst, 1)
        return (sign * (ex.get(name) or 0), ex["row"])

    # ---- the dataset-level finding ---------------------------------------------------------------
    def finding(self, tally: Tally, probe_id: str) -> Finding:
        tally.examples.sort(key=self._key)
        severity = self.severity(tally) if self.severity else tally.worst_batch_severity
        if severity not in ("fail", "warn", "info"):
            severity = "warn"
        first = tally.first
        if tally.rows_affected:
            what = self.what or f"show {probe_id}"
            msg = f"{tally.rows_affected:,} of {tally.rows_total:,} rows ({pct(tally.share)}) {what}"
        else:  # a batch-wide finding (no rows listed): count batches
            msg = (f"{tally.batches_affected:,} of {tally.batches_total:,} batches: "
                   + (first.message if first is not None else probe_id))
        if self.detail:
            extra = self.detail(tally)
            if extra:
                msg += " " + extra
        if tally.examples:
            ex = tally.examples[0]
            msg += "; worst: " + (self.worst_text(ex) if self.worst_text else f"row {ex['row']}")
        evidence: dict[str, Any] = {
            "rows_affected": tally.rows_affected,
            "rows_total": tally.rows_total,
            "share_of_rows": round(tally.share, 6),
            "rows_affected_exact": tally.exact,
            "batches_affected": tally.batches_affected,
            "batches_total": tally.batches_total,
            "examples": tally.examples,
            "batch_severities": dict(tally.severities),
        }
        evidence.update({k: v for k, v in tally.sums.items()})
        if first is not None:
            evidence["first_batch"] = {"batch": tally.first_batch, "message": first.message}
        return Finding(id=probe_id, severity=severity, level="dataset", message=msg, evidence=evidence,
                       fix=first.fix if first is not None else "")


DEFAULT = DatasetRule()


def pct(share: float) -> str:
    """4.2%, 0.03%, 100%: enough digits to tell a rare defect from none."""
    p = 100 * share
    if p == 0 or p >= 10:
        return f"{p:.0f}%" if p == round(p) or p >= 10 else f"{p:.1f}%"
    if p >= 1:
        return f"{p:.1f}%"
    return f"{p:.2g}%"


def by_rate(fail_at: float, warn_at: float = 0.0) -> Callable[[Tally], str]:
    """Severity by the share of rows affected: >= fail_at fails, > warn_at warns, else info."""
    def severity(t: Tally) -> str:
        if t.share >= fail_at:
            return "fail"
        return "warn" if t.share > warn_at else "info"
    return severity

"""The probe engine: a probe is a small module with `id`, `level`, `needs`, `summary` and
`check(ctx) -> list[Finding]`. The registry (sftdoctor.probes.ALL) lists them explicitly.

Contract: a probe never prints and never aborts. An exception inside a probe becomes a
'skipped' check with the error as reason, so one broken probe cannot hide the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterable

from .context import ProbeContext
from .findings import CheckResult, Finding, worst


@dataclass(frozen=True)
class Probe:
    id: str
    level: str  # batch | step | run | checkpoint
    summary: str  # one line for `sftdoctor probes`
    needs: tuple[str, ...]  # context parts required, see ProbeContext.has
    check: Callable[[ProbeContext], list[Finding]]
    ids: tuple[str, ...] = ()  # finding ids this probe may emit (default: just `id`)
    # How a batch probe's findings add up over many batches (a probes._dataset.DatasetRule; None:
    # the default rule). Read by sftdoctor.dataset when a whole dataset is inspected.
    dataset: Any = None

    @classmethod
    def from_module(cls, mod: ModuleType) -> "Probe":
        return cls(
            id=mod.id, level=mod.level, summary=mod.summary, needs=tuple(getattr(mod, "needs", ())),
            check=mod.check, ids=tuple(getattr(mod, "ids", ())) or (mod.id,), dataset=getattr(mod, "dataset", None),
        )


def run_probes(
    ctx: ProbeContext, probes: Iterable[Probe], *, ignore: Iterable[str] = ()
) -> tuple[list[Finding], list[CheckResult]]:
    """Run every probe whose needs the context meets; return findings and one check per id."""
    ignore = set(ignore)
    findings: list[Finding] = []
    checks: list[CheckResult] = []
    for probe in probes:
        if all(i in ignore for i in probe.ids):
            checks.extend(CheckResult(i, "skipped", "ignored by configuration", probe.level) for i in probe.ids)
            continue
        missing = [n for n in probe.needs if not ctx.has(n)]
        if missing:
            checks.extend(CheckResult(i, "skipped", f"needs {', '.join(missing)}", probe.level) for i in probe.ids)
            continue
        try:
            got = list(probe.check(ctx) or [])
        except Exception as e:  # a probe never aborts the run
            checks.extend(
                CheckResult(i, "skipped", f"probe error: {type(e).__name__}: {e}", probe.level) for i in probe.ids
            )
            continue
        for f in got:
            if f.step is None:
                f.step = ctx.step_index
            if f.rank is None:
                f.rank = ctx.rank
        kept = [f for f in got if f.id not in ignore]
        findings.extend(kept)
        for i in probe.ids:
            if i in ignore:
                checks.append(CheckResult(i, "skipped", "ignored by configuration", probe.level))
                continue
            statuses = [f.severity for f in kept if f.id == i and f.severity in ("fail", "warn")]
            checks.append(CheckResult(i, worst(statuses), None, probe.level))
    return findings, checks

"""The probe engine: a probe is a small module with `id`, `level`, `needs`, `summary` and
`check(ctx) -> list[Finding]`, plus what the rest of sftdoctor needs to know about its finding:
`family`, `priority`, `cause` (root-cause ranking), `remedy` and `fix_on_warn` (`train --fix`).
The registry (sftdoctor.probes.ALL) lists them explicitly.

Contract: a probe never prints and never aborts. An exception inside a probe becomes a
'skipped' check with the error as reason, so one broken probe cannot hide the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterable

from .context import NEEDS, ProbeContext
from .findings import CheckResult, Finding, worst
from .internal import PROBE_ERROR


# Why a check did not run, by the context part it needed (a caller may give a more precise reason
# for this run in ProbeContext.why_missing[need]). Each keeps the need's name, so the reason stays searchable.
WHY_MISSING = {
    "labels": "needs labels: the model was called without labels and no label tensor was found",
    "tokenizer": "needs a tokenizer: none was found, so EOS and pad tokens are unknown "
                 "(pass processing_class= to the Trainer or a tokenizer to sftdoctor.attach)",
    "logits_grad": "needs logits_grad: no gradient reached the logits in this step (no backward yet, or the loss "
                   "did not use the logits this hook saw)",
    "forward_stats": "needs forward_stats: no logits were observed in this step",
    "backward": "needs backward: no backward was observed in this step",
    "position_ids": "needs position_ids: the batch has none (positions are implicit)",
    "attention_mask": "needs attention_mask: the batch has none",
    "examples": "needs examples: the raw text examples were not available (the batch came tokenized)",
    "checkpoint": "needs a checkpoint: none was saved or given",
    "step": "needs step: no training step was observed",
    "run": "needs run: no run history",
    "batch": "needs batch: no batch was observed",
    "model": "needs model: no model or config was given",
    "dataset": "needs dataset: only a whole-dataset inspection (inspect-batch --batches) has its statistics",
}
assert set(WHY_MISSING) == set(NEEDS)  # every part a probe may need says why it can be missing


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
    # What the finding says about the cause (reports rank root causes by these):
    # family: "learned" (trained on wrong targets), "numerical" (overflow/NaN), "setup" (configuration),
    # "symptom" (an effect of some other cause), "other" (none declared).
    family: str = "other"
    priority: int = 30  # lower = more upstream: a cause is listed before the symptoms it explains
    cause: str = ""  # one line: what happened. Empty: the probe is not ranked as a root cause
    # `sftdoctor train --fix`: the name of the remedy (sftdoctor.train.preflight.REMEDIES) or None;
    # fix_on_warn: also apply it to a warn (safe remedy, silent damage), not only to a fail.
    remedy: str | None = None
    fix_on_warn: bool = False

    @classmethod
    def from_module(cls, mod: ModuleType) -> "Probe":
        needs = tuple(getattr(mod, "needs", ()))
        unknown = [n for n in needs if n not in NEEDS]
        if unknown:  # a misspelt need would otherwise skip the probe forever, silently
            raise ValueError(f"probe {mod.__name__} needs {unknown[0]!r}, which no context provides; parts are {NEEDS}")
        return cls(
            id=mod.id, level=mod.level, summary=mod.summary, needs=tuple(getattr(mod, "needs", ())),
            check=mod.check, ids=tuple(getattr(mod, "ids", ())) or (mod.id,), dataset=getattr(mod, "dataset", None),
            family=getattr(mod, "family", "other"), priority=int(getattr(mod, "priority", 30)),
            cause=getattr(mod, "cause", ""), remedy=getattr(mod, "remedy", None),
            fix_on_warn=bool(getattr(mod, "fix_on_warn", False)),
        )


@dataclass(frozen=True)
class Registry:
    """The probes a Session may run (sftdoctor.probes.REGISTRY), in reading order.
    A Session takes one as an argument, so tests can hand it a registry of their own."""

    probes: tuple[Probe, ...]

    def at(self, *levels: str) -> list[Probe]:
        return [p for p in self.probes if p.level in levels]

    def get(self, finding_id: str) -> Probe | None:
        return next((p for p in self.probes if finding_id in p.ids), None)

    @property
    def ids(self) -> list[str]:
        return [i for p in self.probes for i in p.ids]


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
            reason = "; ".join(ctx.why_missing.get(n) or WHY_MISSING[n] for n in missing)
            checks.extend(CheckResult(i, "skipped", reason, probe.level) for i in probe.ids)
            continue
        try:
            got = list(probe.check(ctx) or [])
        except Exception as e:  # a probe never aborts the run
            checks.extend(
                CheckResult(i, "skipped", f"{PROBE_ERROR} {type(e).__name__}: {e}", probe.level) for i in probe.ids
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

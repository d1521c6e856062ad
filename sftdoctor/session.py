"""One Session per run: the only code that runs probes and the only writer of a Report.

Every verb (inspect-batch, watch, train, diagnose, the Python API) builds one Session with the
probe registry it was given, feeds it contexts, and ends with `finish()`:

    session = Session("inspect-batch", REGISTRY, ignore=ignore)
    session.check(ctx, "batch")          # run the batch probes: findings and checks into the report
    session.merge(step_report)           # a part built elsewhere (a rank, a sub-run) joins the report
    report = session.finish()            # verdict and ranked root causes, computed once, here

Observers (sftdoctor.observer, the dataset drawer, the checkpoint reader) measure; they never
judge. Findings come only from probes (sftdoctor.probes), and only a Session runs them, so the
step and rank a finding carries and the family it is filed under are stamped in one place.
"""
from __future__ import annotations

import platform
import sys
from typing import Any, Iterable, Mapping

import torch

from .context import ProbeContext
from .engine import Probe, Registry, run_probes
from .findings import CheckResult, Finding
from .report import Report
from .constants import CLASS_NAMES, IGNORE_INDEX
from .tokens import class_table

SAMPLE_ROWS = 4  # token-view rows kept in a report
SAMPLE_TOKENS = 1024  # tokens kept per row (the view collapses long runs)


class Session:
    """Runs the registry's probes on what a run observed and owns the run's Report."""

    def __init__(self, command: str, registry: Registry, *, ignore: Iterable[str] = (), rank: int | None = None,
                 env: Mapping[str, Any] | None = None) -> None:
        self.registry = registry
        self.ignore = frozenset(ignore)
        self.rank = rank
        self.report = Report(command=command, environment=dict(environment() if env is None else env))

    # ---- judging ------------------------------------------------------------------------------
    def evaluate(self, ctx: ProbeContext, level: str, *, only: Iterable[str] | None = None
                 ) -> tuple[list[Finding], list[CheckResult]]:
        """Run the probes of one level (or only the named ids of it) on `ctx` and return their
        findings (stamped with the step, rank and cause family) and checks, without recording them:
        for callers that aggregate many contexts first (the whole-dataset inspector) and then
        `record` the result."""
        findings, checks = run_probes(ctx, self.probes(level, only), ignore=self.ignore)
        for f in findings:
            if f.step is None:
                f.step = ctx.step_index
            if f.rank is None:
                f.rank = ctx.rank if ctx.rank is not None else self.rank
            if level in ("step", "run"):
                # what a step-level finding points to: numerics (overflow/NaN) or what was learned (data/labels)
                f.evidence.setdefault("family", "numerical" if self.family(f) == "numerical" else "learned")
        return findings, checks

    def probes(self, level: str, only: Iterable[str] | None = None) -> list[Probe]:
        """The registry's probes of one level, or only those emitting one of the named ids."""
        probes = self.registry.at(level)
        if only is None:
            return probes
        wanted = set(only)
        return [p for p in probes if wanted & set(p.ids)]

    def check(self, ctx: ProbeContext, level: str, *, only: Iterable[str] | None = None) -> list[Finding]:
        """Run the probes of one level (or only the named ids) on `ctx` and record them; returns the
        findings that were new."""
        findings, checks = self.evaluate(ctx, level, only=only)
        return self.record(findings, checks)

    def record(self, findings: Iterable[Finding], checks: Iterable[CheckResult]) -> list[Finding]:
        self.report.record_checks(checks)
        return self.report.add(findings)

    def replace(self, old: Finding, new: Finding) -> None:
        """One finding stands for another of the same id (a dataset-level count for the first batch's)."""
        findings = self.report.findings
        findings[findings.index(old)] = new

    def skip(self, level: str, reason: str) -> None:
        """Every check of `level` did not run, for `reason` (said in every renderer)."""
        self.report.record_checks(CheckResult(i, "skipped", reason, p.level) for p in self.registry.at(level) for i in p.ids)

    def family(self, f: Finding) -> str:
        return cause_family(f, self.registry)

    # ---- joining parts ----------------------------------------------------------------------------
    def merge(self, other: Report, *, metrics: Iterable[str] = (), fill: bool = False) -> list[Finding]:
        """Join a report built by another part of this run (a sub-step, a Doctor, a rank): its
        findings, checks and repeats; the named metrics keys replace ours, and with fill=True every
        other metric and the token view fill what this report lacks. Returns the new findings."""
        new = self.report.merge(other)
        for key in metrics:
            if key in other.metrics:
                self.report.metrics[key] = other.metrics[key]
        if fill:
            for key, value in other.metrics.items():
                self.report.metrics.setdefault(key, value)
            if not self.report.samples and other.samples:
                self.report.samples = other.samples
        return new

    # ---- ending -----------------------------------------------------------------------------------
    def finish(self) -> Report:
        """The report with its ranked root causes (the verdict itself is sftdoctor.verdict's rule)."""
        self.report.root_causes = root_causes(self.report, self.registry)
        return self.report

    @classmethod
    def reopen(cls, report: Report, registry: Registry) -> "Session":
        """A Session around a report read back from JSON (re-rendered, or with --ignore applied)."""
        s = cls(report.command, registry, env=report.environment)
        s.report = report
        return s


# ---- root causes --------------------------------------------------------------------------------------

def cause_family(f: Finding, registry: Registry) -> str:
    """The cause family of a finding: what its evidence says when it says it (a NaN argmax is
    numerical, whatever id saw it), else what its probe declares."""
    ev = f.evidence or {}
    for key in ("family", "cause_family", "cause"):
        v = ev.get(key)
        if isinstance(v, str) and v.lower() in ("learned", "numerical"):
            return v.lower()
    if ev.get("logits_finite") is False or ev.get("finite") is False:
        return "numerical"
    probe = registry.get(f.id)
    return probe.family if probe is not None else "other"


def root_causes(report: Report, registry: Registry) -> list[dict[str, Any]]:
    """Fail findings ranked upstream-first, each with its family and a one-line explanation from its
    probe's declaration. A symptom whose family is known from its evidence is listed under it."""
    # only a probe that declares a `cause` is ranked as one; the others count as ("other", 30, "")
    causes = {p.id: (p.family, p.priority, p.cause) for p in registry.probes if p.cause}
    fails = [f for f in report.findings if f.severity == "fail"]
    if fails:
        # a warn that is a known upstream cause (fp16 + Adam, divergence) often explains the fails
        fails += [f for f in report.findings if f.severity == "warn" and causes.get(f.id, ("symptom",))[0] != "symptom"]
    ranked = []
    text0 = _id0_text(report) if fails else None
    for f in fails:
        base_family, priority, what = causes.get(f.id, ("other", 30, ""))
        if f.id == "precision-overflow" and (f.evidence or {}).get("kind") == "nan-without-overflow":
            what = "NaN appeared with no value near the dtype's limit: NaN weights or inputs, not a range overflow."
        if "id 0" in what and text0:
            what += f" In this tokenizer id 0 is {text0!r}."
        ranked.append({
            "id": f.id, "family": cause_family(f, registry), "symptom": base_family == "symptom", "what": what,
            "message": f.message, "step": f.step, "level": f.level, "priority": priority,
        })
    ranked.sort(key=lambda r: (r["symptom"], r["priority"]))
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return ranked


def _id0_text(report: Report) -> str | None:
    """How this report's tokenizer prints id 0 (evidence or samples), None when unknown."""
    for f in report.findings:
        ev = f.evidence or {}
        if ev.get("token_id") == 0 and isinstance(ev.get("token_text") or ev.get("text"), str):
            return ev.get("token_text") or ev.get("text")
    for row in report.samples or []:
        for i, t in zip(row.get("ids") or [], row.get("texts") or []):
            if i == 0 and isinstance(t, str):
                return t
    return None


# ---- what every report records besides findings ----------------------------------------------------------

def environment() -> dict[str, Any]:
    import importlib.metadata as md

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": ver("transformers"),
        "sftdoctor": ver("sftdoctor"),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "argv": list(sys.argv),
    }
    return {k: v for k, v in env.items() if v is not None}


def token_samples(ctx: ProbeContext, rows: int = SAMPLE_ROWS, extra: Mapping[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Token-view rows for renderers: ids, token texts, classes, labels (and any per-token extras)."""
    b, tok, classes = ctx.batch, ctx.tokenizer, ctx.token_classes
    out = []
    for r in range(min(rows, b.input_ids.shape[0])):  # the first rows: the batch as the collator built it
        ids = b.input_ids[r, :SAMPLE_TOKENS].tolist()
        if tok is not None and tok.convert_ids_to_tokens is not None:
            texts = [tok.token_text(i) for i in ids]
        else:
            texts = [str(i) for i in ids]
        row = {
            "row": r,
            "ids": ids,
            "texts": texts,
            "classes": classes[r, :SAMPLE_TOKENS].tolist(),
            "labels": b.labels[r, :SAMPLE_TOKENS].tolist() if b.labels is not None else None,
            "attention": b.attention_mask[r, :SAMPLE_TOKENS].tolist() if b.attention_mask is not None else None,
            "length": int(b.input_ids.shape[1]),
        }
        for name, t in (extra or {}).items():
            row[name] = t[r, :SAMPLE_TOKENS].tolist()
        out.append(row)
    return out


def batch_metrics(ctx: ProbeContext) -> dict[str, Any]:
    b = ctx.batch
    B, T = b.input_ids.shape
    m: dict[str, Any] = {"batch": {"rows": B, "seq_len": T, "labels_source": b.labels_source}}
    m["token_classes"] = class_table(b, ctx.token_classes)
    if b.labels is not None:
        m["batch"]["supervised_tokens"] = int((b.labels != IGNORE_INDEX).sum())
    if ctx.tokenizer is not None:
        t = ctx.tokenizer
        m["tokenizer"] = {
            "class": t.class_name, "name": t.name_or_path, "pad_id": t.pad_id, "pad_token": t.pad_token,
            "eos_ids": sorted(t.eos_ids), "eos_token": t.eos_token, "bos_id": t.bos_id, "len": t.vocab_len,
            "padding_side": t.padding_side,
        }
    if ctx.model is not None:
        m["model"] = {k: v for k, v in vars(ctx.model).items() if v not in (None, "")}
    return m


__all__ = ["Session", "root_causes", "environment", "token_samples", "batch_metrics", "CLASS_NAMES"]

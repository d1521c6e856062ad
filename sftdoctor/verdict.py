"""What a report's verdict means, in one place: `fail | warn | pass | inconclusive`, and the exit code.

- fail: a finding of severity fail, i.e. a defect named with its cause (data, masking, loss,
  optimizer or numerics). A bad output with no defect found is never a fail (see undertrained()).
- inconclusive: nothing (or too little) was checked: no check ran at all, or an exception inside
  sftdoctor (a probe error, a hook that failed) may have hidden a finding and nothing else failed.
  An internal error never yields PASS: the checks it affected did not really run.
- warn: a warn finding, every check that should have run ran.
- pass: at least one check ran, none warned or failed, and sftdoctor raised nothing.

Exit codes (every verb): 0 pass / warn, 1 fail, 2 bad input (UserError), 3 inconclusive. `watch`
returns the script's own exit code first when the script crashed or exited non-zero.
No torch import here: renderers and the JSON loader use it.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

VERDICTS = ("fail", "warn", "pass", "inconclusive")
EXIT_CODES = {"pass": 0, "warn": 0, "fail": 1, "inconclusive": 3}
PROBE_ERROR = "probe error:"  # CheckResult.reason prefix written by sftdoctor.engine


def internal_errors(report: Any) -> list[str]:
    """Every exception of sftdoctor's own recorded in the report (run, metrics, probe errors)."""
    out: list[str] = []
    for holder in (report.run or {}, report.metrics or {}):
        for key in ("internal_errors", "probe_error", "probe_errors"):
            v = holder.get(key)
            if isinstance(v, str) and v:
                out.append(v)
            elif isinstance(v, (list, tuple)):
                out.extend(str(x) if not isinstance(x, dict) else (x.get("error") or x.get("message") or str(x)) for x in v)
    out.extend(f"{c.id}: {c.reason}" for c in report.checks if c.status == "skipped" and (c.reason or "").startswith(PROBE_ERROR))
    return out


def checks_ran(checks: Iterable[Any]) -> int:
    return sum(1 for c in checks if c.status != "skipped")


def decide(report: Any) -> tuple[str, str]:
    """(verdict, reason): the reason is one line for renderers."""
    sev = {f.severity for f in report.findings}
    if "fail" in sev:
        n = sum(1 for f in report.findings if f.severity == "fail")
        return "fail", f"{n} defect{'s' if n != 1 else ''} found"
    ran = checks_ran(report.checks)
    if ran == 0:
        note = (report.run or {}).get("note")
        return "inconclusive", "no check ran" + (f" ({note})" if note else "")
    run = report.run or {}
    if (report.command == "watch" and run.get("first_forward") and (run.get("options") or {}).get("step_probes", True)
            and not any(c.level == "step" and c.status != "skipped" for c in report.checks)):
        # the batch was seen but no training step was observed: the step checks (the numerics) never ran
        return "inconclusive", "the batch checks ran but no training step was observed, so no step check ran"
    crashed = _crashed_rank(run)
    if crashed is not None:
        # the checks saw only the steps before the crash: a clean partial run is not a PASS
        return "inconclusive", f"the script crashed{crashed} before the run completed; {ran} checks ran on what it did"
    errors = internal_errors(report)
    if errors:
        return "inconclusive", (f"{len(errors)} internal sftdoctor error{'s' if len(errors) != 1 else ''} may have hidden "
                                f"findings (this is sftdoctor's bug, not your script's): {errors[0][:160]}")
    if "warn" in sev:
        return "warn", f"{ran} checks ran; warnings to look at"
    return "pass", f"{ran} checks ran, none found a problem"


def _crashed_rank(run: dict[str, Any]) -> str | None:
    """' on rank N' / '' when the script (on any rank) crashed or a rank never answered; None otherwise."""
    if run.get("status") in ("crashed", "incomplete"):
        rank = run.get("failed_rank")
        return f" on rank {rank}" if isinstance(rank, int) else ""
    for r in run.get("ranks") or []:
        if isinstance(r, dict) and r.get("status") in ("crashed", "no-report"):
            return f" on rank {r.get('rank', '?')}"
    return None


def exit_code(verdict: str) -> int:
    return EXIT_CODES.get(verdict, 1)


# ---- bad output, no defect found ---------------------------------------------------------------------

FAR_FROM_PLATEAU = 1.0  # nats: a last loss this far above ~1 nat is still far from a trained model


def undertrained(training: dict[str, Any] | None, *, vocab_size: int | None = None) -> dict[str, Any]:
    """The evidence that a bad output comes from too little training rather than a defect:
    first loss vs ln(vocab) (near it: the model started untrained), steps, the last loss.

    training: {"first_loss", "last_loss" (or "final_loss"), "steps", "vocab_size", ...} as known.
    Returns a plain dict for Finding.evidence (keys missing when unknown)."""
    t = dict(training or {})
    ev: dict[str, Any] = {"cause": "undertrained"}
    vocab = t.get("vocab_size") or vocab_size
    first = _num(t.get("first_loss"))
    last = _num(t.get("last_loss", t.get("final_loss")))
    if vocab:
        ev["ln_vocab"] = round(math.log(vocab), 3)
    if first is not None:
        ev["first_loss"] = round(first, 4)
        if vocab:
            # a random-init model starts at ~ln(vocab): its first loss says it knew nothing yet
            ev["started_untrained"] = first >= 0.8 * math.log(vocab)
    if last is not None:
        ev["last_loss"] = round(last, 4)
        ev["loss_far_from_plateau"] = last > FAR_FROM_PLATEAU
    if t.get("steps") is not None:
        ev["steps"] = t["steps"]
    for k in ("eos_supervised", "checks_passed", "eval_accuracy", "source"):
        if t.get(k) is not None:
            ev[k] = t[k]
    return ev


def training_note(ev: Mapping[str, Any]) -> str:
    """', loss 10.4 -> 6.1 over 40 steps (first loss ~ ln(vocab) 10.8: it started untrained)' from undertrained()."""
    parts = []
    if ev.get("first_loss") is not None and ev.get("last_loss") is not None:
        parts.append(f"loss {ev['first_loss']:.3g} -> {ev['last_loss']:.3g}")
    elif ev.get("last_loss") is not None:
        parts.append(f"last loss {ev['last_loss']:.3g}")
    if ev.get("steps") is not None:
        parts.append(f"over {ev['steps']} steps")
    if ev.get("started_untrained"):
        parts.append(f"(first loss near ln(vocab) = {ev['ln_vocab']:.3g}: it started untrained)")
    return (", " + " ".join(parts)) if parts else ""


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None

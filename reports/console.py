"""The rich console report: verdict first, findings by severity with evidence and fix, the
per-token-class table, and a token view of a few rows."""
from __future__ import annotations

import os

from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sftdoctor.constants import CLASS_NAMES, IGNORE_INDEX
from sftdoctor.report import Report

SEVERITY_STYLE = {"fail": "bold red", "warn": "yellow", "info": "cyan"}
VERDICT_STYLE = {"fail": "bold white on red", "warn": "bold black on yellow", "pass": "bold white on green",
                 "inconclusive": "bold white on blue"}  # inconclusive is never green: nothing says "fine"
CLASS_STYLE = {0: "grey50", 1: "green", 2: "bold magenta", 3: "grey35", 4: "blue"}
# Long runs of one kind are collapsed to their edges ("[pad supervised, label 0 ×412]"): padding
# quickly, text only when long, so a 512-token row stays readable but its text stays visible.
PAD_COLLAPSE, PAD_EDGE = 12, 3
TEXT_COLLAPSE, TEXT_EDGE = 80, 24


def render(report: Report, console: Console | None = None, *, tokens: bool = True, max_rows: int = 2) -> None:
    console = console or Console()
    for part in renderables(report, tokens=tokens, max_rows=max_rows):
        console.print(part)


def terminal_copy(report: Report) -> Report:
    """The report with every string made inert for a terminal (sftdoctor.textsafe): dataset text,
    token strings and error messages can hold escape sequences."""
    from dataclasses import replace

    from sftdoctor.textsafe import terminal_safe_data as safe

    return Report(command=safe(report.command),
                  findings=[replace(f, id=safe(f.id), message=safe(f.message), evidence=safe(f.evidence), fix=safe(f.fix))
                            for f in report.findings],
                  checks=[replace(c, id=safe(c.id), reason=safe(c.reason)) for c in report.checks],
                  metrics=safe(report.metrics), environment=safe(report.environment), samples=safe(report.samples),
                  run=safe(report.run), repeats=safe(report.repeats))


def renderables(report: Report, *, tokens: bool = True, max_rows: int = 2) -> list[Any]:
    report = terminal_copy(report)  # invariant: nothing below prints a raw string of the report
    out: list[Any] = [verdict_line(report)]
    if report.run.get("ranks"):
        out.extend(rank_lines(report))  # several ranks: each one's end, the failing one first
    elif report.run.get("status") not in (None, "completed"):
        out.append(Text(f"run {report.run.get('status')}: {report.run.get('error', {}).get('message', '') if isinstance(report.run.get('error'), dict) else ''}".rstrip(": "), style="red"))
    from sftdoctor.internal import collect

    errors = collect(report)
    for err in errors[:5]:
        # a probe or hook of ours failed: say what did not run, and that it is our bug
        out.append(Text(str(err.get("message") or err.get("error")), style="magenta"))
    if len(errors) > 5:
        out.append(Text(f"... and {len(errors) - 5} more sftdoctor internal errors (see the JSON report)", style="magenta"))
    for f in report.by_severity():
        out.append(finding_panel(f))
    table = class_table(report)
    if table is not None:
        out.append(table)
    from .dataset_view import console as dataset_summary  # inspect-batch --batches: per-row statistics

    out.extend(dataset_summary(report))
    if tokens and report.samples:
        out.append(token_view(report, max_rows=max_rows))
    if tokens:
        out.extend(t for t in (logits_table(report), generation_table(report)) if t is not None)
    out.append(checks_line(report))
    return out


def rank_lines(report: Report) -> list[Text]:
    """A multi-process run: the first failing rank's end (the root cause), then every other rank
    that did not complete, one line each."""
    def what(e: dict) -> str:
        err = e.get("error") if isinstance(e.get("error"), dict) else None
        if err:
            where = f" ({os.path.basename(str(err['file']))}:{err.get('line')})" if err.get("file") else ""
            return f"{err.get('type')}" + (f": {err.get('message')}" if err.get("message") else "") + where
        return str(e.get("stopped_by") or e.get("reason") or e.get("note") or "")

    out = []
    ranks = report.run.get("ranks", [])
    first = report.run.get("failed_rank")
    order = sorted(ranks, key=lambda e: e.get("rank") != first)
    for e in order:
        if e.get("status") == "completed":
            continue
        label = f"run {e.get('status')} on rank {e.get('rank')}" + (" (first)" if e.get("rank") == first and len(ranks) > 1 else "")
        out.append(Text(f"{label}: {what(e)}".rstrip(": "), style="red" if e.get("rank") == first else "yellow"))
    return out


def verdict_line(report: Report) -> Text:
    v = report.verdict
    counts = {s: sum(1 for f in report.findings if f.severity == s) for s in ("fail", "warn", "info")}
    t = Text()
    t.append(f" {v.upper()} ", style=VERDICT_STYLE[v])
    t.append(f"  sftdoctor {report.command}: {counts['fail']} fail, {counts['warn']} warn, {counts['info']} info")
    t.append(f"  ({report.verdict_reason})", style="dim" if v != "inconclusive" else "bold")
    return t


def format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        shown = ", ".join(format_value(x) for x in v[:8])
        return f"[{shown}{', ...' if len(v) > 8 else ''}]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {format_value(x)}" for k, x in list(v.items())[:6]) + "}"
    return str(v)


def finding_panel(f) -> Panel:
    body = Table.grid(padding=(0, 1))
    body.add_column(style="bold", no_wrap=True)
    body.add_column()
    body.add_row("what", Text(f.message))
    for k, v in f.evidence.items():
        body.add_row(Text(k, style="dim"), Text(format_value(v)))
    if f.fix:
        body.add_row("fix", Text(f.fix, style="green"))
    # "[step 3]", "[batch]", "[checkpoint, step 40]": never "[step step 3]"
    if f.level == "step":
        where = f"step {f.step}" if f.step is not None else "step"
    else:
        where = f.level + (f", step {f.step}" if f.step else "")
    rank = f", rank {f.rank}" if f.rank is not None else ""
    title = Text.assemble((f" {f.severity.upper()} ", SEVERITY_STYLE[f.severity]), f" {f.id} ", (f"[{where}{rank}]", "dim"))
    return Panel(body, title=title, title_align="left", border_style=SEVERITY_STYLE[f.severity].split()[-1])


def token_classes(report: Report) -> dict[str, Any] | None:
    """metrics["token_classes"] with supervised prompt tokens shown as prompt: the classes are
    computed from the labels (a supervised token counts as response), so where labels-prompt-supervised
    found N supervised prompt tokens they move back to the prompt row; the table then agrees with the
    finding instead of saying "0 prompt tokens" beside it."""
    tc = report.metrics.get("token_classes")
    if not isinstance(tc, dict) or not tc:
        return tc
    f = report.get("labels-prompt-supervised")
    n = (f.evidence or {}).get("prompt_supervised_tokens") if f is not None else None
    if not isinstance(n, int) or n <= 0 or not isinstance(tc.get("response"), dict):
        return tc
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tc.items()}
    resp, prompt = out["response"], out.setdefault("prompt", {"tokens": 0, "supervised": 0})
    n = min(n, int(resp.get("supervised") or 0), int(resp.get("tokens") or 0))
    resp["tokens"], resp["supervised"] = resp.get("tokens", 0) - n, resp.get("supervised", 0) - n
    prompt["tokens"], prompt["supervised"] = (prompt.get("tokens") or 0) + n, (prompt.get("supervised") or 0) + n
    return out


def class_table(report: Report) -> Table | None:
    tc = token_classes(report)
    if not tc:
        return None
    t = Table(title="tokens by class", title_justify="left")
    for col in ("class", "tokens", "supervised", "supervised share"):
        t.add_column(col, justify="right" if col != "class" else "left")
    for name, row in tc.items():
        n, s = row.get("tokens", 0), row.get("supervised", 0)
        t.add_row(name, str(n), str(s), f"{s / n:.0%}" if n else "-")
    return t


def token_view(report: Report, max_rows: int = 2) -> Group:
    """Each token styled by class; supervised tokens underlined; a label that is not the input
    token (and not -100) shown in red brackets. Long runs of one class are collapsed."""
    parts: list[Any] = [Text("token view  ", style="bold") + legend()]
    for row in report.samples[:max_rows]:
        parts.append(Text(f"row {row['row']} ({row.get('length', len(row['ids']))} tokens)"
                          + (f": worst row of {row['finding']}" if row.get("finding") else ""), style="dim"))
        parts.append(row_text(row))
    return Group(*parts)


def legend() -> Text:
    t = Text()
    for i, name in enumerate(CLASS_NAMES):
        t.append(f" {name} ", style=CLASS_STYLE[i])
    t.append(" supervised ", style="underline")
    t.append(" [label≠input] ", style="bold red")
    return t


def row_text(row: dict[str, Any]) -> Text:
    ids, classes = row["ids"], row["classes"]
    labels = row.get("labels")

    def key(k):  # tokens of one run share class, supervision and (when odd) their label
        return classes[k], _sup(labels, k), labels[k] if _odd(labels, ids, k) else None

    t = Text()
    i, n = 0, len(ids)
    while i < n:
        j = i + 1
        while j < n and key(j) == key(i):
            j += 1
        is_pad = classes[i] == 3
        limit, edge = (PAD_COLLAPSE, PAD_EDGE) if is_pad else (TEXT_COLLAPSE, TEXT_EDGE)
        if j - i > limit:
            # show the edges of a long run and collapse its middle
            for k in range(i, i + edge):
                _token(t, row, k)
            cls, sup, odd_label = key(i)
            note = (" supervised" if sup else "") + (f", label {odd_label}" if odd_label is not None else "")
            t.append(f" [{CLASS_NAMES[cls]}{note} ×{j - i - 2 * edge}] ",
                     style=("bold red reverse" if odd_label is not None else "reverse " + CLASS_STYLE[cls]))
            for k in range(j - edge, j):
                _token(t, row, k)
        else:
            for k in range(i, j):
                _token(t, row, k)
        i = j
    return t


def _sup(labels, k) -> bool:
    return labels is not None and labels[k] != IGNORE_INDEX


def _odd(labels, ids, k) -> bool:
    return labels is not None and labels[k] != IGNORE_INDEX and labels[k] != ids[k]


def _token(t: Text, row: dict[str, Any], k: int) -> None:
    cls = row["classes"][k]
    style = CLASS_STYLE[cls] + (" underline" if _sup(row.get("labels"), k) else "")
    if k % 2:
        style += " on grey15"  # alternate a faint background: token borders stay visible, spaces stay spaces
    text = row["texts"][k].replace("\n", "↵\n") if row["texts"][k] else f"<{row['ids'][k]}>"
    t.append(text, style=style)
    if _odd(row.get("labels"), row["ids"], k):
        t.append(f"[{row['labels'][k]}]", style="bold red")


def logits_table(report: Report) -> Table | None:
    """diagnose: per dtype, are the logits finite, P(id 0) after the prompt, the top argmax token."""
    logits = report.metrics.get("logits")
    if not isinstance(logits, dict) or not logits:
        return None
    t = Table(title="logits by dtype", title_justify="left")
    for col in ("dtype", "finite", "P(id 0)", "P(pad)", "top argmax", "first non-finite module"):
        t.add_column(col)
    for dtype, row in logits.items():
        top = (row.get("argmax_top") or [{}])[0]
        t.add_row(Text(dtype + (" (served)" if row.get("served") else "")), "yes" if row.get("logits_finite") else "NO",
                  format_value(row.get("p_id0")), format_value(row.get("p_pad")),
                  Text(f"{top.get('token_id', '-')} {top.get('text', '')!r} {format_value(top.get('share', ''))}"),
                  Text(str(row.get("first_nonfinite_module") or "-")))
    return t


def generation_table(report: Report, rows: int = 4) -> Table | None:
    """diagnose: a few greedy outputs (text shown as plain Text: never parsed as markup)."""
    gens = report.metrics.get("generations")
    if not gens:
        return None
    dtype = gens[0].get("dtype")
    t = Table(title="greedy generations" + (f" ({dtype})" if dtype else ""), title_justify="left")
    for col in ("#", "output", "tokens", "stopped"):
        t.add_column(col)
    for k, g in enumerate(gens[:rows]):
        text = str(g.get("output", ""))
        t.add_row(str(k), Text(text[:80] + ("…" if len(text) > 80 else "")), str(g.get("tokens", "")),
                  "yes" if g.get("stopped") else "no")
    return t


def checks_line(report: Report) -> Text:
    counts: dict[str, int] = {}
    for c in report.checks:
        counts[c.status] = counts.get(c.status, 0) + 1
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    t = Text(f"checks: {parts or 'none ran'}", style="dim")
    skipped = [c for c in report.checks if c.status == "skipped" and c.reason != "ignored by configuration"]
    if skipped:
        # every check that did not run says why (grouped by reason, one line each)
        by_reason: dict[str, list[str]] = {}
        for c in skipped:
            by_reason.setdefault(c.reason or "no reason recorded", []).append(c.id)
        for reason, ids in by_reason.items():
            t.append(f"\n  not run: {', '.join(ids)}: {reason}", style="dim")
    return t

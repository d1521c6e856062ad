"""The self-contained HTML report: one file, inline CSS, PNG plots as data: URIs, a tiny hashed
inline script for the token inspector, and a Content-Security-Policy that forbids everything else.

Everything shown is read from the Report's plain data (findings, checks, metrics, samples, run,
environment), so `sftdoctor report run.json --html out.html` rebuilds the same page from JSON.
Untrusted text (dataset rows, token texts, paths, messages) only ever reaches the page through
Jinja's autoescape; no value is passed to the script except via escaped data- attributes.
"""
from __future__ import annotations

import base64
import hashlib
import math
import os
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

from sftdoctor.constants import CLASS_NAMES, IGNORE_INDEX
from sftdoctor.atomic import write_atomic
from sftdoctor.report import Report

from . import dataset_view, plots

TEMPLATES = Path(__file__).parent / "templates"
MAX_SAMPLE_ROWS = 8  # token-view rows shown
MAX_ROW_TOKENS = 2048  # tokens shown per row
RUN_COLLAPSE = 16  # a run of like tokens longer than this is folded behind an expander
RUN_HEAD, RUN_TAIL = 4, 2  # tokens left visible at the ends of a folded run
MAX_TABLE_ROWS = 50  # rows of a list-of-records table (evidence, metrics)
MAX_LIST_ITEMS = 24  # items of a list of scalars

# ---- root causes --------------------------------------------------------------------------
# Ranked by the Session (sftdoctor.session.root_causes, from each probe's declared family, priority
# and cause) and stored in the report: this renderer only reads them.
FAMILY_LABEL = {"learned": "learned (data/labels)", "numerical": "numerical (overflow/NaN)",
                "setup": "setup", "symptom": "symptom", "other": "other"}


def causes_view(report: Report) -> list[dict[str, Any]]:
    out = []
    for c in report.root_causes or []:
        family = c.get("family", "other")
        out.append(dict(c, family_label=FAMILY_LABEL.get(family, family), step=_shown(c.get("step"), c.get("level"))))
    return out


def shown_step(f) -> int | None:
    return _shown(f.step, f.level)


def _shown(step: int | None, level: str | None) -> int | None:
    """The step worth printing: a batch-level finding from the first batch carries no news in it."""
    return None if step is None or (level == "batch" and not step) else step


def families_line(causes: list[dict[str, Any]]) -> str:
    fams = [c["family"] for c in causes if c["family"] in ("learned", "numerical")]
    if not fams:
        return ""
    if set(fams) == {"learned"}:
        return "Evidence points to the learned family: the model was trained on the wrong targets."
    if set(fams) == {"numerical"}:
        return "Evidence points to the numerical family: values overflowed or went NaN."
    return "Evidence shows both families: wrong training targets and numerical overflow."


# ---- values: evidence and metrics formatted as tables, never raw JSON -----------------------
def fmt_number(v: Any, key: str = "") -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)  # ids and counts alike: no thousands separators (151643 is a token id)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan" if v != v else ("inf" if v > 0 else "-inf")  # as the JSON report spells them
        k = key.lower()
        if ("share" in k or "rate" in k or "fraction" in k or k.endswith("_pct")) and 0 <= v <= 1 and not k.endswith("_pct"):
            return f"{v:.1%}"
        if v == int(v) and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.4g}"
    return str(v)


def value_view(v: Any, key: str = "", depth: int = 0) -> dict[str, Any]:
    """A value as a small tree the template renders recursively:
    text | list (scalars) | table (list of records) | kv (mapping)."""
    if isinstance(v, dict):
        if not v:
            return {"t": "text", "v": "-"}
        if depth >= 3:
            return {"t": "text", "v": ", ".join(f"{k}: {v[k]}" for k in list(v)[:8])}
        return {"t": "kv", "rows": [(str(k), value_view(x, str(k), depth + 1)) for k, x in v.items()]}
    if isinstance(v, (list, tuple)):
        if not v:
            return {"t": "text", "v": "none"}
        if all(isinstance(x, dict) for x in v) and depth < 3:
            cols: list[str] = []
            for x in v[:MAX_TABLE_ROWS]:
                for k in x:
                    if k not in cols:
                        cols.append(str(k))
            rows = [[value_view(x.get(c), c, depth + 1) if c in x else {"t": "text", "v": ""} for c in cols]
                    for x in v[:MAX_TABLE_ROWS]]
            return {"t": "table", "cols": cols, "rows": rows, "more": max(0, len(v) - MAX_TABLE_ROWS)}
        items = [fmt_number(x, key) if not isinstance(x, (dict, list)) else str(x) for x in v[:MAX_LIST_ITEMS]]
        # long strings (tracebacks, generated text) read better as blocks than as chips
        kind = "lines" if any(len(x) > 60 or "\n" in x for x in items) else "list"
        return {"t": kind, "elems": items, "more": max(0, len(v) - MAX_LIST_ITEMS)}
    if isinstance(v, str):
        return {"t": "text", "v": v}
    if v is None:
        return {"t": "text", "v": "-"}
    return {"t": "text", "v": fmt_number(v, key)}


# ---- token view ---------------------------------------------------------------------------
def _at(seq, k):
    return seq[k] if seq is not None and k < len(seq) else None


def _token_view(row: dict[str, Any], k: int, id_text: dict[int, str]) -> dict[str, Any]:
    ids, texts, classes = row.get("ids") or [], row.get("texts") or [], row.get("classes") or []
    labels, attention = row.get("labels"), row.get("attention")
    tid, cls = ids[k], _at(classes, k)
    label = _at(labels, k)
    supervised = label is not None and label != IGNORE_INDEX
    odd = supervised and label != tid
    hidden = _at(attention, k) == 0 and cls != 3
    text = _at(texts, k) or ""
    shown = text.replace("\r", "␍").replace("\t", "⇥").replace("\n", "↵\n") if text else f"‹{tid}›"
    flags = [f"c{cls if cls in range(5) else 0}", "sup" if supervised else "ign"]
    if odd:
        flags.append("odd")
    if hidden:
        flags.append("hid")
    data = {"pos": k, "id": tid, "cls": CLASS_NAMES[cls] if cls in range(5) else str(cls),
            "label": "-100 (ignored)" if label == IGNORE_INDEX else ("-" if label is None else str(label))}
    if odd:
        data["label"] += f" ≠ input {_quote(id_text.get(label, ''))}"
    if _at(attention, k) is not None:
        data["att"] = str(_at(attention, k))
    for name, key in (("effective_target", "target"), ("token_loss", "loss"), ("grad_norm", "grad")):
        v = _at(row.get(name), k)
        if v is not None:
            data[key] = fmt_number(plots.num(v) if isinstance(v, str) else v)
    return {"text": shown, "flags": " ".join(flags), "data": data}


def _quote(s: str) -> str:
    return f"'{s}'" if s else ""


def _run_key(row: dict[str, Any], k: int):
    label = _at(row.get("labels"), k)
    sup = label is not None and label != IGNORE_INDEX
    odd = sup and label != row["ids"][k]
    return (_at(row.get("classes"), k), sup, odd, label if odd else None, _at(row.get("attention"), k) == 0)


def token_rows(report: Report) -> list[dict[str, Any]]:
    """report.samples as segments: single tokens, and folded runs of like tokens (same class,
    supervision, odd label, hidden) that keep a few tokens visible at each end."""
    # label id -> text, from the tokens the samples themselves hold (labels are ids of tokens)
    id_text: dict[int, str] = {}
    for row in report.samples:
        for i, t in zip(row.get("ids") or [], row.get("texts") or []):
            id_text.setdefault(i, t)
    out = []
    for n, row in enumerate(report.samples[:MAX_SAMPLE_ROWS]):
        ids = row.get("ids") or []
        if not ids:
            continue
        total = min(len(ids), MAX_ROW_TOKENS)
        segments: list[dict[str, Any]] = []
        i = 0
        while i < total:
            j = i + 1
            key = _run_key(row, i)
            while j < total and _run_key(row, j) == key:
                j += 1
            # fold long runs of padding, or of one repeated id (`!!!!`); real text stays readable
            foldable = key[0] == 3 or len(set(ids[i:j])) == 1
            if j - i > RUN_COLLAPSE and foldable:
                cls, sup, odd, label, hidden = key
                desc = f"{CLASS_NAMES[cls] if cls in range(5) else cls} ×{j - i - RUN_HEAD - RUN_TAIL}"
                desc += " supervised" if sup else ""
                if odd:
                    desc += f", label {label} {_quote(id_text.get(label, ''))}"
                segments += [{"kind": "tok", **_token_view(row, k, id_text)} for k in range(i, i + RUN_HEAD)]
                segments.append({"kind": "run", "desc": desc, "flags": f"c{cls if cls in range(5) else 0}" + (" sup" if sup else "") + (" odd" if odd else ""),
                                 "uid": f"r{n}-{i}",
                                 "tokens": [_token_view(row, k, id_text) for k in range(i + RUN_HEAD, j - RUN_TAIL)]})
                segments += [{"kind": "tok", **_token_view(row, k, id_text)} for k in range(j - RUN_TAIL, j)]
            else:
                segments += [{"kind": "tok", **_token_view(row, k, id_text)} for k in range(i, j)]
            i = j
        labels = row.get("labels") or []
        classes = row.get("classes") or []
        out.append({
            "row": row.get("row", n), "length": row.get("length", len(ids)), "shown": total,
            "cut": len(ids) - total, "segments": segments,
            "supervised": sum(1 for x in labels if x is not None and x != IGNORE_INDEX),
            "supervised_pad": sum(1 for x, c in zip(labels, classes) if c == 3 and x is not None and x != IGNORE_INDEX),
            "has_loss": row.get("token_loss") is not None,
        })
    return out


# ---- tables -------------------------------------------------------------------------------
def class_table(report: Report) -> dict[str, Any] | None:
    from .console import token_classes

    tc = token_classes(report)
    if not isinstance(tc, dict) or not tc:
        return None
    cols: list[str] = []
    for row in tc.values():
        for k in row if isinstance(row, dict) else []:
            if k not in cols:
                cols.append(k)
    rows = []
    for name, row in tc.items():
        row = row if isinstance(row, dict) else {}
        n, s = plots.num(row.get("tokens")), plots.num(row.get("supervised"))
        share = f"{s / n:.0%}" if n and s is not None else "-"
        rows.append({"name": str(name), "cls": f"c{CLASS_NAMES.index(name)}" if name in CLASS_NAMES else "",
                     "cells": [fmt_number(row.get(c), c) if row.get(c) is not None else "-" for c in cols],
                     "share": share, "bad": name == "pad" and bool(s)})
    return {"cols": cols, "rows": rows}


def argmax_rows(report: Report) -> list[dict[str, Any]]:
    hist = report.metrics.get("argmax_histogram")
    if not isinstance(hist, list):
        return []
    rows = []
    for h in hist[:20]:
        if not isinstance(h, dict):
            continue
        share = plots.num(h.get("share")) or 0.0
        rows.append({"id": h.get("token_id", "?"), "text": str(h.get("text", "")), "share": fmt_number(share, "share"),
                     "width": f"{max(0.0, min(1.0, share)) * 100:.1f}"})
    return rows


def checks_view(report: Report) -> dict[str, Any]:
    order = {"fail": 0, "warn": 1, "pass": 2, "skipped": 3}
    checks = sorted(report.checks, key=lambda c: (order.get(c.status, 9), c.id))
    counts: dict[str, int] = {}
    for c in checks:
        counts[c.status] = counts.get(c.status, 0) + 1
    from sftdoctor.internal import collect

    errors = [{"message": str(e.get("message") or e.get("error") or ""), "affects": ", ".join(map(str, e.get("affects") or []))}
              for e in collect(report)]
    return {"rows": checks, "counts": [(s, counts[s]) for s in sorted(counts, key=lambda s: order.get(s, 9))],
            "errors": errors}


def run_view(report: Report) -> dict[str, Any] | None:
    run = report.run or {}
    if not run:
        return None
    status = str(run.get("status", "unknown"))
    err = run.get("error")
    error = None
    if isinstance(err, dict):
        where = err.get("where")
        if isinstance(where, dict):
            where = ":".join(str(where[k]) for k in ("file", "line", "function") if where.get(k) is not None) or str(where)
        elif isinstance(where, list):
            where = " → ".join(str(w) for w in where[-4:])
        if not where and err.get("file"):  # runner.error_info: the user's own frame
            where = f"{err['file']}:{err.get('line')} in {err.get('function')}"
        etype = str(err.get("type", ""))
        if run.get("failed_rank") is not None:  # several ranks: the first failing one's error
            etype = f"{etype} (rank {run['failed_rank']}, the first rank to fail)"
        error = {"type": etype, "message": str(err.get("message", "")), "where": str(where) if where else ""}
    elif err:
        error = {"type": "", "message": str(err), "where": ""}
    rest = {k: v for k, v in run.items() if k not in ("status", "error")}
    return {"status": status, "ok": status == "completed", "error": error,
            "details": value_view(rest) if rest else None}


def environment_view(report: Report) -> dict[str, Any] | None:
    env = dict(report.environment or {})
    if not env:
        return None
    argv = env.pop("argv", None)
    command = env.pop("command_line", None) or (shlex.join(str(a) for a in argv) if isinstance(argv, list) else argv)
    return {"command": command, "table": value_view(env) if env else None}


def other_metrics(report: Report) -> list[tuple[str, dict[str, Any]]]:
    """Metrics the page has no dedicated view for, as generic tables (batch, tokenizer, model...)."""
    special = {"token_classes", "steps", "activations", "argmax_histogram", "fp16_forecast", "dataset"}
    return [(k, value_view(v)) for k, v in report.metrics.items() if k not in special and v not in (None, {}, [])]


def step_summary(steps: list[dict]) -> list[dict[str, str]] | None:
    """First / last / min / max of the per-step series: the numbers behind the plot."""
    if not steps:
        return None
    out = []
    for key in ("loss", "grad_norm", "loss_scale", "lr", "supervised_tokens"):
        vals = [plots.num(s.get(key)) for s in steps if isinstance(s, dict)]
        present = [v for v in vals if v is not None]
        if not present:
            continue
        fin = [v for v in present if math.isfinite(v)]
        out.append({"name": key, "first": fmt_number(present[0]), "last": fmt_number(present[-1]),
                    "min": fmt_number(min(fin)) if fin else "-", "max": fmt_number(max(fin)) if fin else "-",
                    "nonfinite": str(len(present) - len(fin))})
    return out or None


def class_step_table(steps: list[dict]) -> dict[str, Any] | None:
    """The per-token-class numbers of the last step that has them (loss, gradient at the logits...)."""
    for rec in reversed(steps):
        by_class = rec.get("by_class")
        if isinstance(by_class, dict) and by_class:
            cols: list[str] = []
            for row in by_class.values():
                for k in row if isinstance(row, dict) else []:
                    if k not in cols:
                        cols.append(str(k))
            order = {c: i for i, c in enumerate(CLASS_NAMES)}
            rows = [{"name": str(name), "cls": f"c{order[name]}" if name in order else "",
                     "cells": [fmt_number(plots.num(row.get(c)) if isinstance(row.get(c), str) else row.get(c), c)
                               if isinstance(row, dict) and row.get(c) is not None else "-" for c in cols]}
                    for name, row in sorted(by_class.items(), key=lambda kv: order.get(kv[0], 99))]
            return {"step": rec.get("step"), "cols": cols, "rows": rows}
    return None


def activation_rows(report: Report, limit: int = 12) -> list[dict[str, str]]:
    """The modules closest to (or past) their dtype's limit."""
    summary = plots.activation_summary(report.metrics.get("activations") or [])

    def ratio(r):
        if not r["finite"]:
            return math.inf
        return (r["max_abs"] or 0) / r["limit"] if r["limit"] else 0

    rows = sorted(summary, key=ratio, reverse=True)[:limit]
    return [{"module": r["module"], "phase": r["phase"], "dtype": str(r["dtype"] or "-"),
             "max_abs": "non-finite" if not r["finite"] else fmt_number(r["max_abs"]),
             "limit": fmt_number(r["limit"]) if r["limit"] else "-",
             # NaN is not an overflow (NaN weights/inputs): say which non-finite value it is
             "ratio": (("NaN" if r.get("nan") else "overflow (inf)") if not r["finite"]
                       else (f"{ratio(r):.1%}" if r["limit"] else "-")),
             "bad": not r["finite"] or ratio(r) >= 0.25,
             "step": _or_dash(r["step"] if r["finite"] else r["bad_step"])}
            for r in rows]


def _or_dash(v: Any) -> str:
    return "-" if v is None else str(v)


# ---- assembling ---------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _environment():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    return env


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def csp(css: str, script: str) -> str:
    """Nothing may load; the one stylesheet and the one script run only by their hashes."""
    return ("default-src 'none'; img-src data:; "
            f"style-src '{_sha256(css)}'; script-src '{_sha256(script)}'; "
            "base-uri 'none'; form-action 'none'")


def build_context(report: Report) -> dict[str, Any]:
    counts = {s: sum(1 for f in report.findings if f.severity == s) for s in ("fail", "warn", "info")}
    causes = causes_view(report)
    family_of = {c["id"]: c.get("family", "other") for c in causes}
    metrics = report.metrics or {}
    steps = [s for s in (metrics.get("steps") or []) if isinstance(s, dict)]
    activations = metrics.get("activations") or []
    figures = {
        "steps": plots.steps_plot(steps),
        "class_grad": plots.class_grad_plot(steps),
        "activations": plots.activations_plot(activations),
    }
    findings = []
    for f in report.by_severity():
        findings.append({"f": f, "step": shown_step(f), "evidence": value_view(f.evidence) if f.evidence else None,
                         "family": FAMILY_LABEL.get(family_of.get(f.id, "other"), "") if f.severity == "fail" else "",
                         "repeats": report.repeats.get(f.id, 0)})
    forecast = metrics.get("fp16_forecast")
    if isinstance(forecast, dict) and forecast.get("safe") and any(
            isinstance(a, dict) and a.get("finite") is False for a in activations):
        # a forecast of fp16 from values that are already non-finite says nothing: never print "safe"
        forecast = {**forecast, "safe": None,
                    "note": "not meaningful: the forward is already non-finite (NaN/inf) in its own dtype"}
    return {
        "report": report, "verdict": report.verdict, "verdict_reason": report.verdict_reason, "counts": counts, "causes": causes,
        "checks_ran": sum(1 for c in report.checks if c.status != "skipped"),
        "checks_skipped": sum(1 for c in report.checks if c.status == "skipped"),
        "families_line": families_line(causes), "findings": findings, "run": run_view(report),
        "class_table": class_table(report), "token_rows": token_rows(report),
        "argmax": argmax_rows(report), "figures": figures, "step_summary": step_summary(steps),
        "n_steps": len(steps), "class_step": class_step_table(steps), "activation_rows": activation_rows(report),
        "forecast": value_view(forecast) if forecast not in (None, {}, []) else None,
        "checks": checks_view(report), "environment": environment_view(report),
        "other_metrics": other_metrics(report), "class_names": CLASS_NAMES,
        "dataset": dataset_view.html(report),  # inspect-batch --batches (templates/dataset.html)
    }


def render_html(report: Report) -> str:
    """The whole report as one self-contained HTML page."""
    env = _environment()
    css = (TEMPLATES / "report.css").read_text(encoding="utf-8")
    script = (TEMPLATES / "report.js").read_text(encoding="utf-8")
    ctx = build_context(report)
    # css/script are our own package files (never user data); the CSP allows exactly these bytes
    from sftdoctor.report import SCHEMA

    return env.get_template("report.html").render(css=css, script=script, csp=csp(css, script), schema=SCHEMA, **ctx)


def write_html(report: Report, path: str | os.PathLike) -> Path:
    """Render and write the report atomically (a reader never sees half a page)."""
    return write_atomic(path, render_html(report))

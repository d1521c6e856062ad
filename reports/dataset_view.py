"""The whole-dataset part of a report (inspect-batch --batches): a compact summary of the per-row
statistics, each dataset-level finding with its rate, and histograms for the HTML page.

Reads only report.metrics["dataset"], report.findings and report.samples (JSON round-trips), so
`sftdoctor report out.json --html` draws the same page.
"""
from __future__ import annotations

from typing import Any

from sftdoctor.report import Report


def _n(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else ("-" if v is None else str(v))


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"


def _dist(d: dict | None) -> str:
    if not isinstance(d, dict):
        return "-"
    return f"median {_n(d.get('p50'))}, p90 {_n(d.get('p90'))}, p99 {_n(d.get('p99'))}, min {_n(d.get('min'))}, max {_n(d.get('max'))}"


def coverage_line(report: Report) -> str | None:
    """'partial: ...' when not every row was checked (Ctrl-C, a collator error, the cap)."""
    run = report.run or {}
    d = (report.metrics or {}).get("dataset") or {}
    if "rows_checked" not in run and not d:
        return None
    rows = run.get("rows_checked", d.get("rows"))
    total = run.get("rows_in_dataset")
    of = f" of {_n(total)}" if isinstance(total, int) else ""
    if run.get("partial"):
        why = run.get("note") or run.get("cap") or run.get("coverage") or ""
        return f"PARTIAL: {_n(rows)}{of} rows checked" + (f" ({why})" if why else "")
    return f"{_n(rows)}{of} rows checked in {_n(run.get('batches_checked', d.get('batches')))} batches"


def summary_rows(report: Report) -> list[tuple[str, str]]:
    d = (report.metrics or {}).get("dataset")
    if not isinstance(d, dict):
        return []
    rows = d.get("rows") or 0
    dup = d.get("duplicates") or {}
    sup_rows = d.get("rows_supervised") or 0
    out = [
        ("rows / batches", f"{_n(rows)} / {_n(d.get('batches'))}"),
        ("length (real tokens)", _dist(d.get("length"))),
        ("supervised tokens per row", _dist(d.get("supervised"))),
        ("prompt / answer split", f"{d.get('prompt_tokens_mean', '-')} prompt tokens per row on average; "
                                  f"{_pct(d.get('supervised_share_of_tokens'))} of real tokens supervised"),
        ("rows with no supervised token", f"{_n(d.get('rows_no_supervised'))} ({_pct((d.get('rows_no_supervised') or 0) / rows if rows else None)})"),
        ("supervised rows ending in EOS", f"{_n(d.get('rows_with_supervised_eos'))} of {_n(sup_rows)} ({_pct(d.get('rows_with_supervised_eos', 0) / sup_rows if sup_rows else None)})"),
        ("pad share (wasted compute)", f"{_pct((d.get('pad_share') or {}).get('mean'))} of positions; worst batch "
                                       f"{_pct((d.get('pad_share') or {}).get('max'))} (batch {_n((d.get('pad_share') or {}).get('max_batch'))})"),
        ("exact-duplicate rows", f"{_n(dup.get('rows_repeated', 0))}" + ("" if dup.get("complete", True) else f" (first {_n(dup.get('rows_hashed'))} rows hashed)")),
    ]
    checks_alone = f"checks alone {_n(int(d.get('check_rows_per_s') or 0))} rows/s"
    if report.command == "watch":  # the rows came at training speed: only the checks' own speed says anything
        if d.get("check_rows_per_s"):
            out.append(("speed", checks_alone))
    elif d.get("rows_per_s"):
        out.append(("speed", f"{_n(int(d['rows_per_s']))} rows/s overall; {checks_alone}"))
    if d.get("bad_batches"):
        out.append(("batches not checked", f"{_n(d['bad_batches'])}: " + "; ".join(d.get("bad_batch_reasons") or [])))
    return out


def rate_rows(report: Report) -> list[dict[str, Any]]:
    """One row per dataset-level finding: id, severity, rows affected, rate, worst example."""
    out = []
    for f in report.by_severity():
        if f.level != "dataset":
            continue
        ev = f.evidence or {}
        ex = (ev.get("examples") or [None])[0]
        worst = None
        if isinstance(ex, dict):
            worst = ex.get("row") if "row" in ex else (ex.get("rows") or [None])[0]
        out.append({"id": f.id, "severity": f.severity, "rows": ev.get("rows_affected"), "total": ev.get("rows_total"),
                    "rate": _pct(ev.get("share_of_rows")), "worst": worst})
    return out


# ---- console -----------------------------------------------------------------------------------
def console(report: Report) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    rows = summary_rows(report)
    if not rows:
        return []
    out: list[Any] = []
    line = coverage_line(report)
    if line:
        out.append(Text(line, style="bold yellow" if report.run.get("partial") else "dim"))
    t = Table(title="dataset", title_justify="left", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    out.append(t)
    rates = rate_rows(report)
    if rates:
        r = Table(title="findings by rate", title_justify="left")
        for c in ("id", "severity", "rows", "rate", "worst row"):
            r.add_column(c, justify="right" if c in ("rows", "rate", "worst row") else "left")
        for x in rates:
            r.add_row(x["id"], x["severity"], f"{_n(x['rows'])} / {_n(x['total'])}", x["rate"], _n(x["worst"]))
        out.append(r)
    return out


# ---- HTML --------------------------------------------------------------------------------------
def _hist_plot(hist: dict | None, title: str, xlabel: str, color: str, marker: float | None = None) -> str | None:
    from . import plots

    if not isinstance(hist, dict) or not hist.get("counts"):
        return None
    edges, counts = hist["edges"], hist["counts"]
    fig, (ax,) = plots._figure(1, height=2.4)
    widths = [edges[i + 1] - edges[i] for i in range(len(counts))]
    ax.bar(edges[:len(counts)], counts, width=widths, align="edge", color=color, edgecolor="white", linewidth=0.4)
    if marker is not None:
        ax.axvline(marker, color=plots.LIMIT, linewidth=1.2, linestyle="--", label=f"max_length {marker:,.0f}")
        ax.legend(loc="upper right")
    ax.set_title(plots._safe(title))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    return plots._png(fig)


def html(report: Report) -> dict[str, Any] | None:
    rows = summary_rows(report)
    if not rows:
        return None
    d = report.metrics["dataset"]
    from . import plots

    limit = d.get("max_length") if isinstance(d.get("max_length"), (int, float)) else None
    try:
        figures = {
            "length": _hist_plot(d.get("length_histogram"), "Sequence length per row", "real tokens", plots.INK, limit),
            "supervised": _hist_plot(d.get("supervised_histogram"), "Supervised tokens per row", "supervised tokens",
                                     plots.CLASS_COLORS["response"]),
        }
    except Exception:  # a plot never costs the page
        figures = {}
    worst = [{"row": s.get("row"), "finding": s.get("finding")} for s in report.samples if s.get("finding")]
    return {"summary": rows, "coverage": coverage_line(report), "partial": bool(report.run.get("partial")),
            "rates": rate_rows(report), "figures": figures, "worst": worst}

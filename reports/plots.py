"""Plots for the HTML report: matplotlib (Agg) figures returned as base64 PNG strings.

Every function takes plain report data (lists of dicts from report.metrics), returns None when
there is nothing to draw, and never raises on odd values: "nan"/"inf" strings, None and missing
keys are expected (other producers fill these keys). Long series are downsampled so that a
2,000-step run costs the same few kilobytes as a 200-step one.
"""
from __future__ import annotations

import base64
import io
import math
import re
from typing import Any, Iterable

from sftdoctor.constants import CLASS_NAMES

MAX_POINTS = 600  # points per plotted series after downsampling
# One palette for the token view and the plots (keep in step with report.css).
CLASS_COLORS = {"prompt": "#8a8f98", "response": "#1f9d55", "eos": "#b83280", "pad": "#6b7280", "special": "#2b6cb0"}
INK, MUTED, GRID, BAD, LIMIT = "#1f2933", "#7b8794", "#e4e7eb", "#d64545", "#c05621"

_STYLE = {
    "font.size": 9.5,
    "axes.edgecolor": "#9aa5b1",
    "axes.labelcolor": INK,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": GRID,
    "grid.linewidth": 0.8,
    "xtick.color": MUTED,
    "ytick.color": MUTED,
    "legend.frameon": False,
    "legend.fontsize": 8.5,
}


def _safe(text) -> str:
    """Report strings used as plot labels: a `$` must not start mathtext."""
    return str(text).replace("$", r"\$")


def num(value: Any) -> float | None:
    """A float from report data: 'nan'/'inf'/'-inf' strings (JSON-sanitised) become floats,
    anything that is not a number becomes None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # float() reads "nan", "inf", "-inf"
        except ValueError:
            return None
    return None


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _figure(rows: int = 1, height: float = 2.6, sharex: bool = True):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(_STYLE):
        fig, axes = plt.subplots(rows, 1, figsize=(9.0, height * rows), sharex=sharex, squeeze=False)
    return fig, [a[0] for a in axes]


def _png(fig) -> str:
    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    with matplotlib.rc_context(_STYLE):
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _styled(fn):
    """Run a plotting function under the report's rc style."""
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(_STYLE):
            return fn(*args, **kwargs)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def downsample(xs: list[float], ys: list[float | None], max_points: int = MAX_POINTS):
    """Bucket a series into at most max_points buckets: (x, mean, low, high) of the finite values
    per bucket. Non-finite values are left out here; callers mark them separately."""
    n = len(xs)
    if n == 0:
        return [], [], [], []
    size = max(1, math.ceil(n / max_points))
    bx, mean, low, high = [], [], [], []
    for start in range(0, n, size):
        vals = [y for y in ys[start:start + size] if finite(y)]
        if not vals:
            continue
        bx.append(xs[start + (min(size, n - start) - 1) // 2])
        mean.append(sum(vals) / len(vals))
        low.append(min(vals))
        high.append(max(vals))
    return bx, mean, low, high


def _series(steps: list[dict], key: str) -> tuple[list[float], list[float | None]]:
    xs, ys = [], []
    for i, s in enumerate(steps):
        x = num(s.get("step"))
        xs.append(x if x is not None else float(i))
        ys.append(num(s.get(key)))
    return xs, ys


def _plot_series(ax, xs, ys, color, label=None, log=False):
    """Line of the (downsampled) series with a min-max band; non-finite values as red ticks."""
    bx, mean, low, high = downsample(xs, ys)
    if log:
        keep = [i for i, v in enumerate(low) if v > 0]
        bx, mean, low, high = ([seq[i] for i in keep] for seq in (bx, mean, low, high))
    if bx:
        few = len(bx) <= 60  # a handful of probed steps: show the points, not just a line
        ax.plot(bx, mean, color=color, linewidth=1.4, label=label, marker="o" if few else None, markersize=3.5)
        if any(lo != hi for lo, hi in zip(low, high)):
            ax.fill_between(bx, low, high, color=color, alpha=0.15, linewidth=0)
    bad = [x for x, y in zip(xs, ys) if y is not None and not math.isfinite(y)]
    if bad:
        # one marker per plotted bucket is enough to see where it happened
        step = max(1, len(bad) // MAX_POINTS)
        marks = bad[::step]
        ax.plot(marks, [1.0] * len(marks), linestyle="none", marker="|", markersize=10, color=BAD,
                transform=ax.get_xaxis_transform(), label="non-finite" if label is None else f"{label} non-finite")
    if log and bx:
        ax.set_yscale("log")
    return bool(bx or bad)


def _xlim(ax, xs) -> None:
    """The full step range with a little room, so points at the ends are not cut in half."""
    if len(xs) > 1 and min(xs) < max(xs):
        pad = 0.02 * (max(xs) - min(xs))
        ax.set_xlim(min(xs) - pad, max(xs) + pad)


@_styled
def steps_plot(steps: list[dict]) -> str | None:
    """Loss and gradient norm per step (and the loss scale / learning rate when logged)."""
    if not steps:
        return None
    panels = [("loss", "loss", False, "#2b6cb0"), ("grad_norm", "gradient norm", True, "#c05621")]
    for key, title, log, color in (("loss_scale", "loss scale (GradScaler)", True, "#6b46c1"), ("lr", "learning rate", False, "#2f855a")):
        if any(num(s.get(key)) is not None for s in steps):
            panels.append((key, title, log, color))
    panels = [p for p in panels if any(s.get(p[0]) is not None for s in steps)]
    if not panels:
        return None
    fig, axes = _figure(len(panels), height=2.1)
    for ax, (key, title, log, color) in zip(axes, panels):
        xs, ys = _series(steps, key)
        _plot_series(ax, xs, ys, color, log=log)
        ax.set_title(title)
        if any(y is not None and not math.isfinite(y) for y in ys):
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        _xlim(ax, xs)
        if not log:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    axes[-1].set_xlabel("step")
    return _png(fig)


@_styled
def class_grad_plot(steps: list[dict], key: str = "grad_norm") -> str | None:
    """One line per token class: the gradient norm reaching the logits of that class, per step."""
    classes: list[str] = []
    for s in steps or []:
        for c, v in (s.get("by_class") or {}).items():
            if isinstance(v, dict) and v.get(key) is not None and c not in classes:
                classes.append(c)
    if not classes:
        return None
    order = {c: i for i, c in enumerate(CLASS_NAMES)}
    classes.sort(key=lambda c: order.get(c, 99))
    fig, (ax,) = _figure(1, height=2.8)
    drawn = False
    for c in classes:
        xs, ys = [], []
        for i, s in enumerate(steps):
            x = num(s.get("step"))
            xs.append(x if x is not None else float(i))
            ys.append(num(((s.get("by_class") or {}).get(c) or {}).get(key)))
        positive = [y for y in ys if finite(y) and y > 0]
        if not positive and not any(y is not None and not math.isfinite(y) for y in ys):
            continue
        drawn |= _plot_series(ax, xs, ys, CLASS_COLORS.get(c, INK), label=_safe(c), log=True)
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    _xlim(ax, [num(s.get("step")) for s in steps if num(s.get("step")) is not None])  # the loss plot's axis
    ax.set_title("gradient norm at the logits, per token class")
    ax.set_xlabel("step")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)")


def layer_of(module: str) -> int | None:
    m = _LAYER.search(module or "")
    return int(m.group(1)) if m else None


def activation_summary(activations: Iterable[dict]) -> list[dict]:
    """Per (module, phase, dtype): the largest finite |value| seen over all steps and its step,
    whether it was ever non-finite (and first at which step), the dtype and its limit. Modules keep
    the order they first appeared in (forward call order)."""
    out: dict[tuple[str, str, str], dict] = {}
    for a in activations or []:
        if not isinstance(a, dict):
            continue
        key = (str(a.get("module", "?")), str(a.get("phase") or "forward"), str(a.get("dtype") or ""))
        v = num(a.get("max_abs"))
        rec = out.setdefault(key, {"module": key[0], "phase": key[1], "dtype": a.get("dtype"), "max_abs": None,
                                   "finite": True, "limit": num(a.get("limit")), "step": None, "bad_step": None})
        if a.get("finite") is False or (v is not None and not math.isfinite(v)):
            if rec["finite"]:
                rec["finite"], rec["bad_step"] = False, a.get("step")
                rec["nan"] = v is not None and v != v  # NaN is not an overflow: the renderer says which
        elif finite(v) and (rec["max_abs"] is None or v > rec["max_abs"]):
            rec["max_abs"], rec["step"] = v, a.get("step")
        if rec["limit"] is None:
            rec["limit"] = num(a.get("limit"))
    return list(out.values())


@_styled
def activations_plot(activations: list[dict]) -> str | None:
    """Max |activation| per module in model order (log scale) against the dtype's limit;
    non-finite modules as red crosses at the top."""
    summary = activation_summary(activations)
    if not summary:
        return None
    modules: list[str] = []
    for r in summary:
        if r["module"] not in modules:
            modules.append(r["module"])
    index = {m: i for i, m in enumerate(modules)}
    fig, (ax,) = _figure(1, height=3.2)
    palette = ["#2b6cb0", "#6b46c1", "#2f855a", "#b7791f", "#4a5568"]
    top = 1.0
    series = sorted({(r["phase"], str(r["dtype"] or "")) for r in summary})
    for n, (phase, dtype) in enumerate(series):
        rows = [r for r in summary if (r["phase"], str(r["dtype"] or "")) == (phase, dtype)]
        name = f"{phase} {dtype}".strip() if len({d for _, d in series}) > 1 else phase
        pts = [(index[r["module"]], r["max_abs"]) for r in rows if finite(r["max_abs"]) and r["max_abs"] > 0]
        color = palette[n % len(palette)]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=0.9, color=color, label=_safe(f"max |{name}|"))
            top = max(top, max(ys))
        bad = [index[r["module"]] for r in rows if not r["finite"]]
        if bad:
            y = 0.97 - 0.06 * n  # one row of crosses per series, so forward and backward do not overlap
            ax.plot(bad, [y] * len(bad), linestyle="none", marker="x", markersize=6, color=BAD, alpha=1 - 0.35 * (n % 2),
                    transform=ax.get_xaxis_transform(), label=_safe(f"non-finite ({name})"))
    limits = sorted({(r["dtype"], r["limit"]) for r in summary if finite(r["limit"])}, key=lambda t: t[1])
    for dtype, limit in limits[:3]:
        ax.axhline(limit, color=LIMIT, linestyle="--", linewidth=1.1, label=_safe(f"{dtype} max {limit:g}"))
        top = max(top, limit)
    ax.set_yscale("log")
    ax.set_ylim(top=top * 8)
    # x ticks: the first module of each layer, labelled with the layer number
    ticks, labels, seen = [], [], set()
    for i, m in enumerate(modules):
        layer = layer_of(m)
        if layer is not None and layer not in seen:
            seen.add(layer)
            ticks.append(i)
            labels.append(str(layer))
    if ticks:
        every = max(1, math.ceil(len(ticks) / 32))
        ax.set_xticks(ticks[::every], labels[::every])
        ax.set_xlabel("layer (modules in forward order)")
    else:
        ax.set_xlabel("module (forward order)")
    ax.set_title("largest |activation| per module against the dtype limit")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)

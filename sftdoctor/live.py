"""What `sftdoctor watch` shows while the script trains: one status line (step, the RAW loss of
that micro-step, not a logger's filtered average, grad norm, loss scale) and each new finding the
moment it appears, a fail with its fix. On a terminal the status line updates in place (rich);
elsewhere (CI logs, nohup) it prints plain lines, at the probed steps only.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from .findings import Finding

SEVERITY_STYLE = {"fail": "bold red", "warn": "yellow", "info": "cyan"}
REFRESH_SECONDS = 0.25  # at most this often on a terminal


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.4g}"
    return str(x)


def step_text(row: dict[str, Any], optimizer_steps: int) -> str:
    loss = f"loss {fmt(row.get('loss'))}"
    if row.get("accum_micro", 1) > 1:
        # gradient accumulation with the script's own loss: the sum of what it gave .backward() since the
        # last optimizer step, i.e. the optimizer-step loss a `logged += loss.item()` loop prints
        loss = f"loss {fmt(row.get('accum_loss'))} (step, {row['accum_micro']} micro-batches)"
    parts = [f"step {row.get('step')}", f"opt {optimizer_steps}", loss, f"grad_norm {fmt(row.get('grad_norm'))}"]
    if row.get("loss_scale") is not None:
        parts.append(f"scale {fmt(row.get('loss_scale'))}")
    if row.get("lr") is not None:
        parts.append(f"lr {fmt(row.get('lr'))}")
    return "  ".join(parts)


class LiveView:
    """Prints watch progress. `rich` on a terminal, plain lines otherwise (or when plain=True)."""

    def __init__(self, stream: TextIO | None = None, *, plain: bool | None = None, quiet: bool = False,
                 rank: int | None = None):
        self.stream = stream or sys.stdout
        is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.plain = (not is_tty) if plain is None else plain
        self.quiet = quiet
        self.prefix = f"[rank {rank}] " if rank is not None else ""
        self.show_steps = rank in (None, 0)
        self.counts = {"fail": 0, "warn": 0, "info": 0}
        self._live = None
        self._console = None
        self._last_refresh = 0.0
        self._group: list = [None, 0.0, 0]  # [optimizer step, sum of backward losses, micro-steps] (see _accumulate)
        if not self.plain:
            from rich.console import Console

            self._console = Console(file=self.stream, soft_wrap=True)

    # ---- events -----------------------------------------------------------------------------
    def started(self, target: str) -> None:
        self._line(f"sftdoctor watch: running {target}", style="bold")

    def step(self, row: dict[str, Any], optimizer_steps: int) -> None:
        if self.quiet or not self.show_steps:
            return
        row = self._accumulate(row, optimizer_steps)
        loss = row.get("loss")
        bad = isinstance(loss, float) and not math.isfinite(loss)
        if self.plain:
            if row.get("full") or bad:  # probed steps only: a readable log, not one line per micro-step
                self._line("sftdoctor: " + step_text(row, optimizer_steps))
            return
        now = time.monotonic()
        if now - self._last_refresh >= REFRESH_SECONDS or row.get("full") or bad:
            self._last_refresh = now
            self._status(row, optimizer_steps)

    def _accumulate(self, row: dict[str, Any], optimizer_steps: int) -> dict[str, Any]:
        """Sum the losses given to .backward() over the micro-steps of one optimizer step, when the
        loss is the script's own (the model returned none): under accumulation each is loss / N."""
        if optimizer_steps != self._group[0]:
            self._group = [optimizer_steps, 0.0, 0]
        b = row.get("backward_loss")
        if row.get("loss_source") != "backward" or not isinstance(b, (int, float)):
            return row
        self._group[1] += float(b)
        self._group[2] += 1
        return dict(row, accum_loss=self._group[1], accum_micro=self._group[2])

    def finding(self, f: Finding) -> None:
        self.counts[f.severity] = self.counts.get(f.severity, 0) + 1
        where = f"{f.level}" + (f", step {f.step}" if f.step is not None else "")
        head = f"{self.prefix}{f.severity.upper()} {f.id} ({where}): {f.message}"
        if self.plain:
            self._line("sftdoctor: " + head)
            if f.severity == "fail" and f.fix:
                self._line(f"sftdoctor:   fix: {f.fix}")
            return
        self._line(head, style=SEVERITY_STYLE.get(f.severity))
        if f.severity == "fail" and f.fix:
            self._line(f"  fix: {f.fix}")

    def note(self, text: str) -> None:
        self._line(("sftdoctor: " if self.plain else "") + self.prefix + text)

    def close(self) -> None:
        if self._live is not None:
            try:
                self._live.stop()
            finally:
                self._live = None

    # ---- output ------------------------------------------------------------------------------
    def _line(self, text: str, style: str | None = None) -> None:
        from .textsafe import terminal_safe

        text = terminal_safe(text)  # finding messages quote dataset text and token strings
        if self._console is not None:
            from rich.text import Text

            self._console.print(Text(text, style=style or ""))  # printed above the live status line
        else:
            print(text, file=self.stream, flush=True)

    def _status(self, row: dict[str, Any], optimizer_steps: int) -> None:
        from rich.live import Live
        from rich.text import Text

        t = Text(f"sftdoctor  {step_text(row, optimizer_steps)}  ", style="bold")
        t.append(f"fail {self.counts['fail']}", style="red" if self.counts["fail"] else "green")
        t.append(f"  warn {self.counts['warn']}", style="yellow" if self.counts["warn"] else "")
        if self._live is None:
            # transient: the status line disappears at the end; findings stay printed above it
            self._live = Live(t, console=self._console, auto_refresh=False, transient=True,
                              redirect_stdout=True, redirect_stderr=False)  # the script's prints go above it
            self._live.start()
        self._live.update(t, refresh=True)

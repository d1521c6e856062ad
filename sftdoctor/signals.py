"""SIGTERM and SIGHUP end a run the way Ctrl-C does, so the report is still written.

`timeout`, Slurm, Kubernetes and a closed ssh session end jobs with SIGTERM / SIGHUP, whose
default action kills the process at once: no report. Inside terminate_as_interrupt() they raise
Terminated (a KeyboardInterrupt), which every path that handles Ctrl-C already turns into an
"interrupted" report; its exit code is 128 + the signal number, as the shell reports a killed job.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(KeyboardInterrupt):
    def __init__(self, signum: int):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"{self.signal_name} received")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside: SIGTERM/SIGHUP raise Terminated in the main thread (once; a repeated signal
    while the report is being written is ignored). A signal the parent set to be ignored (nohup
    ignores SIGHUP) stays ignored. Handlers are restored on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if fired:  # the first one is already unwinding to the report: let it finish
            return
        fired.append(signum)
        raise Terminated(signum)

    saved = {}
    for s in SIGNALS:
        try:
            old = signal.getsignal(s)
            if old == signal.SIG_IGN:
                continue
            saved[s] = old
            signal.signal(s, handler)
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for s, old in saved.items():
            try:
                signal.signal(s, old if old is not None else signal.SIG_DFL)
            except (ValueError, OSError, TypeError):
                pass

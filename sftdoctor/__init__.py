"""sftdoctor: find out why a supervised fine-tune went wrong, with evidence.

    import sftdoctor
    report = sftdoctor.inspect_batch(batch, tokenizer)   # batch-level probes
    report.raise_for_failures()
"""
from __future__ import annotations

__version__ = "0.1.0"

from .api import inspect_batch
from .errors import FailuresFound, UserError
from .findings import CheckResult, Finding
from .report import Report

__all__ = ["inspect_batch", "Report", "Finding", "CheckResult", "UserError", "FailuresFound", "__version__"]


def __getattr__(name):  # lazy: `attach` pulls in the step hooks only when used
    if name == "attach":
        from .attach import attach

        # importing the submodule bound `sftdoctor.attach` to the module: rebind it to the function
        globals()["attach"] = attach
        return attach
    raise AttributeError(name)

"""sftdoctor: find out why a supervised fine-tune went wrong, with evidence.

    import sftdoctor
    report = sftdoctor.inspect_batch(batch, tokenizer)   # batch-level probes
    report.raise_for_failures()
"""
from __future__ import annotations

__version__ = "0.1.0"

from .api import inspect_batch
# Bound after the submodule import on purpose: `sftdoctor.attach` is the function, and a later
# `import sftdoctor.attach` finds the module already loaded and does not rebind the name.
from .attach import Doctor, attach
from .errors import FailuresFound, UserError
from .findings import CheckResult, Finding
from .report import Report

__all__ = ["inspect_batch", "attach", "Doctor", "Report", "Finding", "CheckResult", "UserError", "FailuresFound", "__version__"]


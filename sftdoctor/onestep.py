"""inspect-batch SCRIPT: observe the script's own first training step, not only a step of ours.

The batch and a synthetic forward/backward (HF loss) are checked at the first forward; this module
then lets the script run ITS step under the step probes: its own loss (a custom loss without the
shift shows in d loss / d logits as labels-misaligned) and its own optimizer (model.half() with Adam:
precision-fp16-unsafe). The script is stopped right before its first optimizer update (the model is
never changed) or at its next forward, whichever comes first.
"""
from __future__ import annotations

from typing import Any

import torch

from .attach import attach
from .frames import find_in_frames
from .patches import Patches
from .probes import REGISTRY
from .session import Session


class OneStep:
    """attach() the step probes at the first forward; stop() raises StopScript at the first
    optimizer.step() (pre-hook: before the update) or the next forward."""

    def __init__(self, stop_script: type[BaseException]):
        self.stop_script = stop_script
        self.doctor: Any = None
        self._patches = Patches()  # the optimizer pre-hook that stops the script
        self.errors: list[str] = []

    def start(self, model: Any, tokenizer: Any, optimizer: Any, ignore) -> None:
        try:
            self.doctor = attach(model, tokenizer, optimizer=optimizer, every=1, full_steps=1 << 30, ignore=ignore,
                                 command="inspect-batch")
        except Exception as e:  # ours: reported as an internal error, never blamed on the script
            self.errors.append(f"attach: {type(e).__name__}: {e}")
            return

        def before_update(opt, args, kwargs):
            raise self.stop_script("first training step inspected (before its optimizer update)")

        self._patches.optimizer_hook("pre", before_update)

    @property
    def running(self) -> bool:
        return self.doctor is not None

    def finish(self, report: Any) -> None:
        """Detach, and merge what the script's own step showed into the report."""
        self._patches.restore()
        if self.errors:
            report.run.setdefault("internal_errors", []).extend(self.errors)
        if self.doctor is None:
            return
        doctor, self.doctor = self.doctor, None
        try:
            doctor.detach()  # observes the pending micro-step (forward + the script's backward)
            part = doctor.report()
        except Exception as e:
            report.run.setdefault("internal_errors", []).append(f"own step: {type(e).__name__}: {e}")
            return
        if not part.metrics.get("steps"):
            return  # the script's step never got to a backward: the synthetic step stands alone
        # the script's own step outranks the synthetic one: what its gradient shows it trained on
        session = Session.reopen(report, REGISTRY)
        session.merge(part)
        session.finish()  # the root causes ranked again with the own step's findings
        report.metrics["own_step"] = {"steps": part.metrics.get("steps"), "dtypes": part.metrics.get("dtypes")}
        report.run["own_step"] = True


def find_optimizer(frame: Any, globals_: dict) -> Any:

    return find_in_frames(frame, torch.optim.Optimizer, globals_)

"""The per-step log of a run: steps.jsonl (rank 0), token counts, tokens per second and MFU,
the non-finite-loss guard, and a checkpoint at each epoch end.

steps.jsonl holds one JSON line per optimizer step: step, epoch, loss, grad_norm, lr, the ids of
the examples of that step (all ranks), supervised and total tokens, the loss divisor
(num_items_in_batch) and the seconds the step took. `--resume` keeps the lines up to the
checkpoint and the resumed run appends the rest, so the file proves what was trained on.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..constants import IGNORE_INDEX
from ..context import ProbeContext
from ..findings import Finding
from ..session import Session
from ..stepstats import StepRecord
from .pipeline import rank, world_size

STEPS_FILE = "steps.jsonl"
KILL_AT_STEP = "SFTDOCTOR_KILL_AT_STEP"  # test-only: SIGKILL this process right after logging that step

# Peak dense bf16 FLOP/s of common GPUs, for model FLOPs utilisation (MFU).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12, "4090": 165e12}


def is_main() -> bool:
    return rank() == 0


def step_logger_class():
    from transformers import TrainerCallback

    class StepLogger(TrainerCallback):
        """Writes steps.jsonl (rank 0), counts tokens, stops on a non-finite loss, saves each epoch."""

        def __init__(self, path: Path, session: Session, progress: Any, flops_per_token: float, peak_flops: float | None,
                     save_each_epoch: bool):
            self.path, self.session, self.progress = path, session, progress
            self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
            self.save_each_epoch = save_each_epoch
            self.ids: list[int] = []
            self.supervised = self.tokens = 0
            self.num_items = None
            self.task = None
            self.train_time = 0.0
            self.total_supervised = self.total_tokens = 0
            self.step_started = None
            self.records: list[dict] = []

        def seen(self, ids: list[int], inputs: dict) -> None:
            self.ids += ids
            self.supervised += int((inputs["labels"] != IGNORE_INDEX).sum())
            self.tokens += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
            if self.step_started is None:
                self.step_started = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            if self.progress is not None:
                self.task = self.progress.add_task("training", total=state.max_steps, completed=state.global_step)

        def on_step_end(self, args, state, control, **kw):
            elapsed = time.perf_counter() - (self.step_started or time.perf_counter())
            self.step_started = None
            ids, sup, tok = self.ids, self.supervised, self.tokens
            if world_size() > 1 and torch.distributed.is_initialized():
                # every rank must stop together (a rank left alone would wait forever in the
                # next all-reduce), and the step log lists the examples of all ranks
                gathered: list = [None] * world_size()
                torch.distributed.all_gather_object(gathered, (ids, sup, tok, bool(control.should_training_stop)))
                ids = [i for g in gathered for i in g[0]]
                sup, tok = sum(g[1] for g in gathered), sum(g[2] for g in gathered)
                if any(g[3] for g in gathered):
                    control.should_training_stop = True
            self.pending = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "example_ids": ids,
                            "supervised_tokens": sup, "tokens": tok, "seconds": round(elapsed, 4),
                            # the loss divisor the Trainer used: supervised tokens of the whole step
                            "num_items_in_batch": int(self.num_items) if self.num_items is not None else None}
            self.train_time += elapsed
            self.total_supervised += sup
            self.total_tokens += tok
            self.ids, self.supervised, self.tokens = [], 0, 0

        def on_epoch_end(self, args, state, control, **kw):
            if self.save_each_epoch:
                control.should_save = True  # a checkpoint each epoch also when saving every N steps

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs or not hasattr(self, "pending"):
                return
            rec = {**self.pending, "loss": logs["loss"], "grad_norm": logs.get("grad_norm"), "lr": logs.get("learning_rate")}
            del self.pending
            self.records.append(rec)
            if loss_findings(rec, self.session):
                control.should_training_stop = True
            if is_main():
                with open(self.path, "a", encoding="utf-8") as f:  # an append-only log, one line per step
                    f.write(json.dumps(rec) + "\n")
                if os.environ.get(KILL_AT_STEP) == str(rec["step"]):  # fault injection for the resume test
                    os.kill(os.getpid(), 9)
                if self.progress is not None and self.task is not None:
                    self.progress.update(self.task, completed=state.global_step,
                                         description=f"training  loss {float(rec['loss']):.3f}")

        def throughput(self) -> dict[str, Any]:
            t = max(self.train_time, 1e-9)
            m = {"train_seconds": round(self.train_time, 2), "tokens": self.total_tokens, "supervised_tokens": self.total_supervised,
                 "tokens_per_s": round(self.total_tokens / t, 1), "supervised_tokens_per_s": round(self.total_supervised / t, 1)}
            if self.peak_flops:
                m["mfu"] = round(self.flops_per_token * self.total_tokens / t / (self.peak_flops * world_size()), 4)
            return m

    return StepLogger


def loss_findings(rec: dict[str, Any], session: Session) -> list[Finding]:
    """The loss-nonfinite probe on one logged optimizer step of steps.jsonl (its loss, as the
    Trainer logged it, and the supervised tokens of the step), recorded in the session's report.
    Cheap: math on one number."""
    if math.isfinite(float(rec["loss"])):
        return []  # the common case: no probe context to build
    step = StepRecord(step=rec["step"], optimizer_step_index=rec["step"], full=False, loss=float(rec["loss"]),
                      loss_source="trainer log", supervised_tokens=rec.get("supervised_tokens"))
    found, checks = session.evaluate(ProbeContext(step=step, step_index=rec["step"]), "step", only=("loss-nonfinite",))
    session.record(found, checks)
    return found


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(model: Any) -> float:
    """6 N per trained token (forward 2N + backward 4N), the usual estimate for MFU."""
    return 6.0 * sum(p.numel() for p in model.parameters())

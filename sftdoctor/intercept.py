"""Catch the first forward of a causal LM in a user's unmodified training script, and find what
the probes need around it (labels a custom loss keeps outside the model, the tokenizer, a
Trainer's settings): what `sftdoctor inspect-batch train.py` and `sftdoctor watch train.py` use.

The catcher is installed as transformers.PreTrainedModel.__call__ (only HF models pass through
it: the patch "model-call" of sftdoctor.patches) and removed again when the script's run ends; the
script itself runs through sftdoctor.runner.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Mapping

from .errors import UserError
from .frames import find_in_frames, find_tokenizer, trainer_tokenizer, tokenizer_in
from .hooks import eager
from .patches import Patches
from .probes import REGISTRY
from .runner import StopScript, is_our_file, print_user_traceback, run_patched

_BATCH_FIELDS = ("input_ids", "attention_mask", "position_ids", "labels")
_LABEL_NAMES = ("labels", "targets", "target_ids", "loss_mask")  # tensors a custom loss often uses


# ---- the first forward of a causal LM ---------------------------------------------------------

@dataclass
class Forward:
    """One captured model call: the model, its batch fields, and the caller's frame."""

    model: Any
    batch: dict[str, Any]
    frame: FrameType | None
    caller: str = ""  # "file:line" of the code that called the model


def is_causal_lm(model: Any) -> bool:
    try:
        return model.get_output_embeddings() is not None
    except Exception:
        return False


class ForwardCatcher:
    """Routes the outermost call of every HF causal LM through `on_forward(model, args, kwargs,
    frame)` before the model runs (frame: the caller's).

    Installed as transformers.PreTrainedModel.__call__ (only HF models go through it, not
    every submodule); `busy` lets sftdoctor's own probe forwards pass straight through.
    """

    def __init__(self, on_forward: Callable[[Any, tuple, dict, FrameType], None]):
        self.on_forward = on_forward
        self.depth = 0
        self.busy = False

    def install(self, patches: Patches) -> None:
        import torch

        catcher = self
        # torch.compile: a compiled model calls model.__call__ (this function) under dynamo. Dynamo must
        # skip THIS frame (as it skips nn.Module.__call__) but still compile the model's forward below
        # it (recursive=False), and must never trace what sftdoctor does (on_forward: disabled).
        on_forward = eager(lambda *a: catcher.on_forward(*a))

        def make(module_call):  # module_call: nn.Module.__call__ as PreTrainedModel inherits it
            def __call__(model, *args, **kwargs):
                if catcher.busy or catcher.depth or not is_causal_lm(model):
                    return module_call(model, *args, **kwargs)
                catcher.depth += 1
                try:
                    catcher.busy = True
                    try:
                        on_forward(model, args, kwargs, _caller_frame())
                    finally:
                        catcher.busy = False
                    return module_call(model, *args, **kwargs)
                finally:
                    catcher.depth -= 1

            try:
                return torch.compiler.disable(__call__, recursive=False)
            except Exception:  # an older torch without recursive=False: plain function
                return __call__

        patches.wrap("model-call", make)


def _caller_frame() -> FrameType:
    """The frame that called the model: the first one above the catcher outside torch's dynamo
    wrappers (torch.compiler.disable adds a frame of its own)."""
    import os

    frame = sys._getframe(2)
    while frame.f_back is not None and (f"{os.sep}torch{os.sep}_dynamo{os.sep}" in frame.f_code.co_filename
                                        or f"{os.sep}torch{os.sep}compiler{os.sep}" in frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def capture(model: Any, args: tuple, kwargs: dict, frame: FrameType) -> Forward:
    return Forward(model, bind_batch(model, args, kwargs), frame, f"{frame.f_code.co_filename}:{frame.f_lineno}")


def bind_batch(model: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """input_ids / attention_mask / position_ids / labels of a forward call, named or positional."""
    import inspect

    batch = {k: kwargs[k] for k in _BATCH_FIELDS if kwargs.get(k) is not None}
    if args:
        try:
            bound = inspect.signature(model.forward).bind_partial(*args)
            for k in _BATCH_FIELDS:
                if bound.arguments.get(k) is not None:
                    batch.setdefault(k, bound.arguments[k])
        except (TypeError, ValueError):
            batch.setdefault("input_ids", args[0])
    return batch


def complete_batch(forward: Forward) -> tuple[dict[str, Any], str]:
    """Add labels the model call did not get (a custom loss computes them outside the model):
    the batch dict in the caller's frame that holds the same input_ids, or a same-shaped tensor
    named labels/targets/loss_mask there. Returns the batch and where its labels came from."""
    import torch

    batch = dict(forward.batch)
    if "labels" in batch:
        return batch, "forward"
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return batch, "none"
    frame, depth = forward.frame, 0
    while frame is not None and depth < 3:
        for value in list(frame.f_locals.values()):
            if isinstance(value, Mapping) and _same_tensor(value.get("input_ids") if "input_ids" in value else None, ids):
                for name in ("labels", "loss_mask"):
                    if isinstance(value.get(name), torch.Tensor):
                        batch[name] = value[name]
                        for k in ("attention_mask", "position_ids"):
                            if k not in batch and isinstance(value.get(k), torch.Tensor):
                                batch[k] = value[k]
                        return batch, f"the batch dict in {frame.f_code.co_name}()"
        for name in _LABEL_NAMES:
            value = frame.f_locals.get(name)
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(ids.shape):
                batch[name] = value
                return batch, f"{name} in {frame.f_code.co_name}()"
        frame, depth = frame.f_back, depth + 1
    return batch, "none"


def _downgrade_guessed(report: Any, labels_from: str) -> None:
    """The model got no labels: the tensor found in the caller (labels_from) is a GUESS at what the
    loss uses, and inspect-batch stops before the loss runs, so no gradient can confirm it. A fail
    read from that guess is downgraded to a warn that says so (watch measures it instead)."""
    label_ids = {i for p in REGISTRY.at("batch") if "labels" in p.needs for i in p.ids}
    for f in report.findings:
        if f.id in label_ids and f.level == "batch" and f.severity == "fail":
            f.severity = "warn"
            f.evidence["labels_guessed_from"] = labels_from
            f.message += (f" [read from {labels_from}, a guess: the model was called without labels; "
                          "`sftdoctor watch` measures what the loss trains on from d loss / d logits]")
    report.record_checks([])  # statuses below follow the findings
    for c in report.checks:
        if c.id in label_ids and c.status == "fail" and not any(f.id == c.id and f.severity == "fail" for f in report.findings):
            c.status = "warn"


def probe_ready(batch: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The batch without fields the batch probes cannot read (a 4D attention mask, packed-sequence
    extras), and the names dropped. Probes read [batch, seq] tensors; a 1D row counts as [1, seq]."""
    import torch

    def rows(t):
        return tuple(t.shape) if t.dim() == 2 else (1, t.shape[0]) if t.dim() == 1 else None

    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return batch, []
    kept, dropped = {}, []
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and rows(v) != rows(ids):
            dropped.append(k)
        else:
            kept[k] = v
    return kept, dropped


def _same_tensor(a: Any, b: Any) -> bool:
    import torch

    if a is b:
        return True
    return isinstance(a, torch.Tensor) and a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


def close_progress_bars(trainer: Any) -> None:
    """Close a Trainer's tqdm bars (left open when sftdoctor stops the script inside train())."""
    for cb in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(cb, name, None)
            if bar is not None and hasattr(bar, "close"):
                try:
                    bar.close()
                except Exception:
                    pass
                setattr(cb, name, None)


def trainer_hints(frame: FrameType | None, script_globals: Mapping[str, Any] | None) -> dict[str, Any]:
    """Recipe hints a Trainer knows (max_length of an SFTConfig)."""
    try:
        from transformers import Trainer
    except ImportError:
        return {}
    trainer = find_in_frames(frame, Trainer, script_globals)
    if trainer is None:
        return {}
    hints: dict[str, Any] = {}
    max_length = getattr(trainer.args, "max_length", None) or getattr(trainer.args, "max_seq_length", None)
    if isinstance(max_length, int):
        hints["max_length"] = max_length
    return hints


# ---- inspect-batch on a script ---------------------------------------------------------------

def inspect_script(script: str | None, script_args: list[str], *, module: str | None = None,
                   ignore: set[str] | frozenset[str] = frozenset(), max_length: int | None = None):
    """Run the script until its first causal-LM forward, run the batch (and step) probes on
    that batch, stop the script, and return the Report."""
    from .api import inspect_batch

    from .onestep import OneStep, find_optimizer

    captured: dict[str, Any] = {}
    script_ns: dict[str, Any] = {}
    own = OneStep(StopScript)  # the script's own first step (its loss, its optimizer): see onestep.py

    def inspect(fw: Forward, batch, labels_from, tokenizer, hints, grad_enabled: bool):
        if max_length:
            hints["max_length"] = max_length
        if "input_ids" not in batch:
            raise UserError(f"the first forward of {type(fw.model).__name__} (at {fw.caller}) got no input_ids "
                            "(inputs_embeds?); save the batch dict and use inspect-batch --batch FILE")
        batch, dropped = probe_ready(batch)
        report = inspect_batch(batch, tokenizer, fw.model, hints=hints, ignore=ignore)
        if labels_from not in ("forward", "none"):
            _downgrade_guessed(report, labels_from)
        report.run.update(forward={"caller": fw.caller, "model": type(fw.model).__name__, "labels_from": labels_from,
                                   "tokenizer": type(tokenizer).__name__ if tokenizer is not None else None,
                                   "grad_enabled": grad_enabled})
        if dropped:
            report.run["forward"]["fields_not_checked"] = dropped
        return report

    def on_forward(model, args, kwargs, frame) -> None:
        import torch

        if own.running:
            raise StopScript("first training step inspected")  # the next forward: the step is over
        if not torch.is_grad_enabled() and "fallback" in captured:
            return
        fw = capture(model, args, kwargs, frame)
        batch, labels_from = complete_batch(fw)
        globals_ = script_ns.get("globals") or running_main_globals()
        tokenizer = find_tokenizer(fw.frame, globals_)
        hints = trainer_hints(fw.frame, globals_)
        fw.frame = None  # keep no frame alive
        if not torch.is_grad_enabled():
            # an evaluation or generate() call: kept in case the script never trains
            captured["fallback"] = (fw, batch, labels_from, tokenizer, hints)
            return
        try:
            captured["report"] = inspect(fw, batch, labels_from, tokenizer, hints, True)
        except Exception as e:  # ours, not the script's: raised again once the script is unwound
            captured["error"] = e
        if "report" in captured:
            own.start(model, tokenizer, find_optimizer(frame, globals_), ignore)
            if own.running:
                return  # let this forward, the script's loss and backward run under the step probes
        try:
            from transformers import Trainer

            trainer = find_in_frames(frame, Trainer)
            if trainer is not None:
                close_progress_bars(trainer)
        except ImportError:
            pass
        raise StopScript("first model forward inspected")

    outcome = run_patched(ForwardCatcher(on_forward).install, script, script_args, module=module, globals_out=script_ns)
    name = module or script
    if "error" in captured:
        raise captured["error"]
    if "report" in captured:
        report = captured["report"]
        own.finish(report)
        report.run.update(status="stopped", reason=outcome.reason or "first model forward inspected", script=name)
        if outcome.status == "crashed":  # the script's own step raised after its first forward
            print_user_traceback(outcome.exception)
            report.run.update(status="crashed", error=outcome.error, exit_code=outcome.exit_code)
        return report
    if "fallback" in captured and outcome.status in ("completed", "exited"):
        report = inspect(*captured["fallback"], False)  # the script has ended: our errors surface as ours
        report.run.update(status=outcome.status, exit_code=outcome.exit_code, script=name,
                          note="the script never ran a forward with gradients enabled; this is its first forward "
                               "(under torch.no_grad / inference_mode)")
        return report
    if outcome.status == "crashed":
        print_user_traceback(outcome.exception)
        err = outcome.error or {}
        raise UserError(f"{name} raised {err.get('type')}: {err.get('message')} before any model forward; "
                        "fix the error above and run again")
    if outcome.status == "interrupted":
        raise KeyboardInterrupt
    how = "exited with code %d" % outcome.exit_code if outcome.status == "exited" else "finished"
    raise UserError(f"{name} {how} without calling a causal LM (a transformers *ForCausalLM model); "
                    "inspect-batch needs the script to run a forward pass")


def running_main_globals() -> Mapping[str, Any] | None:
    main = sys.modules.get("__main__")
    return getattr(main, "__dict__", None)

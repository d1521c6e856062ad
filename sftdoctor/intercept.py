"""Run a user's training script in-process, as `python train.py` would, and catch its first
model forward: what `sftdoctor inspect-batch train.py` and `sftdoctor watch train.py` build on.

The script runs as `__main__` with its own sys.argv, sys.path[0] = its folder and the user's
cwd (coverage.py's PyRunner). Everything sftdoctor patches or the script changes in the
interpreter (argv, path, cwd, signal handlers, patched attributes) is restored on the way out.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, Callable, Mapping

from .errors import UserError

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_OUR_DIRS = (_PACKAGE_DIR, str(Path(__file__).resolve().parents[1] / "probes"), str(Path(__file__).resolve().parents[1] / "reports"))
_BATCH_FIELDS = ("input_ids", "attention_mask", "position_ids", "labels")
_LABEL_NAMES = ("labels", "targets", "target_ids", "loss_mask")  # tensors a custom loss often uses


class StopScript(BaseException):
    """Raised by sftdoctor inside the script to stop it cleanly (a BaseException, so a user's
    `except Exception:` does not swallow it)."""

    def __init__(self, reason: str, status: str = "stopped"):
        super().__init__(reason)
        self.reason = reason
        self.status = status


# ---- patching ------------------------------------------------------------------------------

class Patches:
    """Attributes set on classes/modules, undone in reverse order by restore()."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, bool, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        had_own = name in vars(owner)
        self._undo.append((owner, name, had_own, vars(owner).get(name)))
        setattr(owner, name, value)

    def restore(self) -> None:
        while self._undo:
            owner, name, had_own, old = self._undo.pop()
            if had_own:
                setattr(owner, name, old)
            else:
                try:
                    delattr(owner, name)  # the attribute was inherited: deleting it uncovers the original
                except AttributeError:
                    pass


def inherited(cls: type, name: str) -> Any:
    """The attribute `name` as cls would find it without its own override."""
    for base in cls.__mro__[1:]:
        if name in vars(base):
            return vars(base)[name]
    raise AttributeError(name)


# ---- the script --------------------------------------------------------------------------

@dataclass
class Outcome:
    """How the user's script ended."""

    status: str  # completed | crashed | exited | interrupted | stopped
    exit_code: int = 0
    reason: str = ""  # for stopped: why sftdoctor stopped it
    error: dict[str, Any] | None = None  # for crashed: type, message, file, line, function
    exception: BaseException | None = field(default=None, repr=False)

    def to_run(self) -> dict[str, Any]:
        run: dict[str, Any] = {"status": self.status, "exit_code": self.exit_code}
        if self.reason:
            run["reason"] = self.reason
        if self.error:
            run["error"] = self.error
        return run


def resolve_script(script: str | None, module: str | None) -> str:
    if module:
        import importlib.util

        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())  # python -m looks in the cwd first
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        finally:
            if added:
                sys.path.remove(os.getcwd())
        if spec is None:
            raise UserError(f"no module named {module!r} to run (looked in {os.getcwd()} and on sys.path)")
        return module
    if not script:
        raise UserError("no script given: sftdoctor VERB train.py [script args...]")
    path = Path(script)
    if path.is_dir() and (path / "__main__.py").is_file():
        return str(path / "__main__.py")
    if not path.is_file():
        raise UserError(f"script {script} does not exist (cwd {os.getcwd()})")
    return str(path)


def run_script(script: str | None, args: list[str], *, module: str | None = None,
               globals_out: dict[str, Any] | None = None) -> Outcome:
    """Run the script as __main__ and return how it ended; sys/cwd/signal state is restored.

    globals_out, when given, receives "globals": the script's module namespace while it runs.
    """
    target = resolve_script(script, module)
    saved_argv, saved_path, saved_cwd = sys.argv[:], sys.path[:], os.getcwd()
    saved_main = sys.modules.get("__main__")
    saved_signals = _signal_handlers()
    try:
        if module:
            sys.argv = [target, *args]  # runpy replaces argv[0] with the module's file
            sys.path[0:1] = [os.getcwd()]  # python -m puts the cwd first
            main_mod = None
        else:
            sys.argv = [target, *args]
            sys.path[0:1] = [str(Path(target).resolve().parent)]  # as `python train.py` does
            main_mod = ModuleType("__main__")
            main_mod.__file__ = os.path.abspath(target)
            main_mod.__builtins__ = __builtins__  # type: ignore[attr-defined]
            main_mod.__cached__ = None  # type: ignore[attr-defined]
            sys.modules["__main__"] = main_mod
        if globals_out is not None:
            globals_out["globals"] = main_mod.__dict__ if main_mod else None
        return _execute(target, module, main_mod)
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
        try:
            os.chdir(saved_cwd)
        except OSError:
            pass
        _restore_signals(saved_signals)


def _execute(target: str, module: str | None, main_mod: ModuleType | None) -> Outcome:
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            with open(target, "rb") as f:
                source = f.read()
            code = compile(source, main_mod.__file__, "exec", dont_inherit=True)
            exec(code, main_mod.__dict__)
    except StopScript as stop:
        return Outcome(status=stop.status, reason=stop.reason)
    except SystemExit as e:
        code = e.code
        if code is None:
            exit_code = 0
        elif isinstance(code, int):
            exit_code = code
        else:  # sys.exit("message") prints the message and exits 1, as Python does
            print(code, file=sys.stderr)
            exit_code = 1
        return Outcome(status="exited", exit_code=exit_code)
    except KeyboardInterrupt as e:
        return Outcome(status="interrupted", exit_code=130, error=error_info(e), exception=e)
    except BaseException as e:  # the user's exception: report it, do not re-raise
        return Outcome(status="crashed", exit_code=1, error=error_info(e), exception=e)
    return Outcome(status="completed")


def _signal_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    out = {}
    for s in signal.valid_signals():
        try:
            out[s] = signal.getsignal(s)
        except (ValueError, OSError):
            pass
    return out


def _restore_signals(saved: dict[int, Any]) -> None:
    for s, handler in saved.items():
        try:
            if signal.getsignal(s) is not handler and handler is not None:
                signal.signal(s, handler)
        except (ValueError, OSError, TypeError):
            pass


# ---- the user's traceback, without our frames -----------------------------------------------

def _is_ours(filename: str) -> bool:
    f = os.path.abspath(filename) if not filename.startswith("<") else filename
    return f.startswith(_OUR_DIRS) or os.path.basename(f) == "runpy.py" or f.startswith("<frozen runpy")


def user_traceback(exc: BaseException) -> traceback.TracebackException:
    """A TracebackException of exc (and its chain) with sftdoctor's and runpy's frames removed."""
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    seen = set()
    todo = [te]
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        t.stack = traceback.StackSummary.from_list([f for f in t.stack if not _is_ours(f.filename)])
        todo.extend(x for x in (t.__cause__, t.__context__) if x is not None)
    return te


def print_user_traceback(exc: BaseException, file=None) -> None:
    file = file or sys.stderr
    print("".join(user_traceback(exc).format()), end="", file=file)
    file.flush()


def error_info(exc: BaseException) -> dict[str, Any]:
    """type, message and where (the innermost frame in the user's own code, else the innermost)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _is_ours(f.filename)]
    user = [f for f in frames if "site-packages" not in f.filename and not f.filename.startswith(("<", sys.prefix, sys.base_prefix))]
    where = (user or frames or [None])[-1]
    info: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if where is not None:
        info.update(file=where.filename, line=where.lineno, function=where.name)
    return info


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
        from transformers import PreTrainedModel

        module_call = inherited(PreTrainedModel, "__call__")
        catcher = self

        def __call__(model, *args, **kwargs):
            if catcher.busy or catcher.depth or not is_causal_lm(model):
                return module_call(model, *args, **kwargs)
            catcher.depth += 1
            try:
                catcher.busy = True
                try:
                    catcher.on_forward(model, args, kwargs, sys._getframe(1))
                finally:
                    catcher.busy = False
                return module_call(model, *args, **kwargs)
            finally:
                catcher.depth -= 1

        patches.set(PreTrainedModel, "__call__", __call__)


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


# ---- finding the tokenizer ------------------------------------------------------------------

def _tokenizer_in(value: Any, depth: int = 0) -> Any:
    """The tokenizer held by value: itself, a Trainer's processing_class, a collator's tokenizer,
    a DataLoader's collate_fn, a functools.partial's keywords."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(value, PreTrainedTokenizerBase):
        return value
    if depth >= 2 or value is None or isinstance(value, (str, bytes, int, float, bool, list, tuple, dict)):
        return None
    own = getattr(value, "__dict__", None)
    if not isinstance(own, dict):
        return None
    for name in ("processing_class", "tokenizer", "_tokenizer", "processor", "data_collator", "collate_fn", "keywords"):
        sub = own.get(name)
        if isinstance(sub, dict):  # functools.partial(collate, tokenizer=tok).keywords
            for v in sub.values():
                found = _tokenizer_in(v, depth + 1)
                if found is not None:
                    return found
        elif sub is not None:
            found = _tokenizer_in(sub, depth + 1)
            if found is not None:
                return found
    return None


def find_tokenizer(frame: FrameType | None, script_globals: Mapping[str, Any] | None = None) -> Any:
    """The tokenizer the script uses: the calling frames' locals first (nearest first), then the
    script's globals, then (last resort) any tokenizer alive in the process."""
    depth = 0
    while frame is not None and depth < 40:
        if not _is_ours(frame.f_code.co_filename):
            for value in list(frame.f_locals.values()):
                found = _tokenizer_in(value)
                if found is not None:
                    return found
        frame, depth = frame.f_back, depth + 1
    for value in list((script_globals or {}).values()):
        found = _tokenizer_in(value)
        if found is not None:
            return found
    import gc

    from transformers import PreTrainedTokenizerBase

    for obj in gc.get_objects():
        if isinstance(obj, PreTrainedTokenizerBase):
            return obj
    return None


def find_in_frames(frame: FrameType | None, kind: type, script_globals: Mapping[str, Any] | None = None) -> Any:
    """The nearest instance of `kind` among the calling frames' locals (and their `self`'s
    attributes one level down), then the script's globals."""
    depth = 0
    while frame is not None and depth < 40:
        for value in list(frame.f_locals.values()):
            if isinstance(value, kind):
                return value
        frame, depth = frame.f_back, depth + 1
    for value in list((script_globals or {}).values()):
        if isinstance(value, kind):
            return value
    return None


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

    captured: dict[str, Any] = {}
    script_ns: dict[str, Any] = {}

    def inspect(fw: Forward, batch, labels_from, tokenizer, hints, grad_enabled: bool):
        if max_length:
            hints["max_length"] = max_length
        if "input_ids" not in batch:
            raise UserError(f"the first forward of {type(fw.model).__name__} (at {fw.caller}) got no input_ids "
                            "(inputs_embeds?); save the batch dict and use inspect-batch --batch FILE")
        batch, dropped = probe_ready(batch)
        report = inspect_batch(batch, tokenizer, fw.model, hints=hints, ignore=ignore)
        report.run.update(forward={"caller": fw.caller, "model": type(fw.model).__name__, "labels_from": labels_from,
                                   "tokenizer": type(tokenizer).__name__ if tokenizer is not None else None,
                                   "grad_enabled": grad_enabled})
        if dropped:
            report.run["forward"]["fields_not_checked"] = dropped
        return report

    def on_forward(model, args, kwargs, frame) -> None:
        import torch

        if not torch.is_grad_enabled() and "fallback" in captured:
            return
        fw = capture(model, args, kwargs, frame)
        batch, labels_from = complete_batch(fw)
        globals_ = script_ns.get("globals") or _running_main_globals()
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
        raise StopScript("first model forward inspected")

    patches = Patches()
    ForwardCatcher(on_forward).install(patches)
    try:
        outcome = run_script(script, script_args, module=module, globals_out=script_ns)
    finally:
        patches.restore()
    name = module or script
    if "error" in captured:
        raise captured["error"]
    if "report" in captured:
        report = captured["report"]
        report.run.update(status="stopped", reason=outcome.reason or "first model forward inspected", script=name)
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


def _running_main_globals() -> Mapping[str, Any] | None:
    main = sys.modules.get("__main__")
    return getattr(main, "__dict__", None)

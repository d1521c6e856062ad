"""Run a user's script in-process, as `python train.py` (or `python -m pkg`) would, and put the
interpreter back afterwards: what `inspect-batch` and `watch` run the user's training with.

The script runs as `__main__` with its own sys.argv, sys.path[0] = its folder and the user's cwd
(coverage.py's PyRunner). sys.argv, sys.path, cwd, __main__ and signal handlers are restored on
the way out; an exception of the script is kept (not raised) and its traceback can be printed as
Python prints it, minus sftdoctor's frames. run_patched runs it with patches (sftdoctor.patches)
installed for the script's run only.
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
from types import ModuleType
from typing import Any, Callable

from .errors import UserError
from .patches import Patches

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_OUR_DIRS = (_PACKAGE_DIR, str(Path(__file__).resolve().parents[1] / "probes"), str(Path(__file__).resolve().parents[1] / "reports"))


class StopScript(BaseException):
    """Raised by sftdoctor inside the script to stop it cleanly (a BaseException, so a user's
    `except Exception:` does not swallow it)."""

    def __init__(self, reason: str, status: str = "stopped", exit_code: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.exit_code = exit_code  # e.g. 143 for "terminated" (SIGTERM under torchrun)


# ---- the script --------------------------------------------------------------------------

@dataclass
class Outcome:
    """How the user's script ended."""

    status: str  # completed | crashed | exited | interrupted | stopped | terminated (SIGTERM, several ranks)
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


def run_patched(install: Callable[[Patches], None], script: str | None, args: list[str], *,
                module: str | None = None, globals_out: dict[str, Any] | None = None) -> Outcome:
    """run_script with the patches `install` sets (sftdoctor.patches) in place for the script's run
    only: they are restored on the way out however it ends, an exception of install included."""
    with Patches() as patches:
        install(patches)
        return run_script(script, args, module=module, globals_out=globals_out)


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
        return Outcome(status=stop.status, reason=stop.reason, exit_code=stop.exit_code)
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
        # Ctrl-C: 130; SIGTERM/SIGHUP (sftdoctor.signals.Terminated): 128 + the signal number
        return Outcome(status="interrupted", exit_code=getattr(e, "exit_code", 130), error=error_info(e), exception=e)
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

def is_our_file(filename: str) -> bool:
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
        t.stack = traceback.StackSummary.from_list([f for f in t.stack if not is_our_file(f.filename)])
        todo.extend(x for x in (t.__cause__, t.__context__) if x is not None)
    return te


def print_user_traceback(exc: BaseException, file=None) -> None:
    file = file or sys.stderr
    from .textsafe import terminal_safe

    # the message can quote dataset text: its escape sequences must not reach the terminal
    print(terminal_safe("".join(user_traceback(exc).format())), end="", file=file)
    file.flush()


def error_info(exc: BaseException) -> dict[str, Any]:
    """type, message and where (the innermost frame in the user's own code, else the innermost)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not is_our_file(f.filename)]
    user = [f for f in frames if "site-packages" not in f.filename and not f.filename.startswith(("<", sys.prefix, sys.base_prefix))]
    where = (user or frames or [None])[-1]
    info: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if where is not None:
        info.update(file=where.filename, line=where.lineno, function=where.name)
    return info

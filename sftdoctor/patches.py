"""Every monkeypatch sftdoctor applies to torch and transformers, and the one mechanism that
installs and restores them (coverage.py keeps its patches together the same way).

Each patch is a named entry of ENTRIES (what it replaces, and who uses it for what). A caller
installs one with `Patches.wrap(name, make)`: make(original) returns the replacement, which
usually calls the original. A Patches object collects what it installed and undoes it in reverse
order with restore() (or on leaving `with Patches() as p:`), however the patched region ends.

Invariants (tests/test_patches.py):
  - nothing else in the package assigns to a torch or transformers attribute;
  - restore() puts back exactly what was there: the owner's own attribute, or no attribute at
    all when it was inherited (the class finds its base's again), and it attempts every undo even
    when one of them raises;
  - restore() is idempotent: a second call does nothing;
  - a process-wide patch several users share (STEP: every attached Doctor) is installed when its
    first user acquires it and restored when its last user releases it; acquiring twice or
    releasing a user that holds nothing does nothing.
"""
from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol


@dataclass(frozen=True)
class Entry:
    """One attribute sftdoctor may replace."""

    name: str
    module: str  # the module that holds the owner
    owner: str  # the owner's name in that module ("" when the owner is the module itself)
    attr: str
    doc: str  # who patches it, and why
    # True: the original is the attribute as the owner's BASES provide it, never an earlier patch
    # on the owner itself (a second install replaces the first instead of wrapping it)
    from_bases: bool = False

    def resolve(self) -> Any:
        """The owner (imported now; ImportError when its package or class is not available)."""
        mod = importlib.import_module(self.module)
        if not self.owner:
            return mod
        try:
            return getattr(mod, self.owner)
        except AttributeError as e:  # as `from module import owner` reports it
            raise ImportError(f"cannot import name {self.owner!r} from {self.module!r}") from e

    def original(self, owner: Any) -> Any:
        return inherited(owner, self.attr) if self.from_bases else getattr(owner, self.attr)


ENTRIES: dict[str, Entry] = {e.name: e for e in (
    Entry("tensor-backward", "torch", "Tensor", "backward",
          "STEP (attached Doctors): the raw loss before the backward, and a safe point right after it"),
    Entry("scaler-scale", "torch.amp", "GradScaler", "scale", "STEP: the loss scale a GradScaler applies"),
    Entry("scaler-step", "torch.amp", "GradScaler", "step", "STEP: an optimizer step a GradScaler skips"),
    Entry("scaler-update", "torch.amp", "GradScaler", "update", "STEP: the loss scale after GradScaler.update"),
    Entry("model-call", "transformers", "PreTrainedModel", "__call__",
          "intercept.ForwardCatcher (inspect-batch, watch, draw): the outermost call of every HF model",
          from_bases=True),
    Entry("trainer-train", "transformers", "Trainer", "train",
          "watch: attach to the Trainer when train() starts; draw: its training data exists, stop there"),
    Entry("save-pretrained", "transformers", "PreTrainedModel", "save_pretrained", "watch: check the saved weights"),
    Entry("generate", "transformers.generation", "GenerationMixin", "generate", "watch: check the generations"),
    Entry("torch-save", "torch", "", "save", "watch: check a state dict the script saves"),
    Entry("dataloader-iter", "torch.utils.data", "DataLoader", "__iter__",
          "draw: the first DataLoader the script iterates is the training data"),
)}


def inherited(cls: type, name: str) -> Any:
    """The attribute `name` as cls would find it without its own override."""
    for base in cls.__mro__[1:]:
        if name in vars(base):
            return vars(base)[name]
    raise AttributeError(name)


class Patches:
    """What one user installed; undone in reverse order by restore()."""

    def __init__(self) -> None:
        # in install order: ("attr", owner, name, had_own, old) or ("hook", handle); had_own False:
        # the attribute was not the owner's own (inherited, or absent)
        self._undo: list[tuple] = []

    def wrap(self, entry: str, make: Callable[[Any], Any]) -> Any:
        """Replace the attribute of ENTRIES[entry] by make(original); return the replacement."""
        e = ENTRIES[entry]
        owner = e.resolve()
        value = make(e.original(owner))
        self._set(owner, e.attr, value)
        return value

    def optimizer_hook(self, when: str, fn: Callable) -> None:
        """A global optimizer step hook (torch.optim.optimizer.register_optimizer_step_{pre,post}_hook),
        removed by restore(): fn(optimizer, args, kwargs), called for every optimizer's step."""
        from torch.optim import optimizer as optim

        register = {"pre": optim.register_optimizer_step_pre_hook, "post": optim.register_optimizer_step_post_hook}[when]
        self._undo.append(("hook", register(fn)))

    def _set(self, owner: Any, name: str, value: Any) -> None:
        own = vars(owner)
        self._undo.append(("attr", owner, name, name in own, own.get(name)))
        setattr(owner, name, value)

    def restore(self) -> None:
        """Undo everything, last installed first. Every undo is attempted; the first error is
        raised once all are done."""
        error: BaseException | None = None
        while self._undo:
            item = self._undo.pop()
            try:
                if item[0] == "hook":
                    item[1].remove()
                    continue
                _, owner, name, had_own, old = item
                if had_own:
                    setattr(owner, name, old)
                elif name in vars(owner):
                    delattr(owner, name)  # it was inherited: deleting the override uncovers the original
            except BaseException as e:  # keep undoing: one failure must not leave the rest patched
                error = error or e
        if error is not None:
            raise error

    def __enter__(self) -> "Patches":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


class Shared:
    """A process-wide patch several users share: `install(patches, shared)` runs when the first
    user acquires it, and its patches are restored when the last user releases it."""

    def __init__(self, name: str, install: Callable[["Patches", "Shared"], None], doc: str):
        self.name, self.doc = name, doc
        self._install = install
        self._lock = threading.RLock()
        self._users: list[Any] = []  # in acquire order
        self._patches: Patches | None = None

    def acquire(self, user: Any) -> None:
        """Add a user; install the patch when it is the first. Idempotent per user."""
        with self._lock:
            if user in self._users:
                return
            if not self._users:
                patches = Patches()
                try:
                    self._install(patches, self)
                except BaseException:
                    patches.restore()
                    raise
                self._patches = patches
            self._users.append(user)

    def release(self, user: Any) -> None:
        """Remove a user; restore every original when none is left. Idempotent."""
        with self._lock:
            if user not in self._users:
                return
            self._users.remove(user)
            if not self._users and self._patches is not None:
                patches, self._patches = self._patches, None
                patches.restore()

    def users(self) -> list[Any]:
        return list(self._users)

    def each(self, event: Callable[[Any], None]) -> None:
        """Send one event to every user, in acquire order (event(user) calls one StepEvents method)."""
        for user in list(self._users):
            event(user)


# ---- STEP: what an attached Doctor observes of the training step -------------------------------------

class StepEvents(Protocol):
    """What STEP's users (sftdoctor.observer.StepObserver) implement. The wrappers only dispatch;
    each method is called at a safe point (never inside an autograd hook)."""

    def before_backward(self, loss: Any) -> None: ...
    def after_backward(self, loss: Any) -> None: ...
    def scaler_scaled(self, scaler: Any, outputs: Any, scaled: Any) -> None: ...
    def scaler_step_begin(self, scaler: Any, optimizer: Any) -> None: ...
    def scaler_step_end(self, scaler: Any, optimizer: Any) -> None: ...
    def scaler_updated(self, scaler: Any) -> None: ...
    def optimizer_step_begin(self, optimizer: Any) -> None: ...
    def optimizer_step_end(self, optimizer: Any) -> None: ...


# When each StepEvents method is called, with its arguments.
STEP_EVENTS = {
    "before_backward": "(loss): Tensor.backward is about to run on this tensor",
    "after_backward": "(loss): the backward returned (a safe point: an exception reaches the script)",
    "scaler_scaled": "(scaler, outputs, scaled): GradScaler.scale returned `scaled`",
    "scaler_step_begin": "(scaler, optimizer): GradScaler.step starts",
    "scaler_step_end": "(scaler, optimizer): GradScaler.step returned",
    "scaler_updated": "(scaler): GradScaler.update returned",
    "optimizer_step_begin": "(optimizer): any optimizer's step starts",
    "optimizer_step_end": "(optimizer): any optimizer's step returned",
}


def _install_step(p: Patches, shared: Shared) -> None:
    each = shared.each

    def make_backward(original):
        def backward(self, *args, **kwargs):
            each(lambda u: u.before_backward(self))
            result = original(self, *args, **kwargs)
            each(lambda u: u.after_backward(self))  # safe point: user code called .backward(); exceptions reach it
            return result
        return backward

    def make_scale(original):
        def scale(self, outputs):
            out = original(self, outputs)
            each(lambda u: u.scaler_scaled(self, outputs, out))
            return out
        return scale

    def make_step(original):
        def step(self, optimizer, *args, **kwargs):
            each(lambda u: u.scaler_step_begin(self, optimizer))
            result = original(self, optimizer, *args, **kwargs)
            each(lambda u: u.scaler_step_end(self, optimizer))
            return result
        return step

    def make_update(original):
        def update(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            each(lambda u: u.scaler_updated(self))
            return result
        return update

    def opt_pre(optimizer, args, kwargs):
        each(lambda u: u.optimizer_step_begin(optimizer))
        return None  # no replacement of the step's arguments

    def opt_post(optimizer, args, kwargs):
        each(lambda u: u.optimizer_step_end(optimizer))

    p.wrap("tensor-backward", make_backward)
    p.wrap("scaler-scale", make_scale)
    p.wrap("scaler-step", make_step)
    p.wrap("scaler-update", make_update)
    p.optimizer_hook("pre", opt_pre)
    p.optimizer_hook("post", opt_post)


STEP = Shared("step", _install_step,
              "tensor-backward, scaler-scale/step/update and the global optimizer step hooks, while at least one "
              "StepObserver is attached: each sends StepEvents to every attached observer")
assert set(STEP_EVENTS) == {n for n in vars(StepEvents) if not n.startswith("_")}  # one list of events

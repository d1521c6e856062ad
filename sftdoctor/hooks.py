"""Low-level hooks: the per-module activation collector, and helpers the Doctor's hooks share.

The process-wide patches an attached Doctor relies on (torch.Tensor.backward, GradScaler, the global
optimizer hooks) are sftdoctor.patches.STEP.

Autograd hooks here only *record* (reduce to 0-d tensors on the device); they never call user
callbacks, so an exception from a callback can only surface at a safe point.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def eager(fn: Callable) -> Callable:
    """fn, never traced by torch.compile (it runs eagerly even when called from a compiled region's
    surroundings); fn itself where torch.compiler.disable is unavailable."""
    try:
        return torch.compiler.disable(fn)
    except Exception:
        return fn


def compiling() -> bool:
    """True while torch.compile (dynamo) traces: our hooks then do nothing, so they never enter a
    compiled graph (their Python side effects cannot be traced); a compiled model is observed from
    outside the compiled region instead (see intercept's compile support)."""
    try:
        return torch.compiler.is_compiling()
    except Exception:
        return False


def first_tensor(out: Any) -> torch.Tensor | None:
    """The tensor a module returned (first element of a tuple/list); None for dict-like outputs."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def logits_of(out: Any) -> torch.Tensor | None:
    """The logits of a causal LM's output (ModelOutput.logits, a dict's 'logits', or the tensor)."""
    lg = getattr(out, "logits", None)
    if lg is None and isinstance(out, dict):
        lg = out.get("logits")
    if lg is None and isinstance(out, (tuple, list)):  # return_dict=False: (loss, logits, ...) or (logits, ...)
        lg = next((t for t in out[:2] if isinstance(t, torch.Tensor) and t.dim() == 3), None)
    if lg is None:
        lg = first_tensor(out)
    if isinstance(lg, torch.Tensor) and lg.dim() == 3 and lg.is_floating_point():
        return lg
    return None


class ActivationCollector:
    """Forward hooks on every submodule: max |output| per call as a 0-d device tensor (one
    aminmax pass: NaN/inf propagate into it, so it is also the finiteness test), plus a tensor
    hook on the output for the same statistic of its gradient in backward. Gated: when
    `forward_on` is False a hook costs one attribute read."""

    def __init__(self, root: torch.nn.Module, output_module: torch.nn.Module | None = None):
        self.forward_on = False
        self.backward_on = False
        self.forward: list[tuple[str, torch.dtype, torch.Tensor]] = []  # call order
        self.backward: list[tuple[str, torch.dtype, torch.Tensor]] = []  # backward order
        self.handles = []
        # The module producing the logits (lm_head) is not reduced here: the logits statistics
        # already cover its output and gradient (rows max/min), and a [B, T, V] pass is the
        # costliest of all. Its last output is remembered (weakly) to check it IS the logits.
        self.output_name: str | None = None
        self.output_ref = None
        for name, mod in root.named_modules():
            if mod is root or isinstance(mod, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                continue
            if output_module is not None and mod is output_module:
                self.output_name = name
                self.handles.append(mod.register_forward_hook(self._remember_output))
                continue
            self.handles.append(mod.register_forward_hook(self._make_hook(name)))

    def _remember_output(self, mod, inputs, output):
        # every training forward (not only sampled ones): the grad hook may have to sit on it. A
        # strong reference (a wrapper may drop the tensor object before the model's forward hook
        # runs); the Doctor takes it at the end of the same forward (invariant: held one forward at most)
        if isinstance(output, torch.Tensor) and torch.is_grad_enabled() and not compiling():
            self.output_ref = output
        return None

    def _make_hook(self, name: str) -> Callable:
        def hook(mod, inputs, output):
            if compiling() or not self.forward_on:  # compiling() first: a traced hook reads no attribute (no guard)
                return None
            t = first_tensor(output)
            if t is None or not t.is_floating_point() or t.numel() == 0:
                return None
            with torch.no_grad():
                mn, mx = torch.aminmax(t.detach())
                v = torch.maximum(mx.float(), -mn.float())
            self.forward.append((name, t.dtype, v))
            if self.backward_on and t.requires_grad:
                t.register_hook(self._make_grad_hook(name))
            return None
        return hook

    def _make_grad_hook(self, name: str) -> Callable:
        def grad_hook(grad):
            # autograd hook: record only, never raise into the user's backward
            if not compiling() and self.backward_on and grad is not None and grad.numel():
                with torch.no_grad():
                    mn, mx = torch.aminmax(grad.detach())
                    self.backward.append((name, grad.dtype, torch.maximum(mx.float(), -mn.float())))
            return None
        return grad_hook

    def take(self) -> tuple[list, list]:
        f, b = self.forward, self.backward
        self.forward, self.backward = [], []
        return f, b

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.forward, self.backward = [], []

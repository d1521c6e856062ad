"""A memory-lean causal-LM loss: the lm_head and the cross-entropy in chunks of positions.

The plain path materialises logits [B, T, V] (at Qwen2.5's V = 151,936 and 8 x 512 positions:
2.5 GB in fp32), keeps them for the backward and then materialises their gradient as large
again. Here the hidden states go to the loss in chunks of rows:

    hidden [N, H] --(select the N' supervised positions)--> chunks of R rows
    per chunk: logits = h @ W^T (R x V, fp32), loss += sum(logsumexp - logit[target]),
               dlogits = softmax - onehot  ->  dh = dlogits @ W,  dW += dlogits^T @ h

The gradients are computed in the forward (as Liger Kernel's fused linear cross-entropy does):
no logits chunk outlives its iteration, and the backward only scales the stored dh, dW by the
incoming gradient. Only the supervised positions go through the lm_head at all: a position whose
target is -100 adds nothing to the loss and receives a zero gradient in the plain path, so
skipping it changes neither the loss nor any gradient (asserted in tests/test_train_lean.py).

Backends: `liger` (Liger Kernel's Triton kernel, CUDA only, when installed), else `torch`
(this file, any device). Both take the same selected rows and the same normalisation.
"""
from __future__ import annotations

import types
from typing import Any, Callable

import torch

from ..constants import IGNORE_INDEX

CHUNK_ELEMENTS = 1 << 23  # logits values per chunk on the CPU: 8M x 4 bytes = 32 MB
CUDA_CHUNK_ELEMENTS = 1 << 26  # on a GPU bigger chunks keep the matmuls large (256 MB fp32)


def _compute_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    """The dtype the lm_head's matmul runs in: autocast's when it is on (as for nn.Linear)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(h @ W^T + b, target), every target valid (rows pre-selected).

    Forward returns the SUM (the caller normalises). Gradients are computed chunk by chunk in
    the forward and scaled by grad_output in the backward (grad_output is a scalar)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                chunk_rows: int, compute_dtype: torch.dtype) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        h_all = hidden.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # dW accumulates in fp32 whatever the compute dtype (sum over many chunks)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if (bias is not None and ctx.needs_input_grad[2]) else None
        for s in range(0, hidden.shape[0], chunk_rows):
            h = h_all[s:s + chunk_rows]
            t = target[s:s + chunk_rows]
            # the loss is taken in fp32, as HF's ForCausalLMLoss upcasts the logits
            logits = torch.nn.functional.linear(h, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_grad:
                # d(sum CE)/dlogits = softmax - onehot, computed in place over the chunk
                logits.sub_(lse[:, None]).exp_()
                logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                g = logits.to(compute_dtype)
                if grad_h is not None:
                    grad_h[s:s + chunk_rows] = (g @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w.add_(g.t() @ h)
                if grad_b is not None:
                    grad_b.add_(logits.sum(0))
            del logits
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        g = grad_out.float()
        dh = (grad_h * g.to(grad_h.dtype)) if grad_h is not None else None
        dw = (grad_w * g).to(ctx.weight_dtype) if grad_w is not None else None
        db = (grad_b * g).to(ctx.weight_dtype) if grad_b is not None else None
        return dh, dw, db, None, None, None


def liger_available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:  # not installed, or its Triton build does not load here
        return False
    return True


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
                           num_items_in_batch: Any = None, backend: str = "auto", chunk_elements: int | None = None) -> torch.Tensor:
    """The causal-LM loss of HF's ForCausalLMLoss without the [B, T, V] logits.

    hidden [B, T, H] (the decoder's last hidden states), weight [V, H] (the lm_head), labels
    [B, T] unshifted: hidden[:, t] is scored against labels[:, t + 1]. Normalisation as HF:
    sum of token losses / num_items_in_batch when given (the Trainer's supervised tokens of the
    whole accumulated batch), else the mean over supervised tokens."""
    H = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, H)
    t = labels[:, 1:].reshape(-1).to(hidden.device)
    keep = t != IGNORE_INDEX
    # Only supervised positions reach the lm_head (a device->host sync for the count; the plain
    # path pays the same sync in the Trainer's num_items_in_batch).
    idx = keep.nonzero().squeeze(1)
    h, t = h.index_select(0, idx), t.index_select(0, idx)
    if num_items_in_batch is None:
        denom = keep.sum()
    else:
        denom = num_items_in_batch
    cd = _compute_dtype(hidden.device, hidden.dtype)
    if backend == "auto":
        backend = "liger" if liger_available(hidden.device) else "torch"
    if h.shape[0] == 0:
        total = (hidden.sum() * 0.0).float() + (weight.sum() * 0.0).float()  # keeps the graph, zero gradient
    elif backend == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        total = liger_fused_linear_cross_entropy(h.to(cd), weight.to(cd), t, bias.to(cd) if bias is not None else None,
                                                 ignore_index=IGNORE_INDEX, reduction="sum").float()
    else:
        elements = chunk_elements or (CUDA_CHUNK_ELEMENTS if hidden.is_cuda else CHUNK_ELEMENTS)
        rows = max(1, elements // weight.shape[0])
        with torch.autocast(hidden.device.type, enabled=False):
            total = LinearCrossEntropy.apply(h, weight, bias, t, rows, cd)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / denom


# ---- the model side: a forward that hands hidden states to the chunked loss -------------------

class LeanLoss:
    """Installed on a HF causal LM (instance-level forward): when labels are given and
    `want_logits()` is False, the forward runs the decoder, then `chunked_causal_lm_loss`, and
    returns logits=None. Otherwise (no labels, generation, eval, or a step the probes sample
    with full logits) it is the model's own forward, unchanged.

    Installed before the Trainer wraps the forward (accelerate's autocast wrapper then wraps
    this one, so the decoder runs under the same autocast as the plain path)."""

    def __init__(self, model: Any, *, want_logits: Callable[[], bool] | None = None, backend: str = "auto"):
        self.model = model
        self.want_logits = want_logits or (lambda: False)
        self.backend = backend
        self.enabled = True
        self.lean_steps = 0
        self.full_steps = 0
        lean = self

        def forward(self_model, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
            # the class's forward, bound to the module this runs on (a deep copy included)
            original = type(self_model).forward.__get__(self_model)
            if (not lean.enabled or labels is None or not torch.is_grad_enabled() or kwargs.get("inputs_embeds") is not None
                    or kwargs.get("use_cache")):
                return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels, **kwargs)
            if lean.want_logits():
                lean.full_steps += 1
                return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels, **kwargs)
            lean.lean_steps += 1
            return lean_forward(self_model, input_ids, attention_mask, position_ids, labels, kwargs, lean.backend)

        model.forward = types.MethodType(forward, model)

    def remove(self) -> None:
        """The model's own forward from here on (accelerate may have wrapped ours: it stays, disabled)."""
        self.enabled = False


def lean_forward(model: Any, input_ids, attention_mask, position_ids, labels, kwargs: dict, backend: str = "auto"):
    """The causal LM's forward with the chunked loss: decoder -> hidden states -> loss; logits=None."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs = dict(kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("use_cache", None)
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs)
    head = model.get_output_embeddings()
    loss = chunked_causal_lm_loss(out.last_hidden_state, head.weight, labels, bias=getattr(head, "bias", None),
                                  num_items_in_batch=num_items, backend=backend)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def supports_lean(model: Any) -> str | None:
    """None when the lean loss can run on this model, else why not."""
    try:
        head = model.get_output_embeddings()
        decoder = model.get_decoder()
    except Exception as e:
        return f"{type(model).__name__} has no decoder/lm_head split ({type(e).__name__})"
    if not isinstance(head, torch.nn.Linear) or decoder is None or decoder is model:
        return f"{type(model).__name__}: the output layer is not a plain nn.Linear after a decoder"
    if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
        return f"{type(model).__name__} transforms its logits (softcapping/scale) before the loss"
    return None


def apply_fused_kernels(model: Any) -> str | None:
    """On CUDA with Liger Kernel installed: its fused RMSNorm, SwiGLU and RoPE on this model
    instance (the loss stays ours: fused_linear_cross_entropy off). Returns what was applied, or
    None. Note: Liger patches RoPE at module level (modeling_<arch>.apply_rotary_pos_emb), i.e.
    for every model of that architecture in this process."""
    try:
        if not torch.cuda.is_available():  # the Trainer moves the model to the GPU later
            return None
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except Exception:
        return None
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return "liger rms_norm, swiglu, rope"

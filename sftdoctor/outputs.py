"""What a running script saves and generates, checked under `watch`: sftdoctor.checkpoint and
sftdoctor.formats measure, the probes' judge functions decide (the same judgment `diagnose` makes
on a checkpoint folder through the probes' check())."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .checkpoint import in_memory, measure_generations, tensor_stats, tied_status
from .findings import Finding
from .probes import generation_degenerate, generation_never_stops, template_mismatch, tied_weights_mismatch, weights_nonfinite


def check_state_dict(state: Mapping[str, torch.Tensor], config: Any = None) -> list[Finding]:
    """weights-nonfinite and tied-weights-mismatch on an in-memory state dict (what a script saves):
    this module measures, the two probes judge.

    config: an HF config (or a dict) for tie_word_embeddings; None skips the tie check.
    """
    tensors = [in_memory(name, t) for name, t in state.items() if isinstance(t, torch.Tensor)]
    findings = weights_nonfinite.judge([tensor_stats(t) for t in tensors])
    tie = config.get("tie_word_embeddings") if isinstance(config, Mapping) else getattr(config, "tie_word_embeddings", None)
    if config is not None and tie is not None:
        findings += tied_weights_mismatch.judge(tied_status(tensors, bool(tie)))
    return findings


def check_generation_outputs(prompts: list[list[int]], outputs: list[list[int]], tokenizer_info: Any, *,
                             max_new_tokens: int | None = None, logits_nonfinite: Any = None,
                             training: Mapping[str, Any] | None = None) -> list[Finding]:
    """generation-degenerate (with its cause family) and generation-never-stops on greedy outputs
    (what `watch` checks after model.generate): measured here, judged by the two probes.

    non-finite logits make the family 'numerical', finite ones 'learned', unknown otherwise.
    training: what is known about how the model was trained (sftdoctor.verdict.undertrained keys:
    first_loss, last_loss, steps, vocab_size, eos_supervised, pad_is_eos_masked, ...).
    """
    g = measure_generations(prompts, outputs, tokenizer_info, max_new_tokens=max_new_tokens,
                            logits_nonfinite=logits_nonfinite)
    if g is None:
        return []
    return generation_degenerate.judge(g, training) + generation_never_stops.judge(g, training)


def generation_format_mismatch(train_rows: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]], tok: Any) -> Finding | None:
    """A template-mismatch finding when every training row and every prompt disagree on chat vs plain."""
    return template_mismatch.judge_generation(train_rows, prompts, tok)

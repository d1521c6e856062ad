"""Greedy generation must reach an end token. A fail names the cause (EOS never supervised, or
pad == eos with nothing saying EOS was supervised: labels masked by token id mask it); with EOS
supervised in training (a model saved by `sftdoctor train` says so) or no cause found, it is a
warn: undertrained, not broken."""
from __future__ import annotations

from typing import Any, Mapping

from sftdoctor.checkpoint import GenerationStats, measure_generations
from sftdoctor.findings import Finding
from sftdoctor.verdict import training_note, undertrained

id = "generation-never-stops"
level = "checkpoint"
summary = "greedy generation reaches max_new_tokens without EOS on most prompts"
needs = ("checkpoint", "tokenizer")
family = "symptom"
priority = 44
cause = "Generation runs to max_new_tokens without EOS."
remedy = None


def judge(g: GenerationStats | None, training: Mapping[str, Any] | None = None) -> list[Finding]:
    """The finding on measured greedy outputs (also what `watch` runs after model.generate):
    most of the outputs that are not degenerate ran to the limit without an end token."""
    if g is None:
        return []
    training = dict(training or {})
    cut, limit, n = g.cut, g.limit, g.n
    normal = [k for k in range(n) if not g.degenerate[k]]
    running = [k for k in normal if not cut[k][1] and len(cut[k][0]) >= limit]
    if not (normal and len(running) * 2 > len(normal)):
        return []
    lengths = [len(cut[k][0]) for k in normal]
    eos_text = [{"id": i, "text": g.text(i)} for i in sorted(g.stop_ids)]
    evidence = {"stop_rate": round(1 - len(running) / len(normal), 4), "prompts": len(normal),
                "never_stopped": len(running), "mean_length": round(sum(lengths) / len(lengths), 2),
                "max_new_tokens": limit, "end_tokens": eos_text, "pad_is_eos": g.pad_is_eos,
                "samples": [g.sample(k) for k in running[:3]]}
    eos_supervised = training.get("eos_supervised")
    head = (f"greedy generation ran to the {limit}-token limit without an end token on {len(running)} of "
            f"{len(normal)} prompts")
    fix = ("supervise the EOS / end-of-turn token at the end of every response; if pad == eos, mask padding "
           "by position (attention_mask == 0), not by token id, or use a pad token distinct from eos")
    if eos_supervised is False or training.get("pad_is_eos_masked"):
        evidence["cause"] = "eos-not-supervised"
        severity, message = "fail", head + ": EOS was never supervised in training, so the model never learned to emit it"
    elif g.pad_is_eos and eos_supervised is None:
        evidence["cause"] = "pad-is-eos"
        severity, message = "fail", (head + ": pad == eos, and masking the padding by token id masks every real EOS "
                                     "too, so the model never learns to emit EOS")
    else:
        evidence.update(undertrained(training))
        if eos_supervised:
            evidence["cause"] = "undertrained"
            message = (head + f": EOS was supervised in training{training_note(evidence)}, so the model has not "
                       "learned to stop yet: a capacity / training-length limit, not a defect")
            fix = "train longer or use a larger or pretrained model; the EOS supervision is correct"
        else:
            evidence["cause"] = "no-defect-found"
            message = (head + "; from the outputs alone no defect is named (pad differs from eos): check a training "
                       "batch with sftdoctor inspect-batch (labels-eos-missing, pad-is-eos-masked name the cause), "
                       "or the model is simply undertrained")
        severity = "warn"
    return [Finding(id=id, severity=severity, level=level, message=message, evidence=evidence, fix=fix)]


def check(ctx) -> list[Finding]:
    rec, tok = ctx.checkpoint, ctx.tokenizer
    training = ctx.hints.training
    found = judge(measure_generations([g["prompt_ids"] for g in rec.generations], [g["output_ids"] for g in rec.generations],
                                      tok, max_new_tokens=rec.max_new_tokens, logits_nonfinite=rec.logits_nonfinite),
                  training)
    for f in found:
        f.evidence["dtype"] = rec.generation_dtype
        f.evidence["pad_id"] = tok.pad_id
        if rec.special_rows:
            f.evidence["eos_row_norms"] = [{"token_id": r["token_id"], "ratio_to_mean": r["ratio_to_mean"]}
                                           for r in rec.special_rows if r["token_id"] in tok.eos_ids][:4]
    return found

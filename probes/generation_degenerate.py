"""Greedy generation must not repeat one token (the `!!!!` symptom). The family of the cause is
told from the logits: non-finite (numerical: NaN weights or a dtype overflow) or finite and
genuinely preferring the token (learned: e.g. labels padded with 0)."""
from __future__ import annotations

from sftdoctor.checkpoint import check_generation_outputs
from sftdoctor.findings import Finding

id = "generation-degenerate"
level = "checkpoint"
summary = "greedy generation repeats one token (the !!!! symptom), with its cause family"
needs = ("checkpoint", "tokenizer")


def _degenerate(rec, tok, training=None) -> list[Finding]:
    got = check_generation_outputs([g["prompt_ids"] for g in rec.generations], [g["output_ids"] for g in rec.generations],
                                   tok, max_new_tokens=rec.max_new_tokens, logits_nonfinite=rec.logits_nonfinite,
                                   training=training)
    return [f for f in got if f.id == id]


def check(ctx) -> list[Finding]:
    rec, tok = ctx.checkpoint, ctx.tokenizer
    found = _degenerate(rec, tok, ctx.hints.get("training"))
    if not found:
        return []
    f = found[0]
    ev = f.evidence
    served = rec.forward.get(rec.generation_dtype or rec.serve_dtype, {})
    fp32 = rec.forward.get("float32", {})
    token = ev["token_id"]
    ev["dtype"] = rec.generation_dtype
    ev["argmax_share"] = next((a["share"] for a in served.get("argmax_top", []) if a["token_id"] == token), 0.0)
    ev["p_id0"] = served.get("p_id0")
    ev["p_pad"] = served.get("p_pad")
    ev["fp32_logits_finite"] = fp32.get("logits_finite")
    nonfinite_weights = sum(1 for w in rec.weights if w["nan"] or w["inf"])
    if ev["family"] == "numerical":
        # which numerical cause: the weights themselves, or the dtype (finite in fp32)
        if nonfinite_weights:
            ev["cause"] = "weights-nonfinite"
        elif fp32.get("logits_finite") and rec.generation_dtype != "float32":
            ev["cause"] = "precision-inference-overflow"
            f.fix = (f"the model is finite in float32 but not in {rec.generation_dtype}: serve it in bfloat16 or float32 "
                     "(torch_dtype='auto' for a bf16-trained model), or use attn_implementation='sdpa'")
        else:
            ev["cause"] = "nonfinite-in-float32"  # finite weights, but not finite even in fp32
    if rec.base is not None:
        base_found = _degenerate(rec.base, tok)
        ev["base_degenerate"] = bool(base_found)
        if base_found and ev["family"] == "numerical":
            f.message += "; the base model does the same under these settings, so the fine-tune did not cause it"
    return [f]

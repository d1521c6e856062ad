"""Greedy generation must not repeat one token (the `!!!!` symptom). The family of the cause is
told from the logits: non-finite (numerical: NaN weights or a dtype overflow) or finite and
genuinely preferring the token (learned: e.g. labels padded with 0)."""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

from sftdoctor.checkpoint import GenerationStats, measure_generations
from sftdoctor.findings import Finding
from sftdoctor.verdict import training_note, undertrained

id = "generation-degenerate"
level = "checkpoint"
summary = "greedy generation repeats one token (the !!!! symptom), with its cause family"
needs = ("checkpoint", "tokenizer")
family = "symptom"
priority = 42
cause = "Greedy generation repeats one token (the `!!!!` symptom)."
remedy = None


def judge(g: GenerationStats | None, training: Mapping[str, Any] | None = None) -> list[Finding]:
    """The finding on measured greedy outputs (also what `watch` runs after model.generate).

    Severity (docs/findings.md, "bad output, no defect found"): fail only when the cause is named:
    non-finite logits, or the repeated token is the pad token / id 0 / eos-as-pad. Otherwise the
    output is bad but no defect was found: warn with evidence.cause 'undertrained' and what the
    training evidence says."""
    if g is None:
        return []
    training = dict(training or {})
    cut, firsts, degenerate, emits_pad, nonfinite = g.cut, g.firsts, g.degenerate, g.emits_pad, g.nonfinite
    pad_id = g.pad_id
    n, n_deg = g.n, sum(degenerate)
    if not (n_deg * 2 >= n and n_deg):
        return []
    counts = Counter(t for (toks, _), d in zip(cut, degenerate) if d for t in toks)
    counts.update(f for f, e in zip(firsts, emits_pad) if e)  # the pad token that ended an empty output
    token_id, token_count = counts.most_common(1)[0] if counts else (0, 0)  # empty outputs: id 0 ended them
    gen_total = sum(len(toks) for (toks, _), d in zip(cut, degenerate) if d) + sum(emits_pad)
    family = "unknown" if nonfinite is None else ("numerical" if nonfinite else "learned")
    tok_text = g.text(token_id)
    pad_token = token_id == pad_id or token_id == 0
    named = bool(nonfinite) or pad_token
    why = {"numerical": "logits are NaN/inf (argmax of an all-NaN row is id 0)",
           "learned": "logits are finite, so the weights genuinely prefer it",
           "unknown": "logits were not checked"}[family]
    fix = {
        "numerical": ("load and serve in float32 or bfloat16 (torch_dtype='auto'), not float16; if the weights "
                      "themselves hold NaN (weights-nonfinite), retrain with fp32 master weights"),
        "learned": ("the model was trained to emit this token: pad labels with -100, never with 0 or pad_id "
                    "(check a batch with sftdoctor inspect-batch), then retrain"),
        "unknown": "run sftdoctor diagnose on the saved model to tell a numerical cause from a learned one",
    }[family]
    what = "emits" if sum(emits_pad) * 2 >= n_deg else "repeats"
    evidence: dict[str, Any] = {
        "family": family, "degenerate_prompts": n_deg, "prompts": n, "token_id": int(token_id),
        "token_text": tok_text, "token_share": round(token_count / max(gen_total, 1), 4),
        "token_is_pad": token_id == pad_id, "token_is_id0": token_id == 0,
        "logits_finite": None if nonfinite is None else not nonfinite,
        "samples": [g.sample(k) for k in range(n) if degenerate[k]][:3],
    }
    if named:
        if not nonfinite:
            evidence["cause"] = "pad-token-learned" if token_id == pad_id else "id0-learned"
        message = (f"greedy generation {what} token {token_id} {tok_text!r} on {n_deg} of {n} prompts; {why} "
                   f"({family} family)")
        severity = "fail"
    else:
        # bad output, no defect found: a repeated ordinary token from a model that is still (nearly) untrained
        evidence.update(undertrained(training))
        message = (f"greedy generation repeats token {token_id} {tok_text!r} on {n_deg} of {n} prompts, but no "
                   f"defect was found: logits {'finite' if nonfinite is False else 'not checked'}, the token is not the "
                   f"pad token or id 0{training_note(evidence)}; the model is undertrained, not broken")
        fix = ("train longer (more steps or epochs), from a pretrained model, or with a larger model; the pipeline "
               "checks found nothing to fix")
        severity = "warn"
    return [Finding(id=id, severity=severity, level=level, message=message, evidence=evidence, fix=fix)]


def _degenerate(rec, tok, training=None) -> list[Finding]:
    return judge(measure_generations([g["prompt_ids"] for g in rec.generations], [g["output_ids"] for g in rec.generations],
                                     tok, max_new_tokens=rec.max_new_tokens, logits_nonfinite=rec.logits_nonfinite),
                 training)


def check(ctx) -> list[Finding]:
    rec, tok = ctx.checkpoint, ctx.tokenizer
    found = _degenerate(rec, tok, ctx.hints.training)
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

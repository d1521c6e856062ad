"""The argmax prediction concentrates on one token over most real positions (e.g. 97% predict id 0).
Family: numerical when the logits at those positions are non-finite (argmax of NaN is 0), learned
otherwise (e.g. labels padded with 0 taught the model to emit token 0). A fail only with a named
cause (non-finite logits, or the token is the pad / id 0 / eos-as-pad); collapsing onto an ordinary
frequent token is early training, reported as info with the undertrained evidence."""
from __future__ import annotations

from sftdoctor.findings import Finding

id = "prediction-collapse"
level = "step"
summary = "argmax concentrates on one token over most positions (names the token and the cause family)"
needs = ("step", "forward_stats")
family = "symptom"
priority = 40
cause = "Predictions collapsed onto one token."
remedy = None

MIN_SHARE = 0.9
MIN_POSITIONS = 16
MARGIN = 0.5  # top share must exceed how often that token really comes next by this much


def check(ctx) -> list[Finding]:
    a = ctx.step.argmax
    if not a or a["positions"] < MIN_POSITIONS:
        return []
    if a["top_share"] < MIN_SHARE or a["top_share"] - a["natural_share"] < MARGIN:
        return []
    family = "numerical" if a["top_nonfinite_share"] >= 0.5 else "learned"
    tok = ctx.tokenizer
    token = a["top_token"]
    text = a["histogram"][0].get("text") or (tok.token_text(token) if tok else "")
    pad_id = tok.pad_id if tok is not None else None
    eos_ids = set(tok.eos_ids) if tok is not None else set()
    # the cause is named when the logits are non-finite or the token is the padding's label (pad id,
    # id 0, or eos where pad == eos); otherwise collapsing onto a frequent token is how every model
    # starts (a unigram predictor), and only a FAIL with a named cause is a FAIL
    pad_like = token == pad_id or token == 0 or (pad_id is not None and pad_id in eos_ids and token in eos_ids)
    evidence = {"step": ctx.step.step, "token_id": token, "text": text, "share": a["top_share"],
                "positions": a["positions"], "natural_share": a["natural_share"],
                "nonfinite_share_at_token": a["top_nonfinite_share"], "family": family,
                "histogram": a["histogram"]}
    head = f"{a['top_share']:.0%} of {a['positions']} positions predict token {token} {text!r}"
    if family == "numerical" or pad_like:
        return [Finding(
            id=id, severity="fail", level=level,
            message=head + f" ({family}: logits {'non-finite' if family == 'numerical' else 'finite'} there)",
            evidence={**evidence, "cause": "nonfinite-logits" if family == "numerical" else "pad-token-learned"},
            fix=("numerical: fix the non-finite logits first (see logits-nonfinite); learned: check the labels "
                 "(padding supervised with 0 or pad id, see grad-from-ignored-tokens) and lower the learning rate"),
        )]
    from sftdoctor.verdict import undertrained

    vocab = getattr(ctx.model, "embedding_rows", None) if ctx.model is not None else None
    first = ctx.run.records[0].loss if ctx.run is not None and ctx.run.records else None
    evidence.update(undertrained({"first_loss": first, "last_loss": ctx.step.loss, "steps": ctx.step.step + 1,
                                  "vocab_size": vocab}))
    evidence["cause"] = "undertrained"
    return [Finding(
        id=id, severity="info", level=level,
        message=(head + ": logits are finite and the token is not the pad token or id 0, so no defect is named; a model "
                 "this early in training predicts its most frequent target everywhere"),
        evidence=evidence,
        fix="nothing to fix if the loss keeps falling; if it stays like this for many steps, lower the learning rate",
    )]

"""The argmax prediction concentrates on one token over most real positions (e.g. 97% predict id 0
`!`). Family: numerical when the logits at those positions are non-finite (argmax of NaN is 0),
learned otherwise (e.g. labels padded with 0 taught the model to emit token 0)."""
from __future__ import annotations

from sftdoctor.findings import Finding

id = "prediction-collapse"
level = "step"
summary = "argmax concentrates on one token over most positions (names the token and the cause family)"
needs = ("step", "forward_stats")
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
    text = a["histogram"][0].get("text") or (tok.token_text(a["top_token"]) if tok else "")
    return [Finding(
        id=id, severity="fail", level=level,
        message=(f"{a['top_share']:.0%} of {a['positions']} positions predict token {a['top_token']} {text!r} "
                 f"({family}: logits {'non-finite' if family == 'numerical' else 'finite'} there)"),
        evidence={"step": ctx.step.step, "token_id": a["top_token"], "text": text, "share": a["top_share"],
                  "positions": a["positions"], "natural_share": a["natural_share"],
                  "nonfinite_share_at_token": a["top_nonfinite_share"], "family": family,
                  "histogram": a["histogram"]},
        fix=("numerical: fix the non-finite logits first (see logits-nonfinite); learned: check the labels "
             "(padding supervised with 0 or pad id, see grad-from-ignored-tokens) and lower the learning rate"),
    )]

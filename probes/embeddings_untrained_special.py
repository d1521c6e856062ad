"""The embedding rows of the special tokens a model must read or emit (eos / end-of-turn, pad,
bos, chat-template markers) should look trained: not zero, not copies of each other, not far
from the mean row norm (an untrained end-of-turn row is why some fine-tunes never stop)."""
from __future__ import annotations

from sftdoctor.findings import Finding

id = "embeddings-untrained-special"
level = "checkpoint"
summary = "special-token embedding rows are zero, duplicated or far from the mean norm"
needs = ("checkpoint",)
remedy = None

FAR = 10.0  # a row norm more than 10x below or above the mean row norm is "far"


def _problem(row) -> str | None:
    if row["zero"]:
        return "zero"
    if row["duplicate_of"] is not None:
        return "duplicate"
    r = row.get("ratio_to_mean")
    if r is not None and (r < 1 / FAR or r > FAR):
        return "norm"
    return None


def check(ctx) -> list[Finding]:
    rows = [dict(r, problem=_problem(r)) for r in ctx.checkpoint.special_rows]
    bad = [r for r in rows if r["problem"]]
    if not bad:
        return []
    first = bad[0]
    return [Finding(
        id=id, severity="warn", level=level,
        message=(f"{len(bad)} special-token row(s) look untrained: {first['token']!r} (id {first['token_id']}) in "
                 f"{first['matrix']} is {first['problem']} (norm {first['norm']:.3g}, mean row norm {first['mean_norm']:.3g})"),
        evidence={"rows": [{k: r[k] for k in ("token_id", "token", "matrix", "norm", "mean_norm", "ratio_to_mean", "problem", "duplicate_of")}
                           for r in bad[:16]], "checked": len(rows)},
        fix=("train these rows: supervise the end token in every response (and unfreeze embed_tokens / lm_head, or "
             "list them in modules_to_save under LoRA); initialise added tokens from the mean embedding, not zeros"),
    )]

"""config.tie_word_embeddings must agree with the saved lm_head / embedding tensors, or a loader
either initialises lm_head randomly or silently drops the trained one."""
from __future__ import annotations

from typing import Any, Mapping

from sftdoctor.findings import Finding

id = "tied-weights-mismatch"
level = "checkpoint"
summary = "tie_word_embeddings disagrees with the saved lm_head / embedding tensors"
needs = ("checkpoint",)
remedy = None


def judge(tied: Mapping[str, Any]) -> list[Finding]:
    """The finding on sftdoctor.checkpoint.tied_status (config flag, tensor names, equality); also
    what `watch` runs on the weights a script saves."""
    flag, emb, head, equal = tied.get("config_tie"), tied.get("embedding"), tied.get("lm_head"), tied.get("equal")
    if emb is None:
        return []  # no recognisable input embedding: nothing to compare
    problem = None
    if flag is False and head is None:
        problem = ("tie_word_embeddings is false but no lm_head tensor was saved: a loader initialises lm_head "
                   "randomly and the model prints garbage")
        fix = "set tie_word_embeddings=true in config.json if the model was tied, or save the lm_head weight"
    elif flag is True and head is not None and equal is False:
        problem = (f"tie_word_embeddings is true but the saved {head} differs from {emb}: a loader ties them and "
                   "silently drops the trained lm_head")
        fix = "save with the weights tied (model.tie_weights() before save_pretrained), or set tie_word_embeddings=false"
    if problem is None:
        return []
    return [Finding(id=id, severity="warn", level=level, message=problem,
                    evidence={"tie_word_embeddings": flag, "embedding": emb, "lm_head": head, "equal": equal,
                              "max_diff": tied.get("max_diff")}, fix=fix)]


def check(ctx) -> list[Finding]:
    return judge(ctx.checkpoint.tied)

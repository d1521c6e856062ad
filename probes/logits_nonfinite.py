"""The logits contain NaN/inf. argmax of an all-NaN row is id 0, which prints as `!` in GPT-2/Qwen
vocabularies (the `!!!!` incident, numerical family). Names the first module, in forward order,
whose output went non-finite."""
from __future__ import annotations

from sftdoctor.findings import Finding

id = "logits-nonfinite"
level = "step"
summary = "logits contain NaN/inf; names the first module whose output went non-finite"
needs = ("step", "forward_stats")
family = "numerical"
priority = 22
cause = "The logits are NaN/inf; argmax of a NaN row is id 0."
remedy = "dtype"


def first_nonfinite(rows, phase="forward"):
    """(row, previous finite row) for the first non-finite output in call order."""
    prev = None
    for r in rows:
        if r["phase"] != phase:
            continue
        if not r["finite"]:
            return r, prev
        prev = r
    return None, prev


def check(ctx) -> list[Finding]:
    r = ctx.step
    lg = r.logits
    if lg is None or not lg.get("nonfinite_all_positions"):
        return []
    first, prev = first_nonfinite(r.activations)
    n_all = lg["nonfinite_all_positions"]
    share = lg["nonfinite_share"]
    where = f"; first non-finite output: {first['module']} ({first['dtype']})" if first else ""
    return [Finding(
        id=id, severity="fail", level=level,
        message=f"{lg['nonfinite_positions']} of {lg['positions']} real positions have non-finite logits ({share:.0%}){where}",
        evidence={
            "step": r.step, "nonfinite_positions": lg["nonfinite_positions"], "positions": lg["positions"],
            "nonfinite_share": share, "nonfinite_positions_incl_pad": n_all, "rows": lg.get("rows", []),
            "logits_dtype": lg.get("dtype"),
            "first_nonfinite_module": first["module"] if first else None,
            "first_nonfinite_dtype": first["dtype"] if first else None,
            "previous_module": prev["module"] if prev else None,
            "previous_max_abs": prev["max_abs"] if prev else None,
        },
        fix=("fix the module named above: in fp16 switch to bf16 or fp32 (or keep it in fp32); check the weights "
             "for NaN/inf and the attention mask for rows that can see no token"),
    )]

"""The generation stack must stop on the end token the model was trained to emit: the ids in
generation_config.json (else config.json) must include the tokenizer's eos and every end
token the model actually emits; pad must be set somewhere."""
from __future__ import annotations

from sftdoctor.findings import Finding

id = "generation-config-eos"
level = "checkpoint"
summary = "generation_config eos lacks the end token the model emits, or pad is unset"
needs = ("checkpoint", "tokenizer")
remedy = None


def check(ctx) -> list[Finding]:
    rec, tok = ctx.checkpoint, ctx.tokenizer
    gc = rec.generation_config or {}
    gen_eos = set(gc.get("eos_token_id") or [])
    expected = {rec.config.get("tokenizer_eos_id")} - {None}
    # end tokens the model emitted in greedy decoding (generation stopped on them)
    emitted = {g["output_ids"][-1] for g in rec.generations if g["stopped"] and g["output_ids"]}
    expected |= emitted & set(tok.eos_ids)
    missing = sorted(expected - gen_eos)
    pad_unset = tok.pad_id is None and gc.get("pad_token_id") is None
    problems = []
    if missing:
        where = gc.get("source") or "generation_config.json"
        ends = ", ".join(f"{i} {tok.token_text(i)!r}" for i in missing)
        problems.append(f"{where} sets no eos_token_id (the model's end token is {ends})" if not gen_eos
                        else f"{where} eos_token_id {sorted(gen_eos)} lacks {ends}")
    if pad_unset:
        problems.append("no pad token is set (tokenizer or generation_config)")
    if not problems:
        return []
    return [Finding(
        id=id, severity="warn", level=level,
        message="; ".join(problems) + (": generation will not stop where the model ends its answer" if missing else ""),
        evidence={"generation_eos_ids": sorted(gen_eos), "source": gc.get("source"),
                  "tokenizer_eos_id": rec.config.get("tokenizer_eos_id"), "emitted_end_ids": sorted(emitted),
                  "missing": [{"id": i, "text": tok.token_text(i)} for i in missing],
                  "pad_id": tok.pad_id, "generation_pad_id": gc.get("pad_token_id")},
        fix=("set model.generation_config.eos_token_id to a list holding every end token the model emits (e.g. "
             "[<|im_end|>, <|endoftext|>]) and a pad_token_id, then save_pretrained again"),
    )]

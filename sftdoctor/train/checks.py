"""After the final save: reload the model from disk and check what was written, not what is
in memory: `sftdoctor.diagnose.diagnose` (the checkpoint probes), and the minimum that must hold
even when diagnose fails: every weight finite, greedy generation stops, measured here on the
reloaded model and judged by the weights-nonfinite and generation-never-stops probes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .. import trainmeta
from ..checkpoint import CheckpointRecord, state_dict_weights
from ..context import ProbeContext, TokenizerInfo
from ..diagnose import diagnose
from ..session import Session
from .pipeline import Pipeline, stop_ids

CHECK_PROMPTS = 8
DIAGNOSE_PROMPTS = 4  # the checkpoint probes decode one prompt at a time


def check_saved(folder: Path, session: Session, pipe: Pipeline, say) -> Any:
    """Returns the reloaded model (for evaluation), or None when it cannot be used."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..loading import remote_code_allowed

    trust = remote_code_allowed()  # --trust-remote-code, else False (never a [y/N] prompt on stdin)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
    prompts = [r["question"] for r in pipe.eval_rows[:CHECK_PROMPTS]]
    info: dict[str, Any] = {"folder": str(folder)}
    try:
        fmt = "chat" if pipe.recipe.prompt_format == "chat" else "Question: {question}\nAnswer:"
        sub = diagnose(str(folder), prompts=prompts[:DIAGNOSE_PROMPTS], prompt_format=fmt, num_prompts=DIAGNOSE_PROMPTS,
                       max_new_tokens=pipe.recipe.max_new_tokens or 48, registry=session.registry)
        session.merge(sub)
        info["diagnose"] = {"verdict": sub.verdict, "findings": sorted(sub.ids())}
    except Exception as e:  # a failure of the checker must not lose a trained model: said in the report
        info["diagnose_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    # The minimum, always: finite weights and a generation that stops (the probes judge; a finding
    # diagnose already made above is kept, Report.add keeps the first per id).
    weights = state_dict_weights(model.state_dict())
    bad = [w["name"] for w in weights if w["nan"] or w["inf"]]
    _judge(session, CheckpointRecord(path=str(folder), weights=weights), None, {}, "weights-nonfinite")
    from .evaluate import generate_answers

    budget = pipe.recipe.max_new_tokens or 64
    stops = stop_ids(tokenizer, pipe.recipe.prompt_format)
    answers = generate_answers(model, tokenizer, prompts, prompt_format=pipe.recipe.prompt_format,
                               stop=stops, max_new_tokens=budget, batch_size=len(prompts) or 1)
    stop_rate = sum(a["stopped"] for a in answers) / max(len(answers), 1)
    info.update({"weights_finite": not bad, "stop_rate": stop_rate, "prompts": len(answers),
                 "sample": answers[0]["text"] if answers else None})
    # the probe reads the end tokens generation stopped on, the recipe's own included
    tok = TokenizerInfo.from_tokenizer(tokenizer)
    tok = dataclasses.replace(tok, eos_ids=frozenset(tok.eos_ids) | frozenset(stops))
    rec = CheckpointRecord(path=str(folder), generation_dtype="float32", max_new_tokens=budget,
                           generations=[{"prompt_ids": a["prompt_ids"], "output_ids": a["output_ids"], "stopped": a["stopped"]}
                                        for a in answers])
    training = (trainmeta.read(folder) or {}).get("training", {})
    _judge(session, rec, tok, {"training": training}, "generation-never-stops")
    session.report.metrics["reload_check"] = info
    say(f"reload check: weights {'finite' if not bad else 'NOT finite'}, generation stops on {stop_rate:.0%} of {len(answers)} prompts")
    return None if bad else model


def _judge(session: Session, rec: CheckpointRecord, tok: TokenizerInfo | None, hints: dict[str, Any], fid: str) -> None:
    """Run the checkpoint probe `fid` on what was measured; add its finding and its check."""
    found, checks = session.evaluate(ProbeContext(checkpoint=rec, tokenizer=tok, hints=hints), "checkpoint", only=(fid,))
    for f in found:
        f.step = None  # the reload check belongs to no training step
    session.record(found, checks)

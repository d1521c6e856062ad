"""After the final save: reload the model from disk and check what was written, not what is
in memory. Uses `sftdoctor.diagnose.diagnose` (the checkpoint probes) when it is available;
the built-in minimum is: every weight finite, greedy generation stops.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..findings import CheckResult, Finding
from ..report import Report
from .pipeline import Pipeline, stop_ids

CHECK_PROMPTS = 8
DIAGNOSE_PROMPTS = 4  # the checkpoint probes decode one prompt at a time


def check_saved(folder: Path, report: Report, pipe: Pipeline, say) -> Any:
    """Returns the reloaded model (for evaluation), or None when it cannot be used."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..loading import remote_code_allowed

    trust = remote_code_allowed()  # --trust-remote-code, else False (never a [y/N] prompt on stdin)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
    prompts = [r["question"] for r in pipe.eval_rows[:CHECK_PROMPTS]]
    info: dict[str, Any] = {"folder": str(folder)}
    try:
        from ..diagnose import diagnose
    except ImportError:
        diagnose = None
    if diagnose is not None:
        try:
            fmt = "chat" if pipe.recipe.prompt_format == "chat" else "Question: {question}\nAnswer:"
            sub = diagnose(str(folder), prompts=prompts[:DIAGNOSE_PROMPTS], prompt_format=fmt, num_prompts=DIAGNOSE_PROMPTS,
                           max_new_tokens=pipe.recipe.max_new_tokens or 48)
            report.merge(sub)
            info["diagnose"] = {"verdict": sub.verdict, "findings": sorted(sub.ids())}
        except Exception as e:  # an unfinished checker must not lose a trained model
            info["diagnose_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    # The minimum, always: finite weights and a generation that stops.
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()}
    if bad:
        report.add([Finding(id="weights-nonfinite", severity="fail", level="checkpoint",
                            message=f"{len(bad)} saved tensors hold NaN/inf", evidence={"tensors": dict(list(bad.items())[:20])},
                            fix="train in bf16 or fp32; look at the step findings for the first non-finite value")])
    report.record_checks([CheckResult(id="weights-nonfinite", status="fail" if bad else "pass", level="checkpoint")])
    from .evaluate import generate_answers

    budget = pipe.recipe.max_new_tokens or 64
    answers = generate_answers(model, tokenizer, prompts, prompt_format=pipe.recipe.prompt_format,
                               stop=stop_ids(tokenizer, pipe.recipe.prompt_format), max_new_tokens=budget, batch_size=len(prompts) or 1)
    stop_rate = sum(a["stopped"] for a in answers) / max(len(answers), 1)
    info.update({"weights_finite": not bad, "stop_rate": stop_rate, "prompts": len(answers),
                 "sample": answers[0]["text"] if answers else None})
    never_stops = None
    if answers and stop_rate < 0.5:
        never_stops = _never_stops(folder, stop_rate, len(answers), budget, sum(a["new_tokens"] for a in answers) / len(answers))
        report.add([never_stops])
    report.record_checks([CheckResult(id="generation-never-stops", status=never_stops.severity if never_stops else "pass", level="checkpoint")])
    report.metrics["reload_check"] = info
    say(f"reload check: weights {'finite' if not bad else 'NOT finite'}, generation stops on {stop_rate:.0%} of {len(answers)} prompts")
    return None if bad else model



def _never_stops(folder: Path, stop_rate: float, prompts: int, budget: int, mean_new: float) -> Finding:
    """A fail only when EOS was not supervised; with EOS supervised (this recipe appends it and
    preflight checked it) a model that does not stop yet is undertrained: a warn with the evidence."""
    from .. import trainmeta
    from ..verdict import undertrained

    training = (trainmeta.read(folder) or {}).get("training", {})
    ev = {"stop_rate": stop_rate, "max_new_tokens": budget, "mean_new_tokens": mean_new, "prompts": prompts}
    head = f"the reloaded model stopped on {stop_rate:.0%} of {prompts} prompts within {budget} new tokens"
    if training.get("eos_supervised"):
        ev.update(undertrained(training))
        return Finding(id="generation-never-stops", severity="warn", level="checkpoint",
                       message=head + "; EOS was supervised in every training row, so this is a capacity / training-length "
                                      "limit of this model, not a defect",
                       evidence=ev, fix="train longer or use a larger or pretrained model (--model)")
    ev["cause"] = "eos-not-supervised" if training.get("eos_supervised") is False else "unknown"
    return Finding(id="generation-never-stops", severity="fail", level="checkpoint", message=head, evidence=ev,
                   fix="supervise EOS at the end of each answer; check generation_config.eos_token_id")

"""Preflight: run the probes on the first real batches of this pipeline with this model
before any optimizer step, and (with --fix) repair what has a known remedy.

A fail finding stops the run before it spends compute. `--fix` applies the remedy of each
finding that has one, prints each change as a before -> after line, rebuilds the pipeline and
runs preflight again to confirm.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..context import ProbeContext
from ..api import inspect_batch
from ..engine import Probe
from ..errors import UserError
from ..findings import CheckResult, Finding
from ..probes import ALL, REGISTRY, truncation_answer_lost
from ..report import Report
from ..session import Session
from ..stepstats import StepRecord
from .collate import IGNORE_INDEX
from .pipeline import Pipeline, add_pad_token, build_pipeline, resize_embeddings, safe_dtype, tokenize

PREFLIGHT_BATCHES = 2  # the first micro-batches training will see, plus one mixed-length batch


@dataclass
class Change:
    finding: str  # the finding id that asked for this change
    what: str
    before: str
    after: str
    also: list[str] = field(default_factory=list)  # other finding ids this change answers

    @property
    def findings(self) -> list[str]:
        return [self.finding, *self.also]

    def line(self) -> str:
        return f"{self.what}: {self.before} -> {self.after}   (fixes {', '.join(self.findings)})"

    def to_dict(self) -> dict[str, Any]:
        return {"finding": self.finding, "findings": self.findings, "what": self.what, "before": self.before, "after": self.after}


# ---- checks on the whole recipe/dataset (the batch probes see only a few rows) ----------------

def recipe_findings(pipe: Pipeline, session: Session) -> tuple[list[Finding], list[CheckResult]]:
    """What the recipe itself says is unsafe, under the spec's finding ids: measured here on the
    whole recipe/dataset, judged by the probes of those ids."""
    r, out, checks = pipe.recipe, [], []
    # the dtype training will run in, as a step record: precision-fp16-unsafe reads the autocast and checkpoint dtypes
    step = StepRecord(step=0, optimizer_step_index=0, full=False,
                      dtypes={"autocast": "float16" if pipe.dtype == "fp16" else None, "config": pipe.saved_dtype})
    found, checks = session.evaluate(ProbeContext(step=step), "step", only=("precision-fp16-unsafe",))
    for f in found:
        f.step = None  # before training: no step
    out += found
    if "truncation-answer-lost" in session.ignore:
        return out, checks
    lost = 0
    if pipe.length_stats.get("truncated"):
        lost = sum(1 for ex in pipe.train_examples if ex["labels"][-1] == IGNORE_INDEX or
                   ex["input_ids"][-1] not in _stop_ids(pipe))
    lost_found = truncation_answer_lost.judge_recipe(
        rows=pipe.length_stats.get("rows"), truncated_rows=pipe.length_stats.get("truncated"), answer_lost_rows=lost,
        max_length=r.max_length, longest_row=max((len(ex["input_ids"]) for ex in pipe.train_examples), default=0))
    out += lost_found
    checks.append(CheckResult(id="truncation-answer-lost", status=lost_found[0].severity if lost_found else "pass",
                              level=lost_found[0].level if lost_found else "batch"))
    return out, checks


def _stop_ids(pipe: Pipeline) -> set[int]:
    from .pipeline import stop_ids

    return set(stop_ids(pipe.tokenizer, pipe.recipe.prompt_format))


# ---- running the probes -----------------------------------------------------------------------

def hints(pipe: Pipeline) -> dict[str, Any]:
    return {
        "max_length": pipe.recipe.max_length,
        "prompt_supervised_on_purpose": not pipe.recipe.mask_prompt and not pipe.recipe.collator,
        "compute_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[pipe.dtype],
        "checkpoint_dtype": pipe.saved_dtype,
        "answer_marker": "####",
    }


def run_preflight(pipe: Pipeline, *, global_batch: int, ignore: set[str] = frozenset(), batches: int = PREFLIGHT_BATCHES) -> Report:
    """Probes on the first `batches` micro-batches in training order and on one batch of mixed
    lengths (so padding is exercised), plus the recipe checks."""
    session = Session("train", REGISTRY, ignore=ignore)
    report = session.report
    shown_failure = False
    try:
        checked = pipe.first_batches(batches, global_batch, pipe.recipe.seed) + [pipe.mixed_length_batch()]
    except Exception as e:  # the user's collate function raised: say so in one line
        if not pipe.recipe.collator:
            raise
        raise UserError(f"--collator {pipe.recipe.collator} raised {type(e).__name__}: {str(e)[:200]}") from None
    for k, batch in enumerate(checked):
        try:
            # step probes (when available) run a forward+backward on this batch with no update
            one = inspect_batch(batch, pipe.tokenizer, pipe.model, hints=hints(pipe), ignore=ignore, command="train")
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # a user collator returned something unusable
            if not pipe.recipe.collator:
                raise
            raise UserError(f"--collator {pipe.recipe.collator} returned a batch preflight cannot read ({type(e).__name__}: {str(e)[:160]}); "
                            "return a dict with input_ids, attention_mask and labels tensors") from None
        for f in one.findings:
            f.step = None
        session.merge(one)
        if k == 0 or (one.verdict == "fail" and not shown_failure):
            # the token view shows the first batch, or the first batch that failed
            shown_failure = one.verdict == "fail"
            report.samples = one.samples
            report.metrics["preflight_batch"] = one.metrics.get("batch", {})
            report.metrics["token_classes"] = one.metrics.get("token_classes", {})
            for key in ("tokenizer", "model"):
                if key in one.metrics:
                    report.metrics[key] = one.metrics[key]
    own, checks = recipe_findings(pipe, session)
    session.record(own, [c for c in checks if c.status != "skipped"])  # an ignored id records nothing, as before
    return session.finish()


# ---- remedies ---------------------------------------------------------------------------------

def _use_builtin_collator(pipe: Pipeline, fid: str) -> list[Change]:
    if not pipe.recipe.collator:
        return []
    before = pipe.recipe.collator
    pipe.recipe = pipe.recipe.replace(collator=None)
    return [Change(fid, "collator", before, "built-in (right padding; labels -100 on prompt and padding; attention_mask 1 on every real token)")]


def _fix_prompt(pipe: Pipeline, fid: str) -> list[Change]:
    changes = _use_builtin_collator(pipe, fid)
    if not changes and not pipe.recipe.mask_prompt:
        pipe.recipe = pipe.recipe.replace(mask_prompt=True)
        changes = [Change(fid, "mask_prompt", "False", "True (only the answer and EOS are supervised)")]
    return changes


def _fix_eos(pipe: Pipeline, fid: str) -> list[Change]:
    changes = _use_builtin_collator(pipe, fid)
    if not pipe.recipe.append_eos:
        pipe.recipe = pipe.recipe.replace(append_eos=True)
        changes.append(Change(fid, "append_eos", "False", "True (each answer ends with a supervised EOS)"))
    return changes


def _fix_dtype(pipe: Pipeline, fid: str) -> list[Change]:
    if pipe.dtype != "fp16":
        return []
    safe = safe_dtype()
    pipe.recipe = pipe.recipe.replace(dtype=safe)
    why = "bf16 keeps fp32's range" if safe == "bf16" else "no bf16 GPU here"
    return [Change(fid, "dtype", "fp16", f"{safe} ({why})")]


def _fix_truncation(pipe: Pipeline, fid: str) -> list[Change]:
    r = pipe.recipe
    longest = max(len(ex["input_ids"]) for ex in tokenize(pipe.tokenizer, pipe.train_rows, r))  # uncut lengths
    limit = getattr(pipe.model.config, "max_position_embeddings", None) or longest
    if longest <= limit:
        pipe.recipe = r.replace(max_length=longest, overlong="drop")
        return [Change(fid, "max_length", str(r.max_length), f"{longest} (fits every answer)")]
    pipe.recipe = r.replace(overlong="drop", max_length=limit)
    return [Change(fid, "overlong", "truncate", f"drop (rows longer than {limit} tokens are dropped and counted)")]


def _fix_vocab(pipe: Pipeline, fid: str) -> list[Change]:
    before = pipe.model.get_input_embeddings().weight.shape[0]
    resize_embeddings(pipe.tokenizer, pipe.model)
    after = pipe.model.get_input_embeddings().weight.shape[0]
    return [Change(fid, "embedding rows", str(before), str(after))] if after != before else []


def _fix_pad(pipe: Pipeline, fid: str) -> list[Change]:
    if pipe.tokenizer.pad_token_id is not None and pipe.tokenizer.pad_token_id != pipe.tokenizer.eos_token_id:
        return []
    return [Change(fid, "pad token", "EOS", add_pad_token(pipe.tokenizer, pipe.model).split(": ", 1)[1])]


def _fix_empty_rows(pipe: Pipeline, fid: str) -> list[Change]:
    changes = _use_builtin_collator(pipe, fid)
    if changes:
        return changes
    n = len(pipe.train_examples)
    kept = [ex for ex in pipe.train_examples if any(x != IGNORE_INDEX for x in ex["labels"])]
    if len(kept) == n:
        return []
    pipe.train_examples = kept
    return [Change(fid, "training rows", str(n), f"{len(kept)} (rows with no supervised token dropped)")]


# Remedy name (a probe's `remedy` declaration) -> the function that applies it.
REMEDIES: dict[str, Callable[[Pipeline, str], list[Change]]] = {
    "collator": _use_builtin_collator,
    "prompt": _fix_prompt,
    "eos": _fix_eos,
    "empty_rows": _fix_empty_rows,
    "truncation": _fix_truncation,
    "vocab": _fix_vocab,
    "pad": _fix_pad,
    "dtype": _fix_dtype,
}
# Finding id -> the probe that emits it (what it declares: remedy, fix_on_warn).
PROBES: dict[str, Probe] = {i: p for p in ALL for i in p.ids}


def remedy(fid: str) -> Callable[[Pipeline, str], list[Change]] | None:
    """The remedy function the probe of this finding id declares (None: no remedy)."""
    p = PROBES.get(fid)
    return REMEDIES[p.remedy] if p is not None and p.remedy is not None else None


def should_fix(f: Finding) -> bool:
    """--fix repairs every fail finding with a remedy, and the warnings whose probe declares
    fix_on_warn (the remedy is safe and the cost is silent damage: fp16 on a bf16 checkpoint,
    pad == EOS)."""
    p = PROBES.get(f.id)
    return remedy(f.id) is not None and (f.severity == "fail" or p.fix_on_warn)


def apply_fixes(pipe: Pipeline, report: Report) -> tuple[Pipeline, list[Change]]:
    """Apply the remedies, then rebuild the pipeline from the changed recipe (same model and
    tokenizer objects, same rows)."""
    changes: list[Change] = []
    for f in report.by_severity():
        if not should_fix(f) or any(f.id in c.findings for c in changes):
            continue
        fix = remedy(f.id)
        made = fix(pipe, f.id)
        if made:
            changes += made
            continue
        # nothing left to change: an earlier change (the built-in collator, a safe dtype) covers it
        area = "dtype" if fix is _fix_dtype else "collator"
        earlier = next((c for c in changes if c.what == area), None)
        if earlier is not None:
            earlier.also.append(f.id)
    if not changes:
        return pipe, changes
    kept_examples = pipe.train_examples
    rebuilt = build_pipeline(pipe.recipe, model_and_tokenizer=(pipe.tokenizer, pipe.model, pipe.saved_dtype),
                             rows=(pipe.train_rows, pipe.eval_rows, pipe.source))
    if any(c.what == "training rows" for c in changes):
        rebuilt.train_examples = kept_examples
    rebuilt.notes = pipe.notes + [n for n in rebuilt.notes if n not in pipe.notes]
    return rebuilt, changes

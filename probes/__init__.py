"""The registry of sftdoctor's probes, listed explicitly (no entry-point magic).

Each module here is one probe: `id`, `level`, `summary`, `needs`, `check(ctx)`, and what the
rest of sftdoctor reads about its finding: `family`, `priority`, `cause` (root-cause ranking in
the reports), `remedy` and `fix_on_warn` (`sftdoctor train --fix`); see sftdoctor.engine.Probe for
the defaults. Installed as `sftdoctor.probes`; see docs/findings.md for what each id means.
"""
from __future__ import annotations

from importlib import import_module

from sftdoctor.engine import Probe

# The values a probe may declare as its `family` (engine.Probe's default is "other").
FAMILIES = ("learned", "numerical", "setup", "symptom", "other")

# Module names, in the order their findings are most useful to read.
_BATCH = [
    "labels_pad_not_ignored",
    "attention_mask_hides_tokens",
    "pad_is_eos_masked",
    "labels_eos_missing",
    "labels_misaligned",
    "labels_no_supervised_tokens",
    "token_id_out_of_range",
    "truncation_answer_lost",
    "labels_prompt_supervised",
    "position_ids_inconsistent",
    "packing_cross_contamination",
    "padding_side_left_train",
    "attention_rows_empty",
    "bos_duplicated",
    "template_mismatch",
    "pad_token_missing",
]
_STEP: list[str] = [
    "loss_nonfinite",
    "logits_nonfinite",
    "precision_overflow",
    "precision_headroom",
    "precision_fp16_unsafe",
    "grad_nonfinite",
    "grad_from_ignored_tokens",
    "labels_misaligned_grad",
    "params_frozen",
    "prediction_collapse",
]
_RUN: list[str] = [
    "grad_accum_normalization",
    "loss_scale_skipped_steps",
    "loss_divergence",
]
# Over a whole dataset (inspect-batch --batches): statistics no single batch shows.
_DATASET = [
    "rows_duplicated",
]
_CHECKPOINT = [
    "weights_nonfinite",
    "precision_inference_overflow",
    "generation_degenerate",
    "generation_never_stops",
    "generation_config_eos",
    "embeddings_untrained_special",
    "tied_weights_mismatch",
]


def _load(names: list[str]) -> list[Probe]:
    return [Probe.from_module(import_module(f"{__name__}.{n}")) for n in names]


BATCH = _load(_BATCH)
STEP = _load(_STEP)
RUN = _load(_RUN)
CHECKPOINT = _load(_CHECKPOINT)
DATASET = _load(_DATASET)
ALL = BATCH + STEP + RUN + CHECKPOINT + DATASET


def by_level(*levels: str) -> list[Probe]:
    return [p for p in ALL if p.level in levels]

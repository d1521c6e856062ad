"""The registry of sftdoctor's probes: every module in this folder whose name does not start
with "_" (helpers do), found when the package loads (no entry-point magic).

Each module is one probe: `id`, `level`, `summary`, `needs`, `check(ctx)`, and what its finding
means: `family`, `priority`, `cause` (root-cause ranking, sftdoctor.session), `remedy` and
`fix_on_warn` (`sftdoctor train --fix`); sftdoctor.engine.Probe has the defaults. Adding a probe is
adding its file and its id in docs/findings.md (tests/test_registry_sync.py keeps them in step).
Installed as `sftdoctor.probes`.
"""
from __future__ import annotations

import pkgutil
from importlib import import_module

from sftdoctor.engine import Probe, Registry

# The values a probe may declare as its `family` (engine.Probe's default is "other").
FAMILIES = ("learned", "numerical", "setup", "symptom", "other")

# Reading order: the order their findings are most useful to read. A probe not listed here
# still runs, after the listed ones of its level.
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


LEVELS = ("batch", "step", "run", "checkpoint", "dataset")


def _discover() -> list[Probe]:
    listed = _BATCH + _STEP + _RUN + _CHECKPOINT + _DATASET
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    missing = sorted(set(listed) - set(found))
    if missing:  # a listed probe whose file is gone: fail at import, never skip silently
        raise ImportError(f"sftdoctor.probes lists {missing} but has no such module")
    order = {name: i for i, name in enumerate(listed)}
    probes = [Probe.from_module(import_module(f"{__name__}.{n}")) for n in sorted(found, key=lambda n: (order.get(n, len(order)), n))]
    return sorted(probes, key=lambda p: LEVELS.index(p.level))  # stable: reading order within a level


ALL = _discover()
BATCH = [p for p in ALL if p.level == "batch"]
STEP = [p for p in ALL if p.level == "step"]
RUN = [p for p in ALL if p.level == "run"]
CHECKPOINT = [p for p in ALL if p.level == "checkpoint"]
DATASET = [p for p in ALL if p.level == "dataset"]
# What a Session is given: every probe, in reading order.
REGISTRY = Registry(tuple(ALL))

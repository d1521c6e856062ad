"""Property-based fuzzing (hypothesis) of the two places where arbitrary user data enters:
a report JSON given to `sftdoctor report`, and a batch given to inspect-batch.

The property: sftdoctor either accepts the input and renders it (console and HTML), or refuses it
with a UserError (one line, exit 2). Any other exception is a crash of ours.
"""
from __future__ import annotations

import io
import json
import os
from functools import lru_cache

import torch

from hypothesis import HealthCheck, given, settings  # the `test` extra (pyproject.toml): never skipped in CI
from hypothesis import strategies as st

from conftest import TOKENIZERS

import sftdoctor
from sftdoctor.errors import UserError
from sftdoctor.findings import CheckResult, Finding
from sftdoctor.report import SCHEMA, Report

# SFTDOCTOR_FUZZ_EXAMPLES=2000 for a longer hunt; CI runs the default
FUZZ = settings(max_examples=int(os.environ.get("SFTDOCTOR_FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def render_everywhere(report: Report) -> None:
    from rich.console import Console

    from sftdoctor.reports.console import render
    from sftdoctor.reports.html import render_html

    render(report, Console(file=io.StringIO(), width=120, color_system=None))
    assert render_html(report).startswith("<!DOCTYPE html>")
    assert Report.from_dict(json.loads(report.to_json())).ids() == report.ids()


def load_or_refuse(data) -> None:
    try:
        report = Report.from_dict(data)
    except UserError as e:
        assert "\n" not in str(e)
        return
    render_everywhere(report)


@lru_cache(maxsize=1)
def valid_report() -> dict:
    r = Report(command="inspect-batch")
    r.add([Finding("labels-pad-not-ignored", "fail", "batch", "pad supervised", {"rows": [0], "share": 0.5}, fix="-100", step=1),
           Finding("bos-duplicated", "warn", "batch", "two BOS", {})])
    r.record_checks([CheckResult("labels-pad-not-ignored", "fail", None, "batch"), CheckResult("x", "skipped", "no model", "step")])
    r.samples = [{"row": 0, "ids": [1, 2, 3, 0], "texts": ["a", "b", "c", "!"], "classes": [0, 1, 2, 3],
                  "labels": [-100, 2, 3, 0], "attention": [1, 1, 1, 0], "length": 4}]
    r.metrics = {"token_classes": {"prompt": {"tokens": 1, "supervised": 0}, "pad": {"tokens": 1, "supervised": 1}},
                 "steps": [{"step": 1, "loss": 2.0, "grad_norm": 1.0, "lr": 1e-5}],
                 "argmax_histogram": [{"token_id": 0, "text": "!", "share": 0.9}]}
    r.run = {"status": "completed", "exit_code": 0}
    return json.loads(r.to_json())


def paths(value, prefix=()):
    """Every path into a JSON value (keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, prefix + (i,))


def replaced(value, path, new):
    if not path:
        return new
    out = dict(value) if isinstance(value, dict) else list(value)
    out[path[0]] = replaced(value[path[0]], path[1:], new)
    return out


REPORT_PATHS = [p for p in paths(valid_report()) if p and p != ("schema",)]


@FUZZ
@given(st.dictionaries(st.sampled_from(["command", "findings", "checks", "metrics", "environment", "samples", "run", "repeats",
                                        "verdict"]), json_values, max_size=6))
def test_fuzz_report_fields_of_any_type(fields):
    load_or_refuse({"schema": SCHEMA, **fields})


# the keys renderers read (reports/*.py): each gets values of every JSON type
RUN_KEYS = ["status", "exit_code", "error", "internal_errors", "reason", "stopped_by", "first_forward", "ranks", "message"]
METRIC_KEYS = ["token_classes", "steps", "activations", "argmax_histogram", "logits", "generations", "fp16_forecast",
               "batch", "tokenizer", "model", "train", "eval", "saves", "optimizer_steps"]
known = st.fixed_dictionaries({}, optional={"run": st.dictionaries(st.sampled_from(RUN_KEYS), json_values, max_size=4),
                                            "metrics": st.dictionaries(st.sampled_from(METRIC_KEYS), json_values, max_size=4)})


@FUZZ
@given(known)
def test_fuzz_known_run_and_metrics_keys_of_any_type(fields):
    data = dict(valid_report())
    data.update(fields)
    load_or_refuse(data)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(REPORT_PATHS), json_values), min_size=1, max_size=3))
def test_fuzz_one_field_of_a_valid_report_replaced(edits):
    data = valid_report()
    for path, new in edits:
        try:
            data = replaced(data, path, new)
        except (KeyError, IndexError, TypeError):  # an earlier edit removed this path
            continue
    load_or_refuse(data)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzz_report_file_bytes(tmp_path_factory, content):
    p = tmp_path_factory.mktemp("fuzz") / "r.json"
    p.write_bytes(content)
    try:
        report = Report.load(p)
    except UserError:
        return
    render_everywhere(report)


# ---- batches ---------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def gpt2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZERS / "gpt2"))


token_ids = st.integers(-200, 60000) | st.sampled_from([0, 50256, -100, 2**40])
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float32, torch.float16]


@st.composite
def tensors(draw):
    shape = draw(shapes)
    dtype = draw(st.sampled_from(DTYPES))
    n = 1
    for d in shape:
        n *= d
    vals = draw(st.lists(st.integers(-200, 60000), min_size=n, max_size=n))
    t = torch.tensor(vals, dtype=torch.int64).reshape(shape)
    return t.to(dtype) if dtype != torch.bool else t > 0


field_values = st.one_of(
    tensors(),
    st.lists(st.lists(token_ids, min_size=0, max_size=5), min_size=0, max_size=3),  # possibly ragged
    st.lists(token_ids, max_size=5),
    st.lists(st.text(max_size=4), max_size=3),
    st.lists(st.lists(st.floats(allow_nan=True), max_size=4), max_size=2),
    scalars,
)


@st.composite
def batches(draw):
    b = {"input_ids": draw(field_values)}
    for name in ("labels", "attention_mask", "position_ids", "loss_mask"):
        if draw(st.booleans()):
            b[name] = draw(field_values)
    return b


@st.composite
def plausible_batches(draw):
    """Rectangular integer batches: most get past validation and reach the probes."""
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    grid = st.lists(st.lists(token_ids, min_size=cols, max_size=cols), min_size=rows, max_size=rows)
    b = {"input_ids": draw(grid)}
    if draw(st.booleans()):
        b["labels"] = draw(grid)
    if draw(st.booleans()):
        b["attention_mask"] = draw(st.lists(st.lists(st.integers(0, 1), min_size=cols, max_size=cols), min_size=rows, max_size=rows))
    if draw(st.booleans()):
        b["position_ids"] = draw(grid)
    return b


def inspect_or_refuse(batch, tok) -> None:
    try:
        report = sftdoctor.inspect_batch(batch, tok)
    except UserError as e:
        assert "\n" not in str(e)
        return
    render_everywhere(report)


@FUZZ
@given(batches(), st.booleans())
def test_fuzz_batch_of_any_shape_and_type(batch, with_tokenizer):
    inspect_or_refuse(batch, gpt2() if with_tokenizer else None)


@FUZZ
@given(plausible_batches(), st.booleans())
def test_fuzz_rectangular_batches_reach_the_probes(batch, with_tokenizer):
    inspect_or_refuse(batch, gpt2() if with_tokenizer else None)

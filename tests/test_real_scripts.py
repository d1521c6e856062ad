"""Issue 15, right on real scripts: the evidence the report gives must be what the loss trained on,
under the wrappers users run. Each pattern has a correct and a broken twin, on real tokenizers from
../shared and tiny random-init models; the script twins live in tests/real_scripts/."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from sftdoctor import internal
from sftdoctor.api import inspect_batch
from sftdoctor.attach import attach
from sftdoctor.cli import main
from sftdoctor.context import TokenizerInfo
from sftdoctor.live import LiveView
from sftdoctor.report import Report

from conftest import tokenizer
from step_fixtures import IGNORE, batch, correct_loss, custom_step, hf_step, model, small_tok

SCRIPTS = Path(__file__).resolve().parent / "real_scripts"


def render(report: Report) -> str:
    from sftdoctor.reports.console import render as render_console

    buf = io.StringIO()
    render_console(report, Console(file=buf, width=200, color_system=None))
    return buf.getvalue()


# ---- followed, not remembered: resized embeddings, rebuilt optimizer, torch.compile -------------

def test_resize_after_attach_and_a_rebuilt_optimizer_are_followed():
    tok = small_tok()
    m = model("llama", tok, tie=False)
    b = batch(tok)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    with attach(m, tok, optimizer=opt) as doc:
        hf_step(m, b, opt)
        m.resize_token_embeddings(len(tok) + 8)  # a new [PAD] (Alpaca style): new embedding and head weights
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)  # rebuilt for the new parameters
        for _ in range(2):
            hf_step(m, b, opt)
        r = doc.report()
    assert "params-frozen" not in r.ids(), [f.message for f in r.findings]
    assert not r.metrics.get("internal_errors")
    assert {c.id: c.status for c in r.checks}["params-frozen"] == "pass"
    weights = {id(p) for _, p in doc.observer.named_params}
    assert id(m.get_output_embeddings().weight) in weights and id(m.get_input_embeddings().weight) in weights


def test_pad_id_beyond_the_logits_is_no_internal_error():
    """The tokenizer already has the new pad id, the model is not resized yet: no out-of-bounds gather."""
    tok = small_tok()
    m = model("llama", tok)
    info = TokenizerInfo.from_tokenizer(tok)
    info.pad_id = len(tok) + 3  # an id the logits have no column for
    b = batch(tok)
    with attach(m, info) as doc:
        custom_step(m, b, correct_loss)
        r = doc.report()
    assert not r.metrics.get("internal_errors"), r.metrics.get("internal_errors")
    assert r.metrics["effective_targets"]["supervised_positions"] > 0


@pytest.mark.parametrize("when", ["before", "after"])
def test_torch_compile_before_or_after_the_first_forward_is_observed(when):
    import torch._dynamo

    torch._dynamo.reset()
    tok = small_tok()
    m = model("llama", tok)
    b = batch(tok)
    compiled = torch.compile(m, backend="eager") if when == "before" else None
    with attach(m, tok) as doc:
        for i in range(3):
            if i == 1 and compiled is None:
                compiled = torch.compile(m, backend="eager")
            out = (compiled if compiled is not None else m)(**b)
            out.loss.backward()
        r = doc.report()
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 1  # the forward really was compiled
    assert len(r.metrics["steps"]) == 3 and not r.metrics.get("internal_errors")
    assert r.metrics["effective_targets"]["match"]["1"] == 1.0  # d loss / d logits measured on a compiled step
    assert {c.id: c.status for c in r.checks}["grad-from-ignored-tokens"] == "pass"
    if when == "before":
        assert "activations_not_observed" in r.metrics  # said, not silently empty


def test_torch_compile_broken_twin_padding_trained_is_named():
    import torch._dynamo

    torch._dynamo.reset()
    tok = small_tok()
    m = model("llama", tok)
    b = batch(tok)
    c = torch.compile(m, backend="eager")
    with attach(m, tok) as doc:
        out = c(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten()).backward()
        r = doc.report()
    f = r.get("grad-from-ignored-tokens")
    assert f is not None and f.severity == "fail"


# ---- gradient checks under mixed-precision wrappers ---------------------------------------------

def _wrapped_like_accelerate(m):
    """What accelerate does for Trainer/TRL bf16: autocast around the forward, an fp32 COPY of the
    outputs handed back (convert_outputs_to_fp32)."""
    from accelerate.utils import convert_outputs_to_fp32

    forward = m.forward

    def wrapped(*a, **k):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*a, **k)

    m.forward = convert_outputs_to_fp32(wrapped)
    return m


def test_gradient_checks_run_under_an_accelerate_fp32_copy_of_the_logits():
    tok = small_tok()
    m = _wrapped_like_accelerate(model("qwen2", tok))
    b = batch(tok)
    with attach(m, tok) as doc:
        hf_step(m, b)  # the model's own loss: computed from the bf16 logits, not from the copy
        r = doc.report()
    status = {c.id: c.status for c in r.checks}
    assert status["grad-from-ignored-tokens"] == "pass", [(c.id, c.reason) for c in r.checks if c.status == "skipped"]
    assert r.metrics["dtypes"]["autocast"] == "bfloat16" and r.metrics["dtypes"]["logits"] == "bfloat16"
    assert r.metrics["effective_targets"]["match"]["1"] == 1.0


def test_gradient_checks_under_the_wrapper_broken_twin():
    tok = small_tok()
    m = _wrapped_like_accelerate(model("qwen2", tok))
    b = batch(tok)
    with attach(m, tok) as doc:
        out = m(**b)  # labels given (right), but the loss ignores them: every position against input_ids
        torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten()).backward()
        r = doc.report()
    f = r.get("grad-from-ignored-tokens")
    assert f is not None and f.severity == "fail" and f.evidence["class"] == "pad"


# ---- wording that fits the evidence -------------------------------------------------------------

def test_loss_nan_from_rows_without_labels_is_named_as_an_empty_row_division():
    tok = small_tok()
    b = batch(tok)
    b["labels"][1] = IGNORE  # one row without a supervised token, and a per-row mean loss

    def per_row_mean(logits, labels):
        lab = labels[:, 1:]
        tok_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), lab.clamp(min=0),
                                                     reduction="none") * (lab != IGNORE)
        return (tok_loss.sum(1) / (lab != IGNORE).sum(1)).mean()  # 0/0 on row 1

    m = model("qwen2", tok)
    with attach(m, tok) as doc:
        out = m(**b)  # labels given to the model: sftdoctor counts rows without a supervised token
        per_row_mean(out.logits, b["labels"]).backward()
        r = doc.report()
    f = r.get("loss-nonfinite")
    assert f is not None and f.evidence["cause"] == "empty-row-division" and f.evidence["empty_rows"] == 1
    assert "0/0" in f.message and "fp16" not in f.fix and f.evidence["family"] == "learned"
    # the healthy twin: the same loss on full rows is finite, nothing raised
    b2 = batch(tok)
    with attach(m, tok) as doc:
        out = m(**b2)
        per_row_mean(out.logits, b2["labels"]).backward()
        assert "loss-nonfinite" not in doc.report().ids()


def test_pad_token_missing_only_warns_when_something_pads():
    tok = tokenizer("gpt2")  # no pad token
    ids = tok(["Question: 2+2?\nAnswer: 4<|endoftext|>"], return_tensors="pt")["input_ids"]
    one = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    f = inspect_batch(one, tok).get("pad-token-missing")
    assert f is not None and f.severity == "info" and "nothing in this batch is padded" in f.message
    two = {"input_ids": torch.cat([ids, ids]), "attention_mask": torch.ones(2, ids.shape[1], dtype=torch.long)}
    two["attention_mask"][1, -3:] = 0
    two["labels"] = two["input_ids"].masked_fill(two["attention_mask"] == 0, IGNORE)
    assert inspect_batch(two, tok).get("pad-token-missing").severity == "warn"


def test_prompt_supervised_with_labels_filled_with_id_0_says_so():
    tok = tokenizer("qwen2.5")
    rows = [("Question: what is 2 + 3?\nAnswer:", " 5"), ("Question: name a prime number\nAnswer:", " 7 is prime")]
    feats = []
    for p, a in rows:
        pi, ai = tok(p)["input_ids"], tok(a)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        feats.append((pi + ai, [0] * len(pi) + ai))  # BUG: the prompt "masked" with 0, not -100
    T = max(len(x) for x, _ in feats)
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    b = {"input_ids": torch.tensor([x + [pad] * (T - len(x)) for x, _ in feats]),
         "attention_mask": torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x, _ in feats]),
         "labels": torch.tensor([y + [IGNORE] * (T - len(y)) for _, y in feats])}
    f = inspect_batch(b, tok).get("labels-prompt-supervised")
    assert f is not None and f.evidence["label_fill_id"] == 0 and "instead of -100" in f.message
    b["labels"] = torch.where(b["labels"] == 0, torch.full_like(b["labels"], IGNORE), b["labels"])  # the correct twin
    assert inspect_batch(b, tok).get("labels-prompt-supervised") is None


@pytest.mark.parametrize("family", ["llama2", "mistral", "gpt2", "qwen2.5"])
def test_token_view_text_reads_as_the_tokenizer_decodes(family):
    tok = tokenizer(family)
    info = TokenizerInfo.from_tokenizer(tok)
    text = "Natalia sold clips to 48 of her friends in April"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    joined = "".join(info.token_text(i) for i in ids)
    assert joined.strip() == tok.decode(ids).strip() == text


def test_live_loss_under_accumulation_is_the_optimizer_step_loss():
    out = io.StringIO()
    view = LiveView(out, plain=True)
    logged = 0.0
    for micro in range(4):  # the script: loss / 4 per micro-batch, `logged += loss.item()`
        view.step({"step": micro, "loss": 2.0 / 4 + micro * 0.01, "backward_loss": 2.0 / 4 + micro * 0.01,
                   "loss_source": "backward", "full": True}, 0)
        logged += 2.0 / 4 + micro * 0.01
    last = out.getvalue().strip().splitlines()[-1]
    assert f"loss {logged:.4g} (step, 4 micro-batches)" in last
    view.step({"step": 4, "loss": 0.5, "backward_loss": 0.5, "loss_source": "backward", "full": True}, 1)
    assert "loss 0.5 " in out.getvalue().strip().splitlines()[-1] + " "  # a new optimizer step starts a new sum
    # a model that returns its loss (Trainer): the micro-step loss, as before
    view.step({"step": 5, "loss": 3.0, "backward_loss": 0.75, "loss_source": "model", "full": True}, 1)
    assert "loss 3 " in out.getvalue().strip().splitlines()[-1]


# ---- internal errors and skipped checks: shown, structured, never the user's fault ---------------

def test_a_probe_that_raises_is_shown_with_what_it_affects(monkeypatch, tmp_path):
    from sftdoctor.probes import BATCH

    probe = next(p for p in BATCH if p.id == "pad-token-missing")

    def boom(ctx):
        raise IndexError("index 32000 is out of bounds for dimension 0 with size 32000")

    import dataclasses

    from sftdoctor.engine import Registry
    from sftdoctor.probes import REGISTRY

    broken = Registry(tuple(dataclasses.replace(p, check=boom) if p is probe else p for p in REGISTRY.probes))
    tok = small_tok()
    r = inspect_batch(batch(tok), tok, registry=broken)
    errs = internal.collect(r)
    assert any(e["affects"] == ["pad-token-missing"] and "IndexError" in e["error"] for e in errs), errs
    text = render(r)
    assert "pad-token checks did not run" in text and "not in your script" in text
    from sftdoctor.reports.html import render_html

    assert "pad-token checks did not run" in render_html(r)
    # the JSON keeps it: the skipped check names the error
    d = json.loads(r.to_json())
    assert any(c["id"] == "pad-token-missing" and c["status"] == "skipped" and "IndexError" in c["reason"]
               for c in d["checks"])


def test_internal_error_entries_are_structured_in_metrics():
    r = Report(command="watch")
    try:
        raise IndexError("index 32000 is out of bounds")
    except IndexError as e:
        internal.add(r, internal.entry("the first training forward", e, ["pad-token-missing", "labels-pad-not-ignored"]))
    e = r.metrics["internal_errors"][0]
    assert e["affects"] == ["pad-token-missing", "labels-pad-not-ignored"] and e["where"] == "the first training forward"
    assert "the pad-token checks did not run" in e["message"]
    assert {c.id: c.status for c in r.checks} == {"pad-token-missing": "skipped", "labels-pad-not-ignored": "skipped"}
    back = Report.from_dict(json.loads(r.to_json()))
    assert internal.collect(back)[0]["affects"] == e["affects"]


def test_checks_that_did_not_run_say_why_on_the_console():
    tok = small_tok()
    r = inspect_batch(batch(tok), tok)
    text = render(r)
    assert "not run: template-mismatch: needs examples: the raw text examples were not available" in text


def test_trainer_without_processing_class_finds_the_collators_tokenizer(tmp_path):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = tokenizer("qwen2.5")
    m = model("qwen2", tok)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    trainer = Trainer(model=m, args=args, train_dataset=[], data_collator=DataCollatorForSeq2Seq(tok))
    doc = attach(trainer)
    try:
        assert doc.tokenizer is not None and doc.tokenizer.eos_ids
    finally:
        doc.detach()


# ---- the script twins under `sftdoctor watch` ---------------------------------------------------

def watch(tmp_path, script, *args):
    out = tmp_path / "watch.json"
    code = main(["watch", "-q", "--plain", "--json", str(out), str(SCRIPTS / script), *args])
    return code, json.loads(out.read_text())


def fails(report):
    return {f["id"] for f in report["findings"] if f["severity"] == "fail"}


def assert_clean(code, report):
    assert code == 0 and not fails(report), [(f["id"], f["message"]) for f in report["findings"]]
    assert not internal.collect(Report.from_dict(report)), internal.collect(Report.from_dict(report))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mask", "preshift"])
def test_custom_loop_that_shifts_in_its_own_loss_is_clean(tmp_path, monkeypatch, variant):
    monkeypatch.chdir(tmp_path)
    code, r = watch(tmp_path, "alpaca_loop.py", "--variant", variant, "--steps", "2")
    assert_clean(code, r)
    ev = r["run"]["labels_evidence"]
    assert ev["decided_by"].startswith("gradient")
    if variant == "preshift":  # the guessed tensor (pre-shifted labels) is withdrawn, said so
        assert ev["guess"] == "withdrawn" and ev["agreement"] < 0.5
    statuses = {c["id"]: c["status"] for c in r["checks"]}
    assert statuses["labels-misaligned"] == "pass" and statuses["labels-eos-missing"] == "pass"
    assert statuses["params-frozen"] == "pass"


@pytest.mark.slow
def test_custom_loop_double_shift_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, r = watch(tmp_path, "alpaca_loop.py", "--variant", "double", "--steps", "2")
    assert code == 1 and "labels-misaligned" in fails(r)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["trainer_bf16.py", "trl_bf16.py"])
def test_bf16_trainer_and_trl_correct_runs_are_clean(tmp_path, monkeypatch, script):
    monkeypatch.chdir(tmp_path)
    code, r = watch(tmp_path, script, "--steps", "2")
    assert_clean(code, r)
    checks = {c["id"]: c for c in r["checks"]}
    g = checks["grad-from-ignored-tokens"]
    if script == "trainer_bf16.py":  # no processing_class: the tokenizer came from the data collator
        assert g["status"] == "pass" and r["run"]["tokenizer_from"] == "data_collator"
        assert r["metrics"]["effective_targets"]["supervised_by_class"]["eos"] > 0
    else:  # TRL's fused LM head never builds the logits: the gradient check says why it did not run
        assert g["status"] == "skipped" and "fused" in g["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["trainer_bf16.py", "trl_bf16.py"])
def test_bf16_compute_loss_training_ignored_positions_is_named_from_the_gradient(tmp_path, monkeypatch, script):
    monkeypatch.chdir(tmp_path)
    code, r = watch(tmp_path, script, "--variant", "ignored", "--steps", "2")
    assert code == 1 and "grad-from-ignored-tokens" in fails(r)
    assert not internal.collect(Report.from_dict(r))

"""Issue 10, a verdict users can trust: no FAIL without a named defect, no PASS when nothing was
checked, and the defects that used to be missed, each with a broken fixture and a healthy twin."""
from __future__ import annotations

import math

import pytest
import torch

from sftdoctor.attach import attach
from step_fixtures import batch, hf_step, model, small_tok

IGNORE = -100


# ---- params-frozen: a LoRA name filter on a plain model -----------------------------------------------------

def _lora_filter(m, keep):
    for n, p in m.named_parameters():
        p.requires_grad_(any(k in n for k in keep))
    return m


def _frozen_run(m, steps=1):
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    with attach(m, small_tok(), optimizer=opt) as doc:
        for _ in range(steps):
            hf_step(m, batch(), opt)
        return doc.report()


def test_params_frozen_when_a_lora_filter_leaves_only_norms_training():
    # "lora" matches nothing in a plain model; "norm" keeps the LayerNorm/RMSNorm vectors trainable
    r = _frozen_run(_lora_filter(model("qwen2"), ("lora", "norm")))
    f = r.get("params-frozen")
    assert f is not None and f.severity == "fail", [(x.id, x.message) for x in r.findings]
    assert f.evidence["trainable_matrix_numel"] == 0 and f.evidence["trainable_share"] < 0.01
    assert any("norm" in n for n in f.evidence["trainable_names"])


@pytest.mark.parametrize("keep", [("q_proj", "v_proj"), ("",)])
def test_params_frozen_quiet_for_adapter_like_matrices_and_full_finetune(keep):
    # healthy twins: a few weight matrices train (what LoRA/partial fine-tunes do), or everything trains
    r = _frozen_run(_lora_filter(model("qwen2"), keep))
    assert "params-frozen" not in r.ids(), [(x.id, x.message) for x in r.findings]


# ---- loss-divergence: a learning rate ~1000x too high ------------------------------------------------------

def _lr_run(lr, steps=16, arch="qwen2"):
    torch.manual_seed(0)
    m = model(arch)
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    b = batch(n=8, max_length=64)
    with attach(m, small_tok(), optimizer=opt) as doc:
        for _ in range(steps):
            hf_step(m, b, opt)
        return doc.report()


def test_loss_divergence_when_the_loss_rises_above_its_start_and_stays():
    r = _lr_run(3.0)  # 1000x the 3e-3 a tiny random-init model trains well with
    f = r.get("loss-divergence")
    losses = [s["loss"] for s in r.metrics["steps"]]
    assert f is not None and f.severity == "warn", losses
    assert f.evidence["kind"] == "rose-and-stayed" and f.evidence["recent_median"] > f.evidence["first_loss"], f.evidence


def test_loss_divergence_quiet_at_a_sane_learning_rate():
    r = _lr_run(3e-3)
    losses = [s["loss"] for s in r.metrics["steps"]]
    assert "loss-divergence" not in r.ids() and losses[-1] < losses[0], losses


# ---- watch: nothing checked, and generating in another format than training ---------------------------------

import json  # noqa: E402
import textwrap  # noqa: E402

from conftest import TOKENIZERS  # noqa: E402
from sftdoctor.cli import main  # noqa: E402

FORMAT_SCRIPT = """
import sys
import torch
from transformers import AutoTokenizer
from sftdoctor.tiny import tiny_model

tok = AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(0)
model = tiny_model("qwen2", len(tok), hidden=32, layers=1)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
q = "Tom has 3 apples and buys 4 more. How many apples does he have?"
prompt = tok("Question: " + q + "\\nAnswer:")["input_ids"]
answer = tok(" 3 + 4 = 7\\n#### 7")["input_ids"] + [tok.eos_token_id]
ids = torch.tensor([prompt + answer])
labels = torch.tensor([[-100] * len(prompt) + answer])
for _ in range(6):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
model.eval()
if sys.argv[2] == "chat":
    text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    asked = tok(text, return_tensors="pt", add_special_tokens=False)
else:
    asked = tok("Question: " + q + "\\nAnswer:", return_tensors="pt")
model.generate(**asked, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
"""


def _watch(tmp_path, script_text, *args):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(script_text))
    out = tmp_path / "watch.json"
    code = main(["watch", "-q", "--plain", "--json", str(out), str(script), *map(str, args)])
    return code, json.loads(out.read_text())


@pytest.mark.slow
def test_watch_names_training_plain_and_generating_with_the_chat_template(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, r = _watch(tmp_path, FORMAT_SCRIPT, TOKENIZERS / "qwen2.5", "chat")
    tm = [f for f in r["findings"] if f["id"] == "template-mismatch"]
    assert tm and tm[0]["evidence"]["training_format"] == "plain text", [(f["id"], f["message"]) for f in r["findings"]]
    assert tm[0]["evidence"]["generation_format"] == "chat template"
    # a correct run trained for 6 steps from random init: bad output, but no FAIL
    assert r["verdict"] != "fail" and code == 0, [(f["id"], f["severity"], f["message"]) for f in r["findings"]]


def test_watch_same_format_in_training_and_generation_is_quiet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, r = _watch(tmp_path, FORMAT_SCRIPT, TOKENIZERS / "qwen2.5", "plain")
    assert "template-mismatch" not in {f["id"] for f in r["findings"]}
    assert {c["id"]: c["status"] for c in r["checks"]}["template-mismatch"] == "pass"
    assert r["verdict"] != "fail" and code == 0
    for f in r["findings"]:
        if f["id"].startswith("generation-"):
            assert f["severity"] == "warn" and f["evidence"]["cause"] in ("undertrained", "no-defect-found"), f


def test_watch_script_raising_before_the_first_forward_is_inconclusive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, r = _watch(tmp_path, "raise SystemExit('no data')\n")
    assert r["verdict"] == "inconclusive" and code != 0
    code, r = _watch(tmp_path, "raise ValueError('no data')\n")
    assert r["verdict"] == "inconclusive" and code == 1  # the script's own exit code comes first


# ---- inspect-batch SCRIPT: the script's own first step ----------------------------------------------------

STEP_SCRIPT = """
import sys
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer
from sftdoctor.tiny import tiny_model

tok = AutoTokenizer.from_pretrained(sys.argv[1])
mode = sys.argv[2]
torch.manual_seed(0)
model = tiny_model("qwen2", len(tok), hidden=32, layers=1)
if mode == "half":
    model = model.half()
opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4 if mode == "half" else 1e-8)
rows = []
for q, a in [("What is 2 + 3?", "2 + 3 = 5\\n#### 5"), ("What is 7 - 4? Show the work please.", "7 - 4 = 3\\n#### 3")]:
    p = tok("Question: " + q + "\\nAnswer:")["input_ids"]
    r = tok(" " + a)["input_ids"] + [tok.eos_token_id]
    rows.append((p + r, [-100] * len(p) + r))
T = max(len(i) for i, _ in rows)
ids = torch.tensor([i + [tok.pad_token_id] * (T - len(i)) for i, _ in rows])
labels = torch.tensor([l + [-100] * (T - len(l)) for _, l in rows])
am = (torch.arange(T)[None] < torch.tensor([[len(i)] for i, _ in rows])).long()
for step in range(3):
    logits = model(input_ids=ids, attention_mask=am).logits.float()
    if mode == "noshift":  # the bug: logits[t] scored against labels[t] (no shift)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    else:
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad()
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2.5", "gpt2"])
def test_inspect_batch_script_names_a_custom_loss_without_the_shift(tmp_path, monkeypatch, family):
    monkeypatch.chdir(tmp_path)
    tok_dir = TOKENIZERS / family
    script = tmp_path / "train.py"
    script.write_text(STEP_SCRIPT)
    if family == "gpt2":  # gpt2 has no pad token: the script pads with eos, masked by position
        script.write_text(STEP_SCRIPT.replace("tok = AutoTokenizer.from_pretrained(sys.argv[1])",
                                              "tok = AutoTokenizer.from_pretrained(sys.argv[1]); tok.pad_token = tok.eos_token"))
    out = tmp_path / "r.json"
    code = main(["inspect-batch", "-q", "--json", str(out), str(script), str(tok_dir), "noshift"])
    r = json.loads(out.read_text())
    f = [x for x in r["findings"] if x["id"] == "labels-misaligned"]
    assert f and f[0]["severity"] == "fail" and code == 1, [(x["id"], x["message"]) for x in r["findings"]]
    assert r["run"].get("own_step") is True
    out2 = tmp_path / "r2.json"
    code = main(["inspect-batch", "-q", "--json", str(out2), str(script), str(tok_dir), "correct"])
    r2 = json.loads(out2.read_text())
    assert "labels-misaligned" not in {x["id"] for x in r2["findings"]} and code == 0, r2["findings"]
    assert r2["run"].get("own_step") is True and r2["verdict"] in ("pass", "warn")


@pytest.mark.slow
def test_inspect_batch_script_names_model_half_with_adam(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(STEP_SCRIPT)
    out = tmp_path / "r.json"
    main(["inspect-batch", "-q", "--json", str(out), str(script), str(TOKENIZERS / "qwen2.5"), "half"])
    r = json.loads(out.read_text())
    f = [x for x in r["findings"] if x["id"] == "precision-fp16-unsafe"]
    assert f and "pure-fp16-adam" in f[0]["evidence"]["reasons"], [(x["id"], x["message"]) for x in r["findings"]]
    out2 = tmp_path / "r2.json"
    main(["inspect-batch", "-q", "--json", str(out2), str(script), str(TOKENIZERS / "qwen2.5"), "correct"])
    assert "precision-fp16-unsafe" not in {x["id"] for x in json.loads(out2.read_text())["findings"]}


# ---- batch layouts: truncation that cuts every row, pad == eos masked by id -------------------------------

from conftest import FAMILIES, gsm8k_rows  # noqa: E402
from sftdoctor.api import inspect_batch  # noqa: E402


def _tok(family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZERS / family)
    tok.pad_token = tok.eos_token  # the GPT-2 / base-model habit
    return tok


def _batch(tok, *, cut=None, side="right", by_id=False, n=6):
    feats = []
    for r in gsm8k_rows("train", n):
        p = tok("Question: " + r["question"] + "\nAnswer:")["input_ids"]
        a = tok(" " + r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, lab = p + a, [IGNORE] * len(p) + a
        feats.append((ids[:cut], lab[:cut]) if cut else (ids, lab))
    T = max(len(i) for i, _ in feats)
    ids = torch.full((n, T), tok.pad_token_id)
    labels = torch.full((n, T), IGNORE)
    am = torch.zeros((n, T), dtype=torch.long)
    for b, (i, lab) in enumerate(feats):
        sl = slice(0, len(i)) if side == "right" else slice(T - len(i), T)
        ids[b, sl], labels[b, sl], am[b, sl] = torch.tensor(i), torch.tensor(lab), 1
    if by_id:  # DataCollatorForLanguageModeling's way: every pad id masked, the real EOS with it
        labels[ids == tok.pad_token_id] = IGNORE
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_that_cuts_every_row_to_one_length_is_named(family):
    tok = _tok(family)
    r = inspect_batch(_batch(tok, cut=80), tok)  # every row cut at 80 tokens: none padded, no max_length hint
    f = r.get("truncation-answer-lost")
    assert f is not None and f.severity == "fail" and f.evidence["rows_answer_lost"] == 6, sorted(r.ids())
    assert "labels-eos-missing" not in r.ids()  # the cause is the cut, not a missing EOS
    healthy = inspect_batch(_batch(tok), tok)
    assert "truncation-answer-lost" not in healthy.ids() and healthy.verdict == "pass", sorted(healthy.ids())


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", ["gpt2", "qwen2.5", "llama3.2"])
def test_pad_is_eos_masked_by_id_on_every_layout(family, side):
    tok = _tok(family)
    r = inspect_batch(_batch(tok, side=side, by_id=True), tok)
    assert r.get("pad-is-eos-masked") is not None and r.verdict == "fail"
    healthy = inspect_batch(_batch(tok, side=side), tok)  # padding masked by position: the EOS stays supervised
    assert "pad-is-eos-masked" not in healthy.ids() and healthy.verdict != "fail"


def test_empty_batch_is_inconclusive_not_pass():
    tok = _tok("gpt2")
    for empty in ({"input_ids": torch.zeros((0, 8), dtype=torch.long)},
                  {"input_ids": torch.zeros((2, 0), dtype=torch.long), "labels": torch.zeros((2, 0), dtype=torch.long)}):
        r = inspect_batch(empty, tok)
        assert r.verdict == "inconclusive" and r.findings == [] and all(c.status == "skipped" for c in r.checks)
        assert "empty batch" in r.checks[0].reason


# ---- diagnose: a model that learned to emit the pad token (pad == eos) ----------------------------------------

def test_diagnose_names_a_model_that_emits_the_pad_token_as_degenerate(tmp_path):
    import ckpt_fixtures as F
    from sftdoctor.diagnose import diagnose

    tok = F.make_tokenizer(pad_is_eos=True)
    b = F.make_batch(tok, "pad_zero")
    # a collator that fills the labels with the pad id (= eos): the model learns to emit it right away, so greedy
    # output "stops" empty on every prompt, the pad-token symptom behind a clean-looking stop rate
    b["labels"][b["labels"] != -100] = tok.pad_token_id
    model = F.new_model(tok, seed=1)
    F.train(model, b, steps=25, lr=1e-2)
    folder = F.save(model, tok, tmp_path / "pad_emitter")
    r = diagnose(str(folder), prompts=str(F.write_prompts(tmp_path / "p.jsonl")), max_new_tokens=12, num_prompts=4)
    f = r.get("generation-degenerate")
    assert f is not None and f.severity == "fail", [(x.id, x.severity, x.message) for x in r.findings]
    assert f.evidence["family"] == "learned" and f.evidence["token_is_pad"] and f.evidence["cause"] == "pad-token-learned"
    assert "emits" in f.message


def test_check_generation_outputs_severity_needs_a_named_cause():
    from sftdoctor.outputs import check_generation_outputs
    from sftdoctor.context import TokenizerInfo

    tok = TokenizerInfo.from_tokenizer(_tok("gpt2"))  # pad == eos == 50256
    dots = tok.encode(".")[0] if hasattr(tok, "encode") else 13
    prompts = [[40, 1101, 257]] * 4
    # an undertrained model repeating '.': bad output, no defect -> warn with the evidence
    got = {f.id: f for f in check_generation_outputs(prompts, [p + [dots] * 10 for p in prompts], tok, max_new_tokens=10,
                                                      logits_nonfinite=False,
                                                      training={"first_loss": 10.9, "last_loss": 6.2, "steps": 40,
                                                                "vocab_size": 50257})}
    f = got["generation-degenerate"]
    assert f.severity == "warn" and f.evidence["cause"] == "undertrained" and f.evidence["started_untrained"] is True
    assert "not broken" in f.message and "40 steps" in f.message
    # the same outputs with non-finite logits: the cause is named, a fail
    got = check_generation_outputs(prompts, [p + [0] * 10 for p in prompts], tok, max_new_tokens=10, logits_nonfinite=True)
    assert got[0].id == "generation-degenerate" and got[0].severity == "fail"
    # the model emits the pad (= eos) token at once: learned pad, a fail
    got = check_generation_outputs(prompts, [p + [50256] for p in prompts], tok, max_new_tokens=10, logits_nonfinite=False)
    assert got and got[0].severity == "fail" and got[0].evidence["token_is_pad"]
    # never stops: pad == eos with nothing saying EOS was supervised -> fail (cause pad-is-eos) ...
    running = [p + [345, 346, 347, 348, 349, 350, 351, 352] for p in prompts]
    got = check_generation_outputs(prompts, running, tok, max_new_tokens=8, logits_nonfinite=False)
    assert got[0].id == "generation-never-stops" and got[0].severity == "fail" and got[0].evidence["cause"] == "pad-is-eos"
    # ... but with EOS supervised in training it is a capacity / training-length limit, a warn
    got = check_generation_outputs(prompts, running, tok, max_new_tokens=8, logits_nonfinite=False,
                                   training={"eos_supervised": True, "first_loss": 10.8, "last_loss": 3.0, "steps": 20})
    assert got[0].severity == "warn" and got[0].evidence["cause"] == "undertrained" and "not a defect" in got[0].message


def test_prediction_collapse_on_an_ordinary_token_is_info_and_on_the_pad_token_a_fail():
    from types import SimpleNamespace

    from sftdoctor.context import ModelInfo, TokenizerInfo
    from sftdoctor.probes import prediction_collapse as pc

    tok = TokenizerInfo.from_tokenizer(_tok("gpt2"))

    def ctx(token, nonfinite=0.0):
        argmax = {"positions": 200, "top_share": 1.0, "natural_share": 0.1, "top_token": token,
                  "top_nonfinite_share": nonfinite, "histogram": [{"token_id": token, "text": tok.token_text(token), "share": 1.0}]}
        step = SimpleNamespace(argmax=argmax, step=1, loss=10.7)
        run = SimpleNamespace(records=[SimpleNamespace(loss=10.9)])
        return SimpleNamespace(step=step, tokenizer=tok, model=ModelInfo(embedding_rows=50257), run=run)

    early = pc.check(ctx(13))  # '.' everywhere at step 1: how every model starts
    assert early[0].severity == "info" and early[0].evidence["cause"] == "undertrained"
    assert early[0].evidence["started_untrained"] is True
    assert pc.check(ctx(50256))[0].severity == "fail"  # the pad (= eos) token: padding was trained
    assert pc.check(ctx(0))[0].severity == "fail"  # id 0
    assert pc.check(ctx(13, nonfinite=1.0))[0].severity == "fail"  # NaN logits


def test_loss_divergence_ignores_a_spike_on_a_light_last_batch():
    """The default `sftdoctor train` recipe's last step is an epoch's partial batch: its loss is noisy."""
    from types import SimpleNamespace

    from sftdoctor.probes import loss_divergence as ld
    from sftdoctor.stepstats import RunHistory, StepRecord

    def run(last_tokens):
        h = RunHistory()
        for i in range(30):
            h.add(StepRecord(step=i, optimizer_step_index=i, full=False, loss=0.30 + 0.01 * (i % 3), grad_norm=0.3, supervised_tokens=300))
        h.add(StepRecord(step=30, optimizer_step_index=30, full=False, loss=1.4, grad_norm=0.4, supervised_tokens=last_tokens))
        return ld.check(SimpleNamespace(run=h))

    assert run(40) == []  # 40 supervised tokens against a usual 300: not judged
    assert run(300) == []  # a full batch, but the run's last step: a one-off bump is not a divergence
    h = RunHistory()  # the same bump followed by a step that stays up: diverging
    for i in range(30):
        h.add(StepRecord(step=i, optimizer_step_index=i, full=False, loss=0.30 + 0.01 * (i % 3), supervised_tokens=300))
    for i, v in ((30, 1.4), (31, 1.3)):
        h.add(StepRecord(step=i, optimizer_step_index=i, full=False, loss=v, supervised_tokens=300))
    got = ld.check(SimpleNamespace(run=h))
    assert got and got[0].evidence["step"] == 30 and got[0].evidence["quantity"] == "loss"


# ---- wording that misled ---------------------------------------------------------------------------------

def test_console_and_html_wording():
    from rich.console import Console

    from sftdoctor.findings import CheckResult, Finding
    from sftdoctor.probes import REGISTRY
    from sftdoctor.report import Report
    from sftdoctor.reports.console import render
    from sftdoctor.reports.html import build_context, render_html
    from sftdoctor.session import Session

    r = Report(command="watch")
    r.record_checks([CheckResult("loss-nonfinite", "pass", level="step")])
    r.add([Finding("precision-overflow", "fail", "step", "m", {"kind": "nan-without-overflow"}, step=1),
           Finding("labels-prompt-supervised", "warn", "batch", "m", {"prompt_supervised_tokens": 245}),
           Finding("precision-fp16-unsafe", "warn", "step", "m", {"reasons": ["pure-fp16-adam"]}, step=1),
           Finding("labels-pad-not-ignored", "fail", "batch", "m", {"token_id": 0, "token_text": "<|endoftext|>"})])
    r.metrics.update({
        "token_classes": {"prompt": {"tokens": 0, "supervised": 0}, "response": {"tokens": 400, "supervised": 400},
                          "eos": {"tokens": 4, "supervised": 4}},
        "generations": [{"output": "...", "tokens": 3, "stopped": False, "dtype": None}],
        "activations": [{"module": "model.layers.0", "max_abs": float("nan"), "dtype": "float16", "limit": 65504.0,
                         "finite": False, "phase": "forward", "step": 1}],
        "fp16_forecast": {"safe": True, "overflow": [], "headroom": []},
    })
    Session.reopen(r, REGISTRY).finish()  # what every run ends with: the root causes ranked
    con = Console(record=True, width=160)
    render(r, con)
    text = con.export_text()
    assert "[step 1]" in text and "step step" not in text
    assert "greedy generations (None)" not in text and "greedy generations" in text
    prompt_row = next(line for line in text.splitlines() if "prompt " in line and "│" in line)
    assert "245" in prompt_row  # the class table agrees with the 245 supervised prompt tokens of the warning
    ctx = build_context(r)
    assert ctx["forecast"] is not None and "yes" not in str(ctx["forecast"])  # never "safe: yes" over NaN
    assert ctx["activation_rows"][0]["ratio"] == "NaN"  # not an "overflow"
    causes = [c["id"] for c in ctx["causes"]]
    assert causes[0] in ("precision-fp16-unsafe", "labels-pad-not-ignored") and "precision-fp16-unsafe" in causes
    pad_cause = next(c for c in ctx["causes"] if c["id"] == "labels-pad-not-ignored")
    assert "`!`" not in pad_cause["what"]
    page = render_html(r)
    assert "NaN weights or inputs" in page
    css = (__import__("pathlib").Path(__import__("sftdoctor.reports.html", fromlist=["x"]).TEMPLATES) / "report.css").read_text()
    assert "table.data td { border-bottom: 1px solid var(--line); padding: 4px 10px;" in css


def test_generation_config_eos_wording_when_unset():
    from types import SimpleNamespace

    from sftdoctor.context import TokenizerInfo
    from sftdoctor.probes import generation_config_eos as g

    tok = TokenizerInfo.from_tokenizer(_tok("gpt2"))
    rec = SimpleNamespace(generation_config={"eos_token_id": [], "pad_token_id": None, "source": "config.json"},
                          config={"tokenizer_eos_id": 50256}, generations=[])
    f = g.check(SimpleNamespace(checkpoint=rec, tokenizer=tok))[0]
    assert "is unset lacks" not in f.message and "sets no eos_token_id" in f.message and "50256" in f.message


def test_pad_after_a_supervised_end_of_turn_is_padding_not_a_masked_eos():
    """Qwen2.5: eos ids {<|endoftext|>, <|im_end|>}, pad <|endoftext|>; rows end with a supervised <|im_end|>
    and the pad tail is masked (the packed_rows_correct control, 4D mask not readable)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen2.5")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for r in gsm8k_rows("train", 3):
        p = tok("Question: " + r["question"] + "\nAnswer:")["input_ids"]
        a = tok(" " + r["answer"])["input_ids"] + [im_end]
        rows.append((p + a, [IGNORE] * len(p) + a))
    T = max(len(i) for i, _ in rows) + 5
    ids = torch.full((3, T), tok.pad_token_id)
    labels = torch.full((3, T), IGNORE)
    for b, (i, lab) in enumerate(rows):
        ids[b, :len(i)], labels[b, :len(lab)] = torch.tensor(i), torch.tensor(lab)
    r = inspect_batch({"input_ids": ids, "labels": labels}, tok)  # no attention_mask (a 4D one is not read)
    assert "pad-is-eos-masked" not in r.ids() and r.verdict != "fail", [(f.id, f.message) for f in r.findings]
    # the broken twin: the answer's own end token is the pad id (<|endoftext|>) and it was masked by id
    for b, (i, lab) in enumerate(rows):
        ids[b, len(i) - 1] = tok.pad_token_id
        labels[b, len(i) - 1] = IGNORE
    r = inspect_batch({"input_ids": ids, "labels": labels}, tok)
    assert "pad-is-eos-masked" in r.ids()

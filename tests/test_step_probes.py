"""Step and run probes on real (tiny, random-init) transformers models: one fault injection per
finding id, each with a healthy twin that must stay clean; plus the attach() lifecycle."""
from __future__ import annotations

import json
import weakref

import pytest
import torch

import sftdoctor
from sftdoctor import patches
from sftdoctor.attach import attach

from step_fixtures import (IGNORE, batch, boost_mlp, correct_loss, custom_step, double_shift_loss, hf_step, model, pad_with,
                           scale_module, small_tok)


def run_custom(m, steps, loss_fn, *, b=None, lr=1e-3, **kw):
    b = b or batch()
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    with attach(m, small_tok(), optimizer=opt) as doc:
        for _ in range(steps):
            custom_step(m, b, loss_fn, opt, **kw)
        return doc.report()


def hf_run(m, steps=1, b=None, opt=None, **attach_kw):
    b = b or batch()
    with attach(m, small_tok(), optimizer=opt, **attach_kw) as doc:
        for _ in range(steps):
            hf_step(m, b, opt)
        return doc.report()


# ---- healthy baselines ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_healthy_hf_loop_has_no_findings(arch):
    r = hf_run(model(arch), steps=2, opt=None)
    assert r.findings == [], [f.id for f in r.findings]
    steps = r.metrics["steps"]
    assert len(steps) == 2 and all(s["loss"] > 0 and s["grad_norm"] > 0 for s in steps)
    by = steps[0]["by_class"]
    assert by["pad"]["tokens"] > 0 and by["pad"]["grad_norm"] == 0.0 and by["response"]["grad_norm"] > 0
    assert r.metrics["effective_targets"]["match"]["1"] == 1.0
    assert r.metrics["fp16_forecast"]["safe"] is True
    statuses = {c.id: c.status for c in r.checks}
    for i in ("loss-nonfinite", "logits-nonfinite", "grad-from-ignored-tokens", "labels-misaligned", "params-frozen"):
        assert statuses[i] == "pass"


def test_healthy_custom_loop_is_clean_and_reads_the_gradient():
    r = run_custom(model("qwen2"), 2, correct_loss)
    assert r.findings == [], [f.id for f in r.findings]
    s = r.metrics["steps"][0]
    assert s["supervised_tokens"] == int((batch()["labels"][:, 1:] != IGNORE).sum())
    # the token view carries what the loss really used, aligned like labels
    row = r.samples[0]
    labels = batch()["labels"][0].tolist()
    assert row["effective_target"] == labels


# ---- loss-nonfinite -----------------------------------------------------------------------------

def test_loss_nonfinite_from_a_micro_batch_with_no_supervised_token():
    m = model("llama")
    b = batch()
    empty = dict(b, labels=torch.full_like(b["labels"], IGNORE))  # 0/0 = NaN mean loss
    r = hf_run(m, b=empty)
    f = r.get("loss-nonfinite")
    # 0/0 (no supervised token): named as a division over zero tokens, not as an fp16 overflow (issue 15)
    assert f is not None and f.severity == "fail" and f.evidence["cause"] == "empty-row-division"
    assert "loss-nonfinite" not in hf_run(model("llama"), b=b).ids()


# ---- logits-nonfinite ---------------------------------------------------------------------------

def test_logits_nonfinite_names_the_first_module():
    m = model("llama")
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    r = hf_run(m)
    f = r.get("logits-nonfinite")
    assert f is not None and f.evidence["first_nonfinite_module"] == "model.layers.1.mlp.down_proj"
    assert f.evidence["nonfinite_share"] == 1.0
    assert "logits-nonfinite" not in hf_run(model("llama")).ids()


# ---- precision-overflow (fp16 forward, fp16 backward, bf16) ----------------------------------------

def test_precision_overflow_fp16_forward():
    m = model("qwen2").half()
    boost_mlp(m.model.layers[0].mlp, 2e4)
    r = hf_run(m)
    f = r.get("precision-overflow")
    assert f is not None and f.evidence["phase"] == "forward"
    assert f.evidence["module"] == "model.layers.0.mlp.down_proj" and f.evidence["limit"] == 65504.0
    assert f.evidence["dtype"] == "float16"
    assert {"logits-nonfinite", "loss-nonfinite"} <= r.ids()
    assert "precision-overflow" not in hf_run(model("qwen2").half()).ids()


def test_precision_overflow_fp16_backward_with_a_finite_forward():
    m = model("gpt2").half()
    b = batch()
    with attach(m, small_tok()) as doc:
        hf_step(m, b, scale=2.0 ** 24)  # a manual loss scale, no GradScaler: the gradient overflows
        r = doc.report()
    f = r.get("precision-overflow")
    assert f is not None and f.evidence["phase"] == "backward", r.ids()
    assert "logits-nonfinite" not in r.ids() and "loss-nonfinite" not in r.ids()
    assert "grad-nonfinite" in r.ids()


def test_precision_overflow_bf16():
    m = model("llama").to(torch.bfloat16)
    scale_module(m.model.layers[1].self_attn.v_proj, 1e6)
    scale_module(m.model.layers[1].self_attn.o_proj, 1e36)  # weights ~2e34: finite in bf16, the product is not
    r = hf_run(m)
    f = r.get("precision-overflow")
    assert f is not None and f.evidence["dtype"] == "bfloat16"
    assert f.evidence["module"].startswith("model.layers.1.self_attn")
    assert "precision-overflow" not in hf_run(model("llama").to(torch.bfloat16)).ids()


# ---- precision-headroom and the fp16 forecast ----------------------------------------------------

def _down_proj_max(m, b):
    boost_mlp(m.model.layers[0].mlp, 1.0)
    with attach(m, small_tok()) as doc:
        hf_step(m, b)
        rows = doc.report().metrics["activations"]
    return next(r["max_abs"] for r in rows if r["module"] == "model.layers.0.mlp.down_proj" and r["phase"] == "forward")


def test_precision_headroom_fp16_and_forecast_from_fp32():
    b = batch()
    base = _down_proj_max(model("qwen2"), b)
    # fp16 run, activations at ~40000 (61% of 65504): warn, not overflow
    m = model("qwen2")
    boost_mlp(m.model.layers[0].mlp, 40000 / base)
    r = hf_run(m.half(), b=b)
    f = r.get("precision-headroom")
    assert f is not None and f.severity == "warn" and f.evidence["module"] == "model.layers.0.mlp.down_proj"
    assert "precision-overflow" not in r.ids()
    # the same model in fp32 forecasts fp16 trouble (info) and says so in metrics
    m = model("qwen2")
    boost_mlp(m.model.layers[0].mlp, 1e5 / base)
    r = hf_run(m, b=b)
    f = r.get("precision-headroom")
    assert f is not None and f.severity == "info" and f.evidence["forecast"] is True
    fc = r.metrics["fp16_forecast"]
    assert fc["safe"] is False and "model.layers.0.mlp.down_proj" in [o["module"] for o in fc["overflow"]]
    assert "precision-headroom" not in hf_run(model("qwen2").half(), b=b).ids()


# ---- precision-fp16-unsafe -------------------------------------------------------------------------

def test_precision_fp16_unsafe_bf16_checkpoint_run_in_fp16():
    m = model("qwen2")
    m.config.dtype = torch.bfloat16  # what a bf16 checkpoint's config says
    r = hf_run(m.half())
    f = r.get("precision-fp16-unsafe")
    assert f is not None and f.evidence["reasons"] == ["checkpoint-bf16"]
    m = model("qwen2")
    m.config.dtype = torch.bfloat16
    assert "precision-fp16-unsafe" not in hf_run(m.to(torch.bfloat16)).ids()


def test_precision_fp16_unsafe_adam_eps_rounds_to_zero():
    m = model("qwen2").half()
    r = hf_run(m, opt=torch.optim.AdamW(m.parameters(), lr=1e-4, eps=1e-8))
    f = r.get("precision-fp16-unsafe")
    assert f is not None and "adam-eps-rounds-to-zero" in f.evidence["reasons"] and f.evidence["eps"] == 1e-8
    m = model("qwen2").half()
    # eps 1e-4 is representable in fp16, but Adam on pure fp16 weights (no fp32 master copy) is still named
    f = hf_run(m, opt=torch.optim.AdamW(m.parameters(), lr=1e-4, eps=1e-4)).get("precision-fp16-unsafe")
    assert f is not None and f.evidence["reasons"] == ["pure-fp16-adam"]
    m = model("qwen2")  # fp32 weights with AdamW: fine
    assert "precision-fp16-unsafe" not in hf_run(m, opt=torch.optim.AdamW(m.parameters(), lr=1e-4, eps=1e-8)).ids()


# ---- grad-nonfinite ---------------------------------------------------------------------------------

def test_grad_nonfinite_with_a_finite_loss():
    m = model("qwen2")
    with torch.no_grad():
        m.model.norm.weight[0] = 0.0
    b = batch()

    def loss_with_sqrt_regulariser(logits, labels):  # d sqrt(x)/dx is inf at 0
        return correct_loss(logits, labels) + 1e-3 * m.model.norm.weight.abs().sqrt().sum()

    r = run_custom(m, 1, loss_with_sqrt_regulariser, b=b)
    f = r.get("grad-nonfinite")
    assert f is not None and "model.norm.weight" in f.evidence["parameters"]
    assert "loss-nonfinite" not in r.ids()
    assert "grad-nonfinite" not in run_custom(model("qwen2"), 1, correct_loss, b=b).ids()


# ---- grad-from-ignored-tokens and labels-misaligned from the gradient alone ----------------------------

@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_custom_loss_supervising_padding_is_named_from_the_gradient(arch):
    b = batch()
    bad = pad_with(b["labels"], b["attention_mask"], 0)
    r = run_custom(model(arch), 1, correct_loss, b=b, labels=bad)
    f = r.get("grad-from-ignored-tokens")
    assert f is not None and f.severity == "fail" and f.evidence["class"] == "pad"
    assert f.evidence["positions"] == int((b["attention_mask"][:, 1:] == 0).sum())
    top = f.evidence["common_targets"][0]  # id 0 (here <|endoftext|>: also the 4 real EOS targets)
    assert top["token_id"] == 0 and top["count"] >= f.evidence["positions"]
    assert f.evidence["family"] == "learned"
    assert "labels-misaligned" not in r.ids()


def test_gradient_into_prompt_positions_is_a_warning():
    m, b = model("qwen2"), batch()
    all_tokens = b["input_ids"].masked_fill(b["attention_mask"] == 0, IGNORE)
    with attach(m, small_tok()) as doc:
        out = m(**b)  # labels seen by the forward mark the prompt as ignored...
        correct_loss(out.logits, all_tokens).backward()  # ...but the loss the user backpropagates uses it
        r = doc.report()
    f = r.get("grad-from-ignored-tokens")
    assert f is not None and f.severity == "warn" and f.evidence["class"] == "prompt"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_double_label_shift_in_a_custom_loss_is_named_from_the_gradient(arch):
    r = run_custom(model(arch), 1, double_shift_loss)
    f = r.get("labels-misaligned")
    assert f is not None and f.level == "step" and f.evidence["best_offset"] == 2 and f.evidence["k"] == 1
    assert f.evidence["match_rate"] > 0.9 and f.evidence["source"] == "gradient"


def test_preshifted_labels_given_to_an_hf_model():
    b = batch()
    pre = torch.full_like(b["labels"], IGNORE)
    pre[:, :-1] = b["labels"][:, 1:]
    r = hf_run(model("gpt2"), b=dict(b, labels=pre))
    assert r.get("labels-misaligned").evidence["best_offset"] == 2


# ---- params-frozen ------------------------------------------------------------------------------------

def _checkpointed_frozen_embeddings(use_reentrant: bool):
    m = model("qwen2", layers=2)
    m.get_input_embeddings().weight.requires_grad_(False)  # tied: the lm_head is frozen too
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    # transformers 5 adds an input-requires-grad hook for this case; older versions and custom models do not
    m.disable_input_require_grads()
    m.train()
    return m


def test_params_frozen_gradient_checkpointing_with_frozen_embeddings():
    r = hf_run(_checkpointed_frozen_embeddings(use_reentrant=True))  # transformers#21381
    f = r.get("params-frozen")
    assert f is not None and f.evidence["nonzero_share"] < 0.5
    assert "model.layers.0.mlp.down_proj.weight" in f.evidence["zero_grad_names"]
    assert "params-frozen" not in hf_run(_checkpointed_frozen_embeddings(use_reentrant=False)).ids()


def test_params_frozen_optimizer_built_before_unfreezing():
    m = model("llama")
    for p in m.parameters():
        p.requires_grad_(False)
    m.lm_head.weight.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    for p in m.parameters():
        p.requires_grad_(True)  # unfrozen after the optimizer was built
    r = hf_run(m, opt=opt)
    f = r.get("params-frozen")
    assert f is not None and "model.layers.0.mlp.down_proj.weight" in f.evidence["missing_from_optimizer"]


def test_params_frozen_nothing_trainable():
    m = model("qwen2")
    m.requires_grad_(False)
    with attach(m, small_tok()) as doc:
        with pytest.raises(RuntimeError):
            hf_step(m, batch())  # the user's script fails here; the report says why
        r = doc.report()
    assert r.get("params-frozen").evidence["logits_requires_grad"] is False


# ---- prediction-collapse ---------------------------------------------------------------------------------

def test_prediction_collapse_numerical_family():
    m = model("qwen2")
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight.fill_(float("nan"))
    f = hf_run(m).get("prediction-collapse")
    assert f is not None and f.evidence["token_id"] == 0 and f.evidence["family"] == "numerical"


def test_prediction_collapse_learned_from_labels_padded_with_zero():
    tok = small_tok()
    b = batch(n=4, max_length=64)
    # long padding: every row padded to 160 tokens, padding supervised with label 0
    T = 160
    ids = torch.full((4, T), tok.pad_token_id)
    am = torch.zeros(4, T, dtype=torch.long)
    ids[:, :64], am[:, :64] = b["input_ids"], b["attention_mask"]
    labels = pad_with(torch.cat([b["labels"], torch.full((4, T - 64), IGNORE)], 1), am, 0)
    long_b = {"input_ids": ids, "attention_mask": am, "labels": labels}
    m = model("qwen2")
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    with attach(m, tok, optimizer=opt, every=1000, full_steps=0) as doc:
        for _ in range(25):
            hf_step(m, long_b, opt)
        doc.observer.force_full_next()  # sample the next steps fully
        hf_step(m, long_b)
        r = doc.report()
    f = r.get("prediction-collapse")
    assert f is not None and f.evidence["token_id"] == 0 and f.evidence["family"] == "learned"
    assert r.metrics["argmax_histogram"][0]["token_id"] == 0


# ---- run level -----------------------------------------------------------------------------------------

def _uneven_micro_batches():
    b = batch(n=4, max_length=96)
    lengths = (b["labels"] != IGNORE).sum(1)
    order = lengths.argsort()
    short = {k: v[order[:1]] for k, v in b.items()}
    long = {k: v[order[1:]] for k, v in b.items()}
    return [short, long]


def test_grad_accum_normalization_mean_per_micro_batch():
    micro = _uneven_micro_batches()
    m = model("qwen2")
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    with attach(m, small_tok(), optimizer=opt) as doc:
        for _ in range(2):
            for mb in micro:
                (m(**mb).loss / len(micro)).backward()  # averaged per micro-batch: tokens weighted unequally
            opt.step()
            opt.zero_grad()
        r = doc.report()
    f = r.get("grad-accum-normalization")
    assert f is not None and f.evidence["weight_spread"] > 1.5
    # healthy: sum over tokens divided by the optimizer step's total token count
    m = model("qwen2")
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    total = sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro)
    with attach(m, small_tok(), optimizer=opt) as doc:
        for _ in range(2):
            for mb in micro:
                logits = m(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), mb["labels"][:, 1:].flatten(),
                                                         ignore_index=IGNORE, reduction="sum") / total
                loss.backward()
            opt.step()
            opt.zero_grad()
        r = doc.report()
    assert "grad-accum-normalization" not in r.ids()
    assert r.metrics["steps"][1]["optimizer_step"] is True and r.metrics["steps"][0]["optimizer_step"] is False


def _autocast_scaler_run(m, steps=5, init_scale=2.0 ** 10):
    b = batch()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    with attach(m, small_tok(), optimizer=opt) as doc:
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = m(**b).loss
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return doc.report(), loss


def test_loss_scale_skipped_steps_and_scale_trajectory():
    m = model("qwen2")
    boost_mlp(m.model.layers[1].mlp, 2e4)  # overflows fp16 under autocast: every step's grads are NaN
    r, loss = _autocast_scaler_run(m, steps=5, init_scale=8.0)
    f = r.get("loss-scale-skipped-steps")
    assert f is not None and f.evidence["skipped"] >= 4 and f.evidence["last_scale"] < 1.0  # reported online
    assert r.metrics["loss_scale"] == {"scales": [4.0, 2.0, 1.0, 0.5, 0.25], "skipped": 5}
    assert "grad-nonfinite" not in r.ids()  # the scaler handles those: no double report
    r, loss = _autocast_scaler_run(model("qwen2"))
    assert "loss-scale-skipped-steps" not in r.ids() and r.metrics["loss_scale"]["skipped"] == 0
    assert r.metrics["steps"][0]["loss_scale"] == 2.0 ** 10
    # the raw loss was captured unscaled (the scaled loss is what .backward() saw)
    assert abs(r.metrics["steps"][-1]["loss"] - float(loss)) < 1e-3


def test_loss_divergence_after_a_learning_rate_blow_up():
    m, b = model("qwen2"), batch()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with attach(m, small_tok(), optimizer=opt) as doc:
        for i in range(14):
            if i == 11:
                opt.param_groups[0]["lr"] = 500.0  # one step with an absurd learning rate
            if i == 12:
                opt.param_groups[0]["lr"] = 0.05
            hf_step(m, b, opt)
        r = doc.report()
    f = r.get("loss-divergence")
    assert f is not None and f.evidence["step"] >= 12 and f.evidence["ratio"] > 2
    m = model("qwen2")
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    assert "loss-divergence" not in hf_run(m, steps=14, opt=opt).ids()


# ---- the incident, end to end at step level ------------------------------------------------------------------

def test_incident_numerical_and_learned_causes_reported_apart():
    """Custom loop, fp16, loss mask passed as attention_mask, labels padded with 0 (`!` in GPT-2),
    and one row whose activations overflow fp16."""
    from conftest import with_pad

    tok = with_pad("gpt2")
    b = batch(tok, n=3, max_length=40)
    m = model("qwen2", tok, hidden=32, layers=2, tie=False).half()  # untied: the lm_head row stays normal
    others = set(b["input_ids"][1:].flatten().tolist())
    answer = b["input_ids"][0][b["labels"][0] != IGNORE].tolist()
    trigger = next(t for t in answer if t not in others)  # an answer token only row 0 holds
    with torch.no_grad():
        m.model.embed_tokens.weight[trigger] = 65504.0  # fp16 max: overflows once attention adds to it
        boost_mlp(m.model.layers[0].mlp, 100.0)
    loss_mask = (b["labels"] != IGNORE).long()
    labels0 = pad_with(b["labels"], b["attention_mask"], 0)
    # row 0 overflows; keep its supervision out of the other rows' evidence
    with attach(m, tok) as doc:
        out = m(input_ids=b["input_ids"], attention_mask=loss_mask)  # the loss mask as attention mask
        loss = correct_loss(out.logits[1:], labels0[1:]) + 0 * out.logits[:1].float().nansum()
        loss.backward()
        r = doc.report()
    ids = r.ids()
    assert "logits-nonfinite" in ids and "precision-overflow" in ids
    assert r.get("precision-overflow").evidence["family"] == "numerical"
    assert r.get("logits-nonfinite").evidence["rows"] == [0]
    f = r.get("grad-from-ignored-tokens")
    assert f is not None and f.evidence["family"] == "learned" and f.evidence["class"] == "pad"


# ---- attach lifecycle, callbacks, API ----------------------------------------------------------------------

def test_detach_restores_everything_and_keeps_nothing_alive():
    from torch.amp import GradScaler

    orig = (torch.Tensor.backward, GradScaler.scale, GradScaler.step, GradScaler.update)
    m, b = model("qwen2"), batch()
    n_hooks = sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())
    doc = attach(m, small_tok())
    assert torch.Tensor.backward is not orig[0]
    out = m(**b)
    ref = weakref.ref(out.logits)
    out.loss.backward()
    del out
    assert ref() is None  # the probes hold no reference to the logits
    doc.detach()
    doc.detach()  # idempotent
    assert (torch.Tensor.backward, GradScaler.scale, GradScaler.step, GradScaler.update) == orig
    assert sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules()) == n_hooks
    assert patches.STEP.users() == []
    assert sftdoctor.attach is attach or callable(sftdoctor.attach)


class Stop(BaseException):
    pass


def test_callbacks_run_at_safe_points_and_their_exceptions_reach_the_script():
    m, b = model("qwen2"), batch()
    bad = dict(b, labels=pad_with(b["labels"], b["attention_mask"], 0))
    seen, steps = [], []

    def on_finding(f):
        seen.append(f.id)
        raise Stop(f.id)

    with attach(m, small_tok(), on_finding=on_finding, on_step=steps.append) as doc:
        out = m(**bad)
        with pytest.raises(Stop):
            out.loss.backward()  # raised from the user's own call, after autograd finished
        assert m.model.norm.weight.grad is not None
    assert seen == ["grad-from-ignored-tokens"]
    assert doc.records and doc.records[0]["step"] == 0 and patches.STEP.users() == []


def test_sampling_policy_full_steps_then_every_n():
    m, b = model("qwen2"), batch()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    with attach(m, small_tok(), optimizer=opt, every=4, full_steps=2) as doc:
        for _ in range(9):
            hf_step(m, b, opt)
            with torch.no_grad():
                m(**b)  # evaluation forwards (and generate) are not training steps
        r = doc.report()
    assert [s["full"] for s in r.metrics["steps"]] == [True, True, False, False, True, False, False, False, True]
    assert doc.optimizer_steps == 9 and all(s["grad_norm"] > 0 for s in doc.records)
    assert json.loads(r.to_json())["metrics"]["activations"][0]["phase"] == "forward"


def test_inspect_batch_with_a_model_runs_one_step_without_updating_it():
    m, b = model("qwen2"), batch()
    bad = dict(b, labels=pad_with(b["labels"], b["attention_mask"], 0))
    before = [p.detach().clone() for p in m.parameters()]
    m.eval()
    r = sftdoctor.inspect_batch(bad, small_tok(), model=m)
    assert "grad-from-ignored-tokens" in r.ids() and r.get("grad-from-ignored-tokens").level == "step"
    assert not m.training and all(p.grad is None for p in m.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
    assert "effective_target" in r.samples[0] and r.metrics["steps"][0]["by_class"]["pad"]["supervised"] > 0
    clean = sftdoctor.inspect_batch(b, small_tok(), model=m)
    assert not {"grad-from-ignored-tokens", "labels-misaligned", "loss-nonfinite"} & clean.ids()


def test_attach_to_an_hf_trainer(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    b = batch(n=8)
    rows = [{k: v[i].tolist() for k, v in b.items()} for i in range(8)]
    ds = Dataset.from_list(rows)
    m = model("qwen2")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=m, args=args, train_dataset=ds, processing_class=small_tok())
    doc = attach(trainer)
    trainer.train()
    r = doc.report()
    doc.detach()
    assert doc.optimizer_steps == 3 and len(doc.records) == 3
    assert r.findings == [], [f.id for f in r.findings]
    assert all(s["lr"] is not None for s in r.metrics["steps"] if s["optimizer_step"])


def test_plain_module_returning_logits_without_tokenizer():
    """Any nn.Module whose output is the logits tensor; no tokenizer: padding comes from the mask."""
    hf = model("llama")

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = hf

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    m, b = Wrapper(), batch()
    bad = pad_with(b["labels"], b["attention_mask"], 0)
    import sftdoctor.attach  # noqa: F401  binds the submodule name: sftdoctor.attach(...) must still work

    with sftdoctor.attach(m) as doc:
        correct_loss(m(b["input_ids"], b["attention_mask"]), bad).backward()
        r = doc.report()
    assert r.get("grad-from-ignored-tokens").evidence["class"] == "pad"
    assert r.metrics["steps"][0]["loss"] > 0 and r.metrics["steps"][0]["by_class"]["pad"]["tokens"] > 0


def test_only_the_attached_models_optimizer_steps_count():
    m, other, b = model("qwen2"), model("gpt2"), batch()
    opt_other = torch.optim.SGD(other.parameters(), lr=1e-3)
    with attach(m, small_tok()) as doc:  # no optimizer given: found by its parameters
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        for _ in range(2):
            hf_step(m, b, opt)
            hf_step(other, b, opt_other)
        del opt  # rebuilt (e.g. after unfreezing): the new one is adopted
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        hf_step(m, b, opt)
        r = doc.report()
    assert doc.optimizer_steps == 3 and len(doc.records) == 3
    assert [s["optimizer_step"] for s in r.metrics["steps"]] == [True, True, True]

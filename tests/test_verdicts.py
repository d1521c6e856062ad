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

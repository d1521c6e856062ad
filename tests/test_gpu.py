"""The same checks on a CUDA device (marker `gpu`: skipped on a machine without one; run with
`pytest -m gpu` on a GPU machine). CPU twins of each live in test_step_probes.py and test_train_lean.py;
these catch what only the GPU path does: device-side reductions, autocast on CUDA, fused kernels."""
from __future__ import annotations

import pytest
import torch

from sftdoctor import attach
from sftdoctor.constants import IGNORE_INDEX
from sftdoctor.train.lean import chunked_causal_lm_loss
from step_fixtures import batch, boost_mlp, hf_step, model, small_tok

pytestmark = pytest.mark.gpu


def cuda_run(m, b=None, *, autocast: torch.dtype | None = None):
    m = m.cuda()
    b = {k: v.cuda() for k, v in (b or batch()).items()}
    with attach(m, small_tok()) as doc:
        with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
            hf_step(m, b)
        return doc.report()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_healthy_autocast_step_on_cuda_has_no_fail(dtype):
    r = cuda_run(model("qwen2"), autocast=dtype)
    assert not r.ids("fail"), r.ids("fail")
    assert any(c.level == "step" and c.status != "skipped" for c in r.checks)  # the step checks ran


def test_fp16_overflow_on_cuda_names_the_module():
    m = model("qwen2").half()
    boost_mlp(m.model.layers[0].mlp, 2e4)
    r = cuda_run(m)
    f = r.get("precision-overflow")
    assert f is not None and f.evidence["phase"] == "forward" and f.evidence["dtype"] == "float16"
    assert f.evidence["module"] == "model.layers.0.mlp.down_proj"


def test_pad_labels_found_by_the_gradient_on_cuda():
    b = batch()
    b["labels"] = b["labels"].masked_fill(b["attention_mask"] == 0, 0)  # pad labelled 0, not -100
    r = cuda_run(model("llama"), b)
    assert "grad-from-ignored-tokens" in r.ids("fail") or "labels-pad-not-ignored" in r.ids("fail"), r.ids()


def test_chunked_loss_on_cuda_equals_cross_entropy():
    torch.manual_seed(0)
    h = torch.randn(4, 33, 64, device="cuda", requires_grad=True)
    w = torch.randn(1000, 64, device="cuda", requires_grad=True)
    labels = torch.randint(0, 1000, (4, 33), device="cuda")
    labels[:, :7] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy((h @ w.t())[:, :-1].reshape(-1, 1000), labels[:, 1:].reshape(-1),
                                            ignore_index=IGNORE_INDEX)
    gh, gw = torch.autograd.grad(ref, (h, w))
    got = chunked_causal_lm_loss(h, w, labels, chunk_elements=33 * 1000, backend="torch")
    lh, lw = torch.autograd.grad(got, (h, w))
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(lh, gh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lw, gw, atol=1e-5, rtol=1e-4)

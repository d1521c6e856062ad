"""Padding-free packed batches and the chunked (memory-lean) loss of `sftdoctor train`:
same loss and same gradients as the plain padded path, positions per epoch == real tokens, and
the packing probe silent on our packing but firing on naive packing."""
from __future__ import annotations

import copy

import pytest
import torch

import sftdoctor
from conftest import gsm8k_rows, with_pad
from sftdoctor.train.collate import IGNORE_INDEX, Collator, PackedCollator, encode_example
from sftdoctor.train.lean import LeanLoss, chunked_causal_lm_loss, lean_forward, supports_lean
from sftdoctor.train.recipe import Recipe


@pytest.fixture(scope="module")
def pieces():
    from sftdoctor.train.data import load_rows
    from sftdoctor.train.pipeline import build_tiny

    train_rows, _, _ = load_rows("synthetic", data_config="main", levels="1,2", train_examples=64, eval_limit=4, seed=0)
    tok, model = build_tiny(Recipe(tiny_hidden=32, tiny_layers=2), train_rows)
    model.config.use_cache = False
    feats = [encode_example(tok, r) for r in train_rows[:6]]
    # a row supervised from its 2nd token (no prompt mask): the row-boundary label matters there
    feats[1] = {**feats[1], "labels": list(feats[1]["input_ids"])}
    return tok, model, feats


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, batch, *, lean: bool = False, num_items=None) -> tuple[float, dict]:
    m = copy.deepcopy(model)
    m.train()
    batch = dict(batch)
    if num_items is not None:
        batch["num_items_in_batch"] = num_items
    if lean:
        labels = batch.pop("labels")
        out = lean_forward(m, batch.pop("input_ids"), batch.pop("attention_mask", None), batch.pop("position_ids", None), labels, batch)
        assert out.logits is None  # the lean path never builds the [B, T, V] logits
    else:
        out = m(**batch)
    out.loss.backward()
    return float(out.loss.detach()), grads(m)


def assert_same(a: tuple[float, dict], b: tuple[float, dict]) -> None:
    assert a[0] == pytest.approx(b[0], abs=1e-4, rel=1e-5)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=2e-6, rtol=1e-4, msg=name)


def test_packed_batch_has_no_padding_and_restarting_positions(pieces):
    tok, _, feats = pieces
    b = PackedCollator()(feats[:3])
    lengths = [len(f["input_ids"]) for f in feats[:3]]
    assert b["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in b
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert (b["position_ids"][0] == 0).nonzero().flatten().tolist() == starts
    assert all(int(b["labels"][0, s]) == IGNORE_INDEX for s in starts)  # no target across a row boundary


def test_packed_loss_and_gradients_equal_the_padded_batch(pieces):
    """Attention cannot cross rows: the packed row (sdpa, block-diagonal mask from the position
    ids) gives the padded batch's loss and gradients."""
    tok, model, feats = pieces
    padded = Collator(tok.pad_token_id)(feats)
    packed = PackedCollator()(feats)
    n = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == n
    assert_same(loss_and_grads(model, packed), loss_and_grads(model, padded))
    # and the rows DO interact without the position-id restart (the test can fail)
    naive = {"input_ids": packed["input_ids"], "labels": packed["labels"]}
    assert abs(loss_and_grads(model, naive)[0] - loss_and_grads(model, padded)[0]) > 1e-4


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("chunk_elements", [None, 3000])  # one chunk; many chunks of a few rows
def test_chunked_loss_and_gradients_equal_the_plain_path(pieces, layout, chunk_elements, monkeypatch):
    tok, model, feats = pieces
    batch = (Collator(tok.pad_token_id) if layout == "padded" else PackedCollator())(feats)
    if chunk_elements:
        monkeypatch.setattr("sftdoctor.train.lean.CHUNK_ELEMENTS", chunk_elements)
    assert_same(loss_and_grads(model, batch, lean=True), loss_and_grads(model, batch))
    # with the Trainer's num_items_in_batch (sum / supervised tokens of the accumulated batch)
    items = torch.tensor(500)
    assert_same(loss_and_grads(model, batch, lean=True, num_items=items), loss_and_grads(model, batch, num_items=items))


def test_chunked_function_matches_cross_entropy_on_random_tensors():
    torch.manual_seed(0)
    h = torch.randn(3, 17, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (3, 17))
    labels[0, :5] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy((h @ w.t())[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    gh, gw = torch.autograd.grad(ref, (h, w))
    got = chunked_causal_lm_loss(h, w, labels, chunk_elements=120, backend="torch")  # 2 rows per chunk
    lh, lw = torch.autograd.grad(got, (h, w))
    assert float(got.detach()) == pytest.approx(float(ref), rel=1e-6)
    torch.testing.assert_close(lh, gh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lw, gw, atol=1e-6, rtol=1e-5)
    # nothing supervised: zero loss, zero gradient, no crash
    empty = chunked_causal_lm_loss(h, w, torch.full((3, 17), IGNORE_INDEX), num_items_in_batch=1)
    assert float(empty) == 0.0


def test_installed_lean_forward_only_on_training_steps_with_labels(pieces):
    tok, model, feats = pieces
    m = copy.deepcopy(model)
    assert supports_lean(m) is None
    lean = LeanLoss(m)
    batch = Collator(tok.pad_token_id)(feats[:2])
    out = m(**batch)
    assert out.logits is None and lean.lean_steps == 1
    with torch.no_grad():  # evaluation: the model's own forward, logits and the same loss
        ev = m(**batch)
    assert ev.logits is not None and float(ev.loss) == pytest.approx(float(out.loss), abs=1e-5)
    lean.want_logits = lambda: True  # a step the probes sample: full logits
    assert m(**batch).logits is not None and lean.full_steps == 1
    lean.remove()
    assert m(**batch).logits is not None
    clone = copy.deepcopy(m)  # a deep copy runs on its own weights, not the original's
    lean.enabled, lean.want_logits = True, lambda: False
    out = clone(**batch)
    assert out.logits is None
    out.loss.backward()
    assert clone.lm_head.weight.grad is not None and m.lm_head.weight.grad is None


def test_packing_probe_silent_on_our_packing_and_fires_on_naive_packing():
    tok = with_pad("qwen2.5")
    feats = [encode_example(tok, {**r, "id": i}) for i, r in enumerate(gsm8k_rows("train", 4))]
    ours = PackedCollator()(feats)
    report = sftdoctor.inspect_batch(ours, tok)
    assert not report.ids() & {"packing-cross-contamination", "position-ids-inconsistent"}
    naive = {"input_ids": ours["input_ids"], "attention_mask": torch.ones_like(ours["input_ids"]), "labels": ours["labels"]}
    f = [x for x in sftdoctor.inspect_batch(naive, tok).findings if x.id == "packing-cross-contamination"]
    assert f and f[0].evidence["documents_per_row"][0]["documents"] == 4


def test_packed_positions_per_epoch_equal_real_tokens(tmp_path):
    """Through the Trainer's own dataloader (length-grouped sampler, packed collator)."""
    from sftdoctor.report import Report
    from sftdoctor.train.pipeline import build_pipeline
    from sftdoctor.train.steplog import flops_per_token, step_logger_class
    from sftdoctor.train.trainer import make_trainer

    recipe = Recipe(train_examples=96, batch_size=8, epochs=1, eval_limit=4, packing=True, tiny_hidden=32, tiny_layers=2,
                    output_dir=str(tmp_path))
    pipe = build_pipeline(recipe)
    logger = step_logger_class()(tmp_path / "steps.jsonl", Report(command="train"), None, flops_per_token(pipe.model), None, False)
    trainer = make_trainer(pipe, tmp_path, on_step=logger)
    positions = sum(b["input_ids"].numel() for b in trainer.get_train_dataloader())
    real = sum(len(ex["input_ids"]) for ex in pipe.train_examples)
    assert positions == real
    assert trainer.lean is not None and pipe.model.config.use_cache is False


def test_train_with_packing_and_lean_loss_reports_what_it_turned_off(tmp_path):
    from sftdoctor.cli import main as cli

    out = tmp_path / "run"
    code = cli(["train", "--output-dir", str(out), "--threads", "1", "--no-progress", "--quiet", "--packing",
                "--train-examples", "64", "--batch-size", "8", "--epochs", "1", "--eval-limit", "4", "--max-new-tokens", "8"])
    assert code in (0, 1)
    report = sftdoctor.report.Report.load(out / "report.json")
    t = report.metrics["train"]
    assert t["packing"] is True and t["lean_loss"]["mode"] == "always" and t["lean_loss"]["lean_steps"] == 8
    assert {"logits-nonfinite", "prediction-collapse", "grad-from-ignored-tokens"} <= set(t["lean_loss"]["checks_off_during_training"])
    assert report.run["status"] == "completed"
    # the logit checks still ran: at preflight, on full logits
    ran = {c.id for c in report.checks if c.status != "skipped"}
    assert {"logits-nonfinite", "prediction-collapse"} <= ran

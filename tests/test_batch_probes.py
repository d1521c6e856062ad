"""Batch-level probes: for each, a broken batch that must produce its id and a healthy one that
must not; the incident's batch; the `inspect-batch --batch` command line end to end."""
from __future__ import annotations

import json

import pytest
import torch

import sftdoctor
from sftdoctor.cli import main
from sftdoctor.context import ModelInfo
from sftdoctor.probes import BATCH

import batch_fixtures as bf
from conftest import FAMILIES, TOKENIZERS, completion_batch, tokenizer


def ids_of(report, severity=None):
    return {f.id for f in report.findings if severity is None or f.severity == severity}


def finding(report, fid):
    found = [f for f in report.findings if f.id == fid]
    assert found, f"{fid} not found; got {sorted(ids_of(report))}"
    return found[0]


def inspect(tok, batch, model=None, **hints):
    return sftdoctor.inspect_batch(batch, tok, model, hints=hints)


# ---- the healthy batch: nothing to report, for every tokenizer ---------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_correct_completion_batch_passes(family):
    tok, batch = bf.healthy(family)
    report = inspect(tok, batch, max_length=4096)
    assert report.verdict == "pass", [(f.id, f.message) for f in report.findings]
    ran = {c.id for c in report.checks if c.status == "pass"}
    # everything that can run on this batch ran and passed (position ids and examples absent)
    assert ran >= {p.id for p in BATCH} - {"position-ids-inconsistent", "template-mismatch"}


@pytest.mark.parametrize("family", ["qwen2.5", "llama3.2", "phi3"])
def test_correct_chat_batch_passes_with_template_check(family):
    tok = bf.padded(family)
    rows = bf.rows()
    report = inspect(tok, bf.chat_batch(tok, rows), examples=bf.chat_examples(rows))
    assert report.verdict == "pass", [(f.id, f.message) for f in report.findings]
    assert any(c.id == "template-mismatch" and c.status == "pass" for c in report.checks)


# ---- the incident --------------------------------------------------------------------------------


def test_incident_batch_named_pad_labels_and_hidden_prompt():
    tok, batch = bf.incident()
    report = inspect(tok, batch)
    assert report.verdict == "fail"
    pad = finding(report, "labels-pad-not-ignored")
    assert pad.evidence["label_values"][0]["id"] == 0 and pad.evidence["label_values"][0]["text"] == "!"
    hidden = finding(report, "attention-mask-hides-tokens")
    assert hidden.severity == "fail" and hidden.evidence["equals_loss_mask"] is True
    # the hidden prompt is counted as hidden text, not as padding
    prompt_tokens = int(((batch["labels"] == -100) & (batch["input_ids"] != tok.pad_token_id)).sum())
    assert hidden.evidence["hidden_real_tokens"] == prompt_tokens
    assert "attention-rows-empty" in ids_of(report)


def test_incident_without_pad_id_prompt_not_mistaken_for_padding():
    tok, batch = bf.incident_without_pad_id()  # GPT-2 as shipped: no pad id to find padding by
    report = inspect(tok, batch)
    hidden = finding(report, "attention-mask-hides-tokens")
    assert hidden.evidence["equals_loss_mask"] is True
    assert hidden.evidence["hidden_real_tokens"] > 100
    assert "pad-token-missing" in ids_of(report)


def test_inverted_attention_mask():
    tok, batch = bf.healthy("qwen2.5")
    padded = batch["attention_mask"] == 0
    batch["attention_mask"] = 1 - batch["attention_mask"]
    batch["labels"][padded] = -100
    hidden = finding(inspect(tok, batch), "attention-mask-hides-tokens")
    assert hidden.evidence["inverted"] is True


# ---- one broken and one healthy case per probe -----------------------------------------------------


def test_labels_pad_not_ignored():
    tok, batch = bf.healthy("gpt2")
    batch["labels"][batch["attention_mask"] == 0] = tok.pad_token_id
    f = finding(inspect(tok, batch), "labels-pad-not-ignored")
    assert f.evidence["label_values"][0]["id"] == tok.pad_token_id
    assert "labels-pad-not-ignored" not in ids_of(inspect(*bf.healthy("gpt2")))


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_shifted_labels_are_misaligned_by_one(family):
    tok, batch = bf.pre_shifted(family)
    report = inspect(tok, batch)
    f = finding(report, "labels-misaligned")
    assert f.severity == "fail" and f.evidence["best_offset"] == 1 and f.evidence["match_rate"] > 0.95
    assert f.evidence["match_rate_offset_0"] < 0.2
    eos = finding(report, "labels-eos-missing")
    assert eos.evidence["labels_shifted"] is True


def test_labels_from_another_tokenizer_warn_misaligned():
    tok, batch = bf.healthy("gpt2")
    sup = batch["labels"] != -100
    batch["labels"][sup] = (batch["labels"][sup] * 7 + 3) % 50000  # ids unrelated to input_ids
    f = finding(inspect(tok, batch), "labels-misaligned")
    assert f.severity == "warn"


def test_misaligned_silent_on_short_rows():
    tok, batch = bf.healthy("gpt2")
    batch = {k: v[:, :3] for k, v in batch.items()}
    batch["labels"][:, 1:] = batch["input_ids"][:, :2]  # shifted, but too few positions to judge
    assert "labels-misaligned" not in ids_of(inspect(tok, batch))


def test_no_supervised_tokens_warn_for_a_row_fail_for_the_batch():
    tok, batch = bf.healthy("llama3.2")
    batch["labels"][2] = -100
    f = finding(inspect(tok, batch), "labels-no-supervised-tokens")
    assert f.severity == "warn" and f.evidence["rows"] == [2] and f.evidence["share_of_rows"] == 0.25
    batch["labels"][:] = -100
    f = finding(inspect(tok, batch), "labels-no-supervised-tokens")
    assert f.severity == "fail" and f.evidence["empty_rows"] == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_supervised_found_by_marker(family):
    tok, batch = bf.prompt_supervised(family)
    f = finding(inspect(tok, batch), "labels-prompt-supervised")
    assert f.severity == "warn" and f.evidence["method"] == "response marker" and f.evidence["marker"] == "Answer:"
    assert f.evidence["share_of_prompt"] == 1.0 and 0.2 < f.evidence["share_of_supervised"] < 0.8


@pytest.mark.parametrize("family", ["qwen2.5", "llama3.2", "phi3"])
def test_prompt_supervised_chat_rows_found_by_template_header(family):
    tok = bf.padded(family)
    f = finding(inspect(tok, bf.chat_batch(tok, bf.rows(), supervise_prompt=True)), "labels-prompt-supervised")
    assert "assistant" in f.evidence["marker"] and f.evidence["share_of_prompt"] == 1.0


def test_prompt_supervised_by_prompt_lengths_hint_and_on_purpose():
    tok, batch = bf.prompt_supervised("gpt2")
    prompt_lengths = [len(tok(bf.prompt_text(r["question"]))["input_ids"]) for r in bf.rows()]
    report = inspect(tok, batch, prompt_lengths=prompt_lengths)
    f = finding(report, "labels-prompt-supervised")
    assert f.evidence["method"] == "prompt_lengths hint"
    assert f.evidence["prompt_supervised_tokens"] == sum(n - 1 for n in prompt_lengths)  # first token carries no loss
    report = inspect(tok, batch, prompt_supervised_on_purpose=True)
    assert finding(report, "labels-prompt-supervised").severity == "info" and report.verdict == "pass"
    healthy_tok, healthy = bf.healthy("gpt2")
    assert "labels-prompt-supervised" not in ids_of(inspect(healthy_tok, healthy, prompt_lengths=prompt_lengths))


def test_labels_copy_without_marker_reported():
    tok = bf.padded("gpt2")
    texts = [r["answer"] for r in bf.rows()]  # no prompt marker anywhere
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = torch.where(enc["attention_mask"] == 1, enc["input_ids"], -100)
    f = finding(inspect(tok, {**enc, "labels": labels}), "labels-prompt-supervised")
    assert f.evidence["rows_fully_supervised"] == 4


def test_eos_missing_when_never_appended():
    tok = bf.padded("llama3.2")
    report = inspect(tok, completion_batch(tok, bf.rows(), eos=False))
    f = finding(report, "labels-eos-missing")
    assert f.evidence["rows_eos_absent"] == 4 and f.evidence["pad_is_eos_masked"] is False
    assert 128009 in [e["id"] for e in f.evidence["eos_looked_for"]]  # <|eot_id|>
    assert "truncation-answer-lost" not in ids_of(report)  # padded rows lack it too: not truncation


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_pad_equal_eos_masked_by_id(family):
    tok, batch = bf.masked_by_id(family)
    report = inspect(tok, batch)
    f = finding(report, "pad-is-eos-masked")
    assert f.severity == "fail" and f.evidence["share_masked"] == 1.0 and f.evidence["every_pad_id_masked"]
    assert f.evidence["pad"]["id"] == tok.eos_token_id
    eos = finding(report, "labels-eos-missing")
    assert eos.evidence["pad_is_eos_masked"] is True and "pad-is-eos-masked" in eos.message


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_pad_equal_eos_masked_by_position_is_fine(family):
    tok = bf.pad_is_eos_tokenizer(family)
    report = inspect(tok, completion_batch(tok, bf.rows()))
    assert not ids_of(report) & {"pad-is-eos-masked", "labels-eos-missing", "labels-pad-not-ignored"}


def test_pad_token_missing():
    batch = completion_batch(bf.pad_is_eos_tokenizer("gpt2"), bf.rows())  # padded with eos by the collator
    report = inspect(tokenizer("gpt2"), batch)  # the tokenizer as shipped: no pad token
    f = finding(report, "pad-token-missing")
    assert f.severity == "warn" and f.evidence["tokenizer_class"] == "GPT2Tokenizer"
    assert report.verdict == "warn" and ids_of(report) == {"pad-token-missing"}  # padding found by position
    assert "pad-token-missing" not in ids_of(inspect(*bf.healthy("llama2")))


def test_attention_rows_empty_on_masked_prefix_only():
    tok, batch = bf.healthy("mistral")
    batch["attention_mask"][1, :3] = 0
    f = finding(inspect(tok, batch), "attention-rows-empty")
    assert f.evidence["spans"] == [{"row": 1, "start": 0, "end": 3, "count": 3}]
    # left padding: padding queries see no key, real tokens do
    tok, left = bf.left_padded("mistral", position_ids="cumsum")
    report = inspect(tok, left)
    assert not ids_of(report) & {"attention-rows-empty", "attention-mask-hides-tokens"}


def test_truncation_answer_lost_with_max_length_hint():
    tok, batch = bf.truncated("qwen2.5", 120)
    report = inspect(tok, batch, max_length=120)
    f = finding(report, "truncation-answer-lost")
    cut = int((batch["attention_mask"].sum(1) == 120).sum())
    assert cut >= 2 and f.evidence["rows_answer_lost"] == cut and f.evidence["max_length"] == 120
    assert f.severity == "fail"
    assert "labels-eos-missing" not in ids_of(report)  # the truncated rows are this finding's, not eos-missing's


def test_truncation_keeping_eos_still_loses_answer_line():
    tok, batch = bf.truncated("gpt2", 120, keep_eos=True)
    f = finding(inspect(tok, batch, max_length=120), "truncation-answer-lost")
    assert f.evidence["rows_without_eos"] == 0 and f.evidence["rows_without_answer_marker"] >= 2


def test_truncation_found_from_batch_width_without_hint():
    tok = bf.padded("llama3.2")
    rows = bf.rows()
    lengths = sorted(len(tok(bf.prompt_text(r["question"]) + " " + r["answer"])["input_ids"]) for r in rows)
    limit = lengths[-2] + 1  # only the longest row is cut; the others fit and are padded
    batch = completion_batch(tok, rows, max_length=limit)
    f = finding(inspect(tok, batch), "truncation-answer-lost")
    assert f.evidence["rows_answer_lost"] == 1 and f.evidence["max_length"] is None and f.severity == "fail"
    assert "truncation-answer-lost" not in ids_of(inspect(*bf.healthy("llama3.2")))


def test_left_padding_without_positions():
    tok, batch = bf.left_padded("llama2")
    f = finding(inspect(tok, batch), "padding-side-left-train")
    assert f.evidence["pad_side"] == "left" and len(f.evidence["rows"]) == 3
    tok, batch = bf.left_padded("llama2", position_ids="cumsum")
    assert "padding-side-left-train" not in ids_of(inspect(tok, batch))


def test_position_ids_arange_on_left_padding_inconsistent():
    tok, batch = bf.left_padded("llama2", position_ids="arange")
    f = finding(inspect(tok, batch), "position-ids-inconsistent")
    first = f.evidence["first_mismatch"]
    n_pad = int((batch["attention_mask"][first["row"]] == 0).sum())
    assert first == {"row": first["row"], "position": n_pad, "expected": 0, "got": n_pad}


def test_position_ids_missing_document_reset():
    tok, batch = bf.packed("llama3.2", reset_positions=True, drop_reset=True)
    f = finding(inspect(tok, batch), "position-ids-inconsistent")
    assert f.evidence["missed_document_resets"] == 1 and f.evidence["first_mismatch"]["expected"] == 0
    tok, batch = bf.packed("llama3.2", reset_positions=True)
    assert not ids_of(inspect(tok, batch)) & {"position-ids-inconsistent", "packing-cross-contamination"}
    tok, batch = bf.healthy("qwen2.5")
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    assert "position-ids-inconsistent" not in ids_of(inspect(tok, batch))


@pytest.mark.parametrize("family", ["llama3.2", "qwen2.5", "gpt2"])
def test_packing_without_boundaries(family):
    tok, batch = bf.packed(family)
    f = finding(inspect(tok, batch), "packing-cross-contamination")
    assert f.evidence["documents_per_row"][0]["documents"] >= 2


def test_packing_isolated_by_varlen_keys_and_multi_turn_chat_is_one_document():
    tok, batch = bf.packed("llama3.2")
    batch["cu_seq_lens_q"] = torch.tensor([0, 10])
    assert "packing-cross-contamination" not in ids_of(inspect(tok, {k: v for k, v in batch.items()}))
    tok = bf.padded("qwen2.5")
    rows = bf.rows(2)
    msgs = [{"role": "user", "content": rows[0]["question"]}, {"role": "assistant", "content": rows[0]["answer"]},
            {"role": "user", "content": rows[1]["question"]}, {"role": "assistant", "content": rows[1]["answer"]}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False, return_tensors="pt")["input_ids"]
    report = inspect(tok, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    assert "packing-cross-contamination" not in ids_of(report)


def test_bos_duplicated_by_template_plus_special_tokens():
    tok = bf.padded("llama3.2")
    rows = bf.rows()
    report = inspect(tok, bf.chat_batch(tok, rows, add_special_tokens=True), examples=bf.chat_examples(rows))
    f = finding(report, "bos-duplicated")
    assert f.evidence["rows"] == [0, 1, 2, 3] and f.evidence["bos"]["id"] == 128000
    mismatch = finding(report, "template-mismatch")
    assert mismatch.evidence["first_difference"]["token_index"] == 1
    assert mismatch.evidence["first_difference"]["got"]["id"] == 128000
    assert "packing-cross-contamination" not in ids_of(report)  # a doubled BOS is not a second document


def test_token_id_out_of_range_pad_added_without_resize():
    tok, batch = bf.healthy("llama3.2")  # with_pad added <|pad|> = 128256 to a 128256-row model
    f = finding(inspect(tok, batch, ModelInfo(embedding_rows=128256)), "token-id-out-of-range")
    assert f.severity == "fail" and f.evidence["max_input_id"] == 128256 and f.evidence["pad"]["id"] == 128256
    assert "token-id-out-of-range" not in ids_of(inspect(tok, batch, ModelInfo(embedding_rows=128320)))


def test_token_id_out_of_range_negative_label_and_tokenizer_only():
    tok, batch = bf.healthy("gpt2")
    batch["labels"][batch["labels"] == -100] = -1
    f = finding(inspect(tok, batch), "token-id-out-of-range")
    assert f.severity == "fail" and f.evidence["negative_values"] > 0 and -1 in f.evidence["bad_values"]
    tok, batch = bf.healthy("gpt2")
    batch["input_ids"][0, 0] = len(tok) + 5
    f = finding(inspect(tok, batch), "token-id-out-of-range")
    assert f.severity == "warn" and f.evidence["limit_used"] == "tokenizer length"


def test_template_mismatch_hand_rolled_format():
    tok, batch = bf.healthy("qwen2.5")
    examples = [{"prompt": bf.prompt_text(r["question"]), "response": " " + r["answer"]} for r in bf.rows()]
    f = finding(inspect(tok, batch, examples=examples), "template-mismatch")
    assert f.evidence["first_difference"]["token_index"] == 0
    assert f.evidence["first_difference"]["expected"]["text"] == "<|im_start|>"


def test_template_check_without_chat_template_and_skipped_without_examples():
    tok, batch = bf.healthy("gpt2")
    examples = [{"prompt": bf.prompt_text(r["question"]), "response": " " + r["answer"]} for r in bf.rows()]
    report = inspect(tok, batch, examples=examples)
    assert "template-mismatch" not in ids_of(report)
    assert any(c.id == "template-mismatch" and c.status == "pass" for c in report.checks)
    report = inspect(tok, batch)
    assert any(c.id == "template-mismatch" and c.status == "skipped" and "examples" in c.reason for c in report.checks)


def test_every_finding_has_evidence_and_fix():
    cases = [bf.incident(), bf.pre_shifted(), bf.masked_by_id(), bf.left_padded(position_ids="arange"),
             bf.packed(), bf.prompt_supervised()]
    seen = set()
    for tok, batch in cases:
        for f in inspect(tok, batch).findings:
            seen.add(f.id)
            assert f.evidence and f.fix and f.message
            json.dumps(f.evidence)  # plain data
    assert len(seen) >= 10


# ---- the command line ------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    def save(batch, name="batch.pt"):
        p = tmp_path / name
        torch.save(dict(batch), p)
        return str(p)

    return save


def test_cli_inspect_batch_fail_and_pass(saved, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["inspect-batch", "--batch", saved(bf.incident()[1]), "--tokenizer", str(TOKENIZERS / "qwen2.5"),
                 "--json", str(out), "-q"])
    assert code == 1
    data = json.loads(out.read_text())
    assert data["schema"] == "sftdoctor.report/1" and data["verdict"] == "fail"
    assert {"labels-pad-not-ignored", "attention-mask-hides-tokens"} <= {f["id"] for f in data["findings"]}
    # Phi-3 as shipped (pad == eos), padding masked by position: correct, nothing to report
    batch = completion_batch(tokenizer("phi3"), bf.rows())
    code = main(["inspect-batch", "--batch", saved(batch, "ok.pt"), "--tokenizer", str(TOKENIZERS / "phi3"),
                 "--json", str(out), "-q"])
    assert code == 0 and json.loads(out.read_text())["verdict"] == "pass"


def test_cli_max_length_option_feeds_truncation_check(saved, tmp_path):
    out = tmp_path / "r.json"
    code = main(["inspect-batch", "--batch", saved(bf.truncated("qwen2.5", 120)[1]), "--tokenizer",
                 str(TOKENIZERS / "qwen2.5"), "--max-length", "120", "--json", str(out), "-q"])
    assert code == 1
    f = [f for f in json.loads(out.read_text())["findings"] if f["id"] == "truncation-answer-lost"][0]
    assert f["evidence"]["max_length"] == 120 and f["evidence"]["max_length_source"] == "hint"


def test_cli_model_config_only_enables_range_check(saved, tmp_path):
    from transformers import LlamaConfig

    model_dir = tmp_path / "model"
    LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4).save_pretrained(model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json"]
    batch = completion_batch(tokenizer("phi3"), bf.rows())  # pad/eos <|endoftext|> = 32000: past 32000 rows
    out = tmp_path / "r.json"
    code = main(["inspect-batch", "--batch", saved(batch), "--tokenizer", str(TOKENIZERS / "phi3"),
                 "--model", str(model_dir), "--json", str(out), "-q"])
    assert code == 1
    f = [f for f in json.loads(out.read_text())["findings"] if f["id"] == "token-id-out-of-range"][0]
    assert f["evidence"]["embedding_rows"] == 32000 and f["evidence"]["max_input_id"] == 32000


def test_cli_ignore_flag_and_pyproject(saved, tmp_path, monkeypatch):
    path = saved(bf.incident()[1])
    qwen = str(TOKENIZERS / "qwen2.5")
    out = tmp_path / "r.json"
    args = ["inspect-batch", "--batch", path, "--tokenizer", qwen, "--json", str(out), "-q"]
    assert main(args + ["--ignore", "labels-pad-not-ignored"]) == 1  # attention-mask-hides-tokens still fails
    data = json.loads(out.read_text())
    assert "labels-pad-not-ignored" not in {f["id"] for f in data["findings"]}
    assert {"id": "labels-pad-not-ignored", "status": "skipped", "level": "batch",
            "reason": "ignored by configuration"} in data["checks"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.sftdoctor]\nignore = ["labels-pad-not-ignored", "attention-mask-hides-tokens"]\n')
    assert main(args) == 0
    assert json.loads(out.read_text())["verdict"] == "warn"  # attention-rows-empty remains


def test_cli_probes_lists_every_batch_id(capsys):
    assert main(["probes", "--level", "batch"]) == 0
    out = capsys.readouterr().out
    for p in BATCH:
        assert p.id in out
    assert len(BATCH) == 16


@pytest.mark.parametrize("case", ["missing_file", "no_input_ids", "no_tokenizer_dir", "hub_offline", "model_no_config"])
def test_cli_bad_input_exit_2_one_line(case, saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    good = saved(bf.healthy("gpt2")[1])
    qwen = str(TOKENIZERS / "qwen2.5")
    argv = {
        "missing_file": ["--batch", str(tmp_path / "nope.pt"), "--tokenizer", qwen],
        "no_input_ids": ["--batch", saved({"labels": torch.zeros(1, 3, dtype=torch.long)}, "bad.pt"), "--tokenizer", qwen],
        "no_tokenizer_dir": ["--batch", good, "--tokenizer", str(tmp_path / "no_such_tokenizer")],
        "hub_offline": ["--batch", good, "--tokenizer", "someone/not-cached-anywhere"],
        "model_no_config": ["--batch", good, "--tokenizer", qwen, "--model", str(tmp_path)],
    }[case]
    capsys.readouterr()
    assert main(["inspect-batch", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sftdoctor: error: "), err
    assert "Traceback" not in err[0]

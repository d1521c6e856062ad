"""The engine, the report and its JSON round trip, token classes."""
from __future__ import annotations

import json

import pytest
import torch

import sftdoctor
from sftdoctor.context import Batch, TokenizerInfo
from sftdoctor.findings import CheckResult, Finding
from sftdoctor.report import SCHEMA, Report
from sftdoctor.tokens import TokenClass, classify

from conftest import completion_batch, gsm8k_rows, tokenizer, with_pad


def test_report_json_round_trip(tmp_path):
    r = Report(command="inspect-batch")
    r.add([Finding("labels-pad-not-ignored", "fail", "batch", "m", {"n": 3, "x": float("nan")}, "fix", step=0)])
    r.record_checks([CheckResult("labels-pad-not-ignored", "fail"), CheckResult("bos-duplicated", "pass")])
    p = tmp_path / "r.json"
    r.save(p)
    d = json.loads(p.read_text())
    assert d["schema"] == SCHEMA and d["verdict"] == "fail"
    assert d["findings"][0]["evidence"]["x"] == "nan"
    back = Report.load(p)
    assert back.verdict == "fail" and back.findings[0].id == "labels-pad-not-ignored"
    assert [c.status for c in back.checks] == ["fail", "pass"]


def test_verdict_rules():
    r = Report(command="x")
    assert r.verdict == "inconclusive"  # nothing checked is never a pass
    r.record_checks([CheckResult("bos-duplicated", "pass")])
    assert r.verdict == "pass"
    r.add([Finding("bos-duplicated", "warn", "batch", "m")])
    assert r.verdict == "warn"
    r.add([Finding("labels-pad-not-ignored", "fail", "batch", "m")])
    assert r.verdict == "fail"
    with pytest.raises(sftdoctor.FailuresFound, match="labels-pad-not-ignored"):
        r.raise_for_failures()


def test_checks_keep_worst_status():
    r = Report(command="x")
    r.record_checks([CheckResult("a", "skipped", "needs step")])
    r.record_checks([CheckResult("a", "pass")])
    r.record_checks([CheckResult("a", "warn")])
    r.record_checks([CheckResult("a", "pass")])
    assert r.checks[0].status == "warn" and r.checks[0].reason is None


def test_pad_equals_eos_real_eos_found_by_position():
    tok = TokenizerInfo(pad_id=7, eos_ids=frozenset({7}))
    ids = torch.tensor([[1, 2, 3, 7, 7, 7], [1, 2, 3, 4, 5, 7]])
    am = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    cls = classify(Batch(input_ids=ids, attention_mask=am), tok)
    assert cls[0].tolist()[3:] == [TokenClass.EOS, TokenClass.PAD, TokenClass.PAD]
    assert cls[1, 5] == TokenClass.EOS
    # without an attention mask the position rule still holds
    cls = classify(Batch(input_ids=ids), tok)
    assert cls[0].tolist()[3:] == [TokenClass.EOS, TokenClass.PAD, TokenClass.PAD]


def test_loss_mask_becomes_labels():
    b = Batch.from_mapping({"input_ids": [[5, 6, 7]], "loss_mask": [[0, 1, 1]]})
    assert b.labels.tolist() == [[-100, 6, 7]] and b.labels_source == "loss_mask"


def test_batch_without_input_ids_is_user_error():
    with pytest.raises(sftdoctor.UserError, match="input_ids"):
        Batch.from_mapping({"labels": [[1]]})


def test_healthy_batch_has_classes_and_samples():
    tok = with_pad("qwen2.5")
    report = sftdoctor.inspect_batch(completion_batch(tok, gsm8k_rows()[:4]), tok)
    tc = report.metrics["token_classes"]
    assert tc["response"]["supervised"] > 0 and tc["prompt"]["supervised"] == 0
    assert tc["pad"]["supervised"] == 0 and tc["eos"]["supervised"] == 4
    assert report.samples and len(report.samples[0]["ids"]) == len(report.samples[0]["classes"])


def test_outputs_never_replace_a_file_that_is_not_a_report(tmp_path, monkeypatch, capsys):
    """--json/--html may overwrite an earlier report, but a typo must not destroy the user's file."""
    import torch

    from sftdoctor.cli import main

    monkeypatch.chdir(tmp_path)
    tok_dir = str(__import__("conftest").TOKENIZERS / "gpt2")
    torch.save({"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1, 2, 3]])}, "b.pt")
    script = tmp_path / "train.py"
    script.write_text("print('my training script')\n")
    code = main(["inspect-batch", "--batch", "b.pt", "--tokenizer", tok_dir, "--json", str(script)])
    assert code == 2 and script.read_text() == "print('my training script')\n"
    assert "not an sftdoctor report" in capsys.readouterr().err
    # an earlier report is replaced, JSON and HTML alike
    for flag, name in (("--json", "r.json"), ("--html", "r.html")):
        assert main(["inspect-batch", "--batch", "b.pt", "--tokenizer", tok_dir, flag, name, "-q"]) in (0, 1)
        assert main(["inspect-batch", "--batch", "b.pt", "--tokenizer", tok_dir, flag, name, "-q"]) in (0, 1)


def test_inconclusive_when_nothing_ran_or_sftdoctor_failed(tmp_path):
    from sftdoctor.verdict import exit_code

    r = Report(command="inspect-batch")
    r.record_checks([CheckResult("bos-duplicated", "skipped", "needs step")])
    assert r.verdict == "inconclusive" and exit_code(r.verdict) == 3
    r.record_checks([CheckResult("labels-pad-not-ignored", "pass")])
    assert r.verdict == "pass" and exit_code(r.verdict) == 0
    # an exception of ours never yields a PASS (nor a WARN: what it hid is unknown) ...
    r.run["internal_errors"] = ["RuntimeError: hook failed"]
    assert r.verdict == "inconclusive" and "internal sftdoctor error" in r.verdict_reason
    r.add([Finding("bos-duplicated", "warn", "batch", "m")])
    assert r.verdict == "inconclusive"
    # ... a probe that raised counts the same way
    r2 = Report(command="x")
    r2.record_checks([CheckResult("a", "pass"), CheckResult("b", "skipped", "probe error: ValueError: x")])
    assert r2.verdict == "inconclusive"
    # ... but a named defect still fails
    r.add([Finding("labels-pad-not-ignored", "fail", "batch", "m")])
    assert r.verdict == "fail" and exit_code(r.verdict) == 1
    # the JSON says so, and reloading keeps it
    p = tmp_path / "r.json"
    r2.save(p)
    d = json.loads(p.read_text())
    assert d["verdict"] == "inconclusive" and "probe error" in d["verdict_reason"]
    assert Report.load(p).verdict == "inconclusive"


def test_inconclusive_renders_in_console_and_html_never_green():
    from rich.console import Console

    from sftdoctor.reports.console import render
    from sftdoctor.reports.html import render_html

    r = Report(command="watch", run={"note": "no training forward of a causal LM was seen"})
    con = Console(record=True, width=120)
    render(r, con)
    text = con.export_text()
    assert "INCONCLUSIVE" in text and "PASS" not in text and "no check ran" in text
    page = render_html(r)
    assert 'class="banner v-inconclusive"' in page and 'class="banner v-pass"' not in page and "not enough was checked" in page


def test_a_crash_on_any_rank_is_never_a_pass():
    r = Report(command="watch")
    r.record_checks([CheckResult("labels-pad-not-ignored", "pass")])
    r.run = {"status": "completed", "ranks": [{"rank": 0, "status": "completed"}, {"rank": 1, "status": "completed"}]}
    assert r.verdict == "pass"
    r.run["ranks"][1]["status"] = "crashed"  # rank 1's script raised; rank 0 completed
    assert r.verdict == "inconclusive" and "rank 1" in r.verdict_reason
    r.run = {"status": "crashed", "failed_rank": 1}
    assert r.verdict == "inconclusive" and "crashed on rank 1" in r.verdict_reason
    r.run = {"status": "incomplete"}  # a rank never answered
    assert r.verdict == "inconclusive"
    r.add([Finding("labels-pad-not-ignored", "fail", "batch", "m")])
    assert r.verdict == "fail"  # a named defect still fails

"""Flags agree across verbs, and each verb says where its report went (no training here: fast)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from sftdoctor.cli import build_parser, main as cli
from sftdoctor.cli.common import DEFAULT_REPORT, is_report_file, use_default_report
from sftdoctor.dtypes import long_name, short_name
from sftdoctor.findings import CheckResult, Finding
from sftdoctor.report import Report
from sftdoctor.train.recipe import build_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("typed,short,long", [
    ("fp16", "fp16", "float16"), ("float16", "fp16", "float16"), ("half", "fp16", "float16"),
    ("bf16", "bf16", "bfloat16"), ("bfloat16", "bf16", "bfloat16"), ("BF16", "bf16", "bfloat16"),
    ("fp32", "fp32", "float32"), ("float32", "fp32", "float32"), ("torch.float16", "fp16", "float16"),
])
def test_both_dtype_spellings_are_accepted_by_train_and_diagnose(typed, short, long):
    parser = build_parser()
    assert build_recipe(parser.parse_args(["train", "--dtype", typed])).dtype == short
    assert parser.parse_args(["diagnose", "m", "--dtype", typed]).dtype == long
    assert short_name(typed) == short and long_name(typed) == long


def test_an_unknown_dtype_is_a_usage_error_listing_the_choices(capsys):
    for argv in (["train", "--dtype", "fp8"], ["diagnose", "m", "--dtype", "fp8"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2
        assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_a_recipe_file_may_spell_dtype_either_way(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('dtype = "bfloat16"\nmax_steps = 7\n')
    r = build_recipe(config_path=str(f))
    assert r.dtype == "bf16" and r.max_steps == 7
    shipped = build_recipe(config_path=str(REPO / "examples" / "recipe.toml"))
    assert shipped.model == "Qwen/Qwen2.5-0.5B" and shipped.eval_limit == 0


def test_max_steps_must_not_be_negative(capsys):
    assert cli(["train", "--max-steps", "-1"]) == 2
    assert "max_steps must be >= 0" in capsys.readouterr().err


def test_train_help_shows_examples_and_the_real_gpu_run(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "--max-steps" in out
    assert "--model Qwen/Qwen2.5-0.5B --data openai/gsm8k --eval-limit 0" in out
    assert "cannot solve its problems" in out


def test_every_report_verb_takes_json_html_ignore_and_probes_takes_json():
    parser = build_parser()
    flags = ["--json", "j", "--html", "h", "--ignore", "loss-divergence", "--quiet"]
    for verb, rest in (("inspect-batch", []), ("watch", ["s.py"]), ("diagnose", ["m"]), ("train", []), ("report", ["r.json"])):
        a = parser.parse_args([verb, *flags, *rest])  # before the script: what follows it is the script's
        assert (a.json, a.html, a.ignore, a.quiet) == ("j", "h", ["loss-divergence"], True), verb
    assert parser.parse_args(["probes", "--json", "p.json"]).json == "p.json"


def test_probes_json_lists_every_id(tmp_path, capsys):
    from sftdoctor.probes import ALL

    out = tmp_path / "probes.json"
    assert cli(["probes", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == "sftdoctor.probes/1"
    assert {p["id"] for p in data["probes"]} == {i for p in ALL for i in p.ids}
    assert f"list: {out}" in capsys.readouterr().out


def _saved_report(path: Path) -> None:
    r = Report(command="watch")
    r.add([Finding(id="labels-pad-not-ignored", severity="fail", level="batch", message="pad supervised"),
           Finding(id="loss-divergence", severity="warn", level="run", message="up")])
    r.record_checks([CheckResult("labels-pad-not-ignored", "fail", None, "batch"), CheckResult("loss-divergence", "warn", None, "run")])
    r.save(path)


def test_report_ignore_drops_the_finding_and_marks_its_check_skipped(tmp_path, capsys):
    src, dst = tmp_path / "run.json", tmp_path / "filtered.json"
    _saved_report(src)
    assert cli(["report", str(src), "--quiet"]) == 1
    assert cli(["report", str(src), "--quiet", "--ignore", "labels-pad-not-ignored", "--json", str(dst)]) == 0
    out = Report.load(dst)
    assert out.ids() == {"loss-divergence"} and out.verdict == "warn"
    assert {c.id: c.status for c in out.checks}["labels-pad-not-ignored"] == "skipped"
    assert Report.load(src).ids() == {"labels-pad-not-ignored", "loss-divergence"}  # the input is untouched
    assert f"report: {dst}" in capsys.readouterr().out


def test_watch_default_report_path_replaces_a_report_but_never_another_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(json=None)
    use_default_report(args)
    assert args.json == str(tmp_path / DEFAULT_REPORT) and args.json_shown == DEFAULT_REPORT

    _saved_report(tmp_path / DEFAULT_REPORT)  # an earlier run's report: replaced
    args = argparse.Namespace(json=None)
    use_default_report(args)
    assert args.json == str(tmp_path / DEFAULT_REPORT)

    # someone else's file of that name, even one mentioning sftdoctor: recognised by schema, left alone
    foreign = '{"note": "my sftdoctor notes", "schema": "other/1"}'
    (tmp_path / DEFAULT_REPORT).write_text(foreign)
    assert not is_report_file(str(tmp_path / DEFAULT_REPORT))
    args = argparse.Namespace(json=None)
    use_default_report(args)
    assert args.json is None
    assert "is not an sftdoctor report; leaving it alone" in capsys.readouterr().err
    assert (tmp_path / DEFAULT_REPORT).read_text() == foreign

    args = argparse.Namespace(json="mine.json")  # --json given: the default is not used
    use_default_report(args)
    assert args.json == "mine.json"


def test_watch_writes_the_default_report_and_says_where(tmp_path, monkeypatch, capsys):
    """A script that trains nothing still ends with a report at the known path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "noop.py").write_text("print('no training here')\n")
    code = cli(["watch", "--quiet", "--plain", "noop.py"])
    out = capsys.readouterr().out
    assert code == 3  # nothing was trained, so nothing checked: inconclusive
    assert Report.load(tmp_path / DEFAULT_REPORT).command == "watch"
    assert f"report: {DEFAULT_REPORT}" in out


def test_train_what_next_names_the_model_the_diagnose_command_and_the_metrics(tmp_path, monkeypatch):
    from sftdoctor.cli.train import what_next
    from sftdoctor.train.recipe import Recipe

    monkeypatch.chdir(tmp_path)
    r = Report(command="train")
    r.run = {"status": "completed"}
    r.metrics["eval"] = {"examples": 20, "accuracy": 0.0, "format_rate": 0.9, "stop_rate": 1.0}
    args = argparse.Namespace(argv=["train", "--data", "gsm8k"])
    text = "\n".join(what_next(r, tmp_path / "runs" / "x", args, Recipe(data="gsm8k")))
    assert "runs/x/final" in text and "sftdoctor diagnose runs/x/final" in text
    assert "exact match 0.0%" in text and "format      90.0%" in text
    assert "cannot solve GSM8K" in text  # the tiny model on real data: said plainly

    r.run = {"status": "refused"}
    text = "\n".join(what_next(r, tmp_path / "o", args, Recipe()))
    assert "sftdoctor train --data gsm8k --fix" in text

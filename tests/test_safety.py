"""Never harm the user (issue 11): nothing of theirs is overwritten or deleted, no foreign code
runs, nothing hangs, and bad input is one line with exit code 2, never a traceback.

Each test is one broken input from the issue and the expected outcome: the kept file, or the
one-line error (stderr holds exactly one line, `sftdoctor: error: ...`, and no traceback).
"""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TOKENIZERS

from sftdoctor.cli import main
from sftdoctor.errors import UserError
from sftdoctor.findings import CheckResult, Finding
from sftdoctor.report import Report

GPT2 = str(TOKENIZERS / "gpt2")


def one_line_error(capsys, code: int, *needles: str) -> str:
    """The command failed with exit 2 and one line on stderr holding every needle."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("usage:")]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("sftdoctor: error: ") or lines[0].startswith("sftdoctor:"), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def small_report() -> Report:
    r = Report(command="inspect-batch")
    r.add([Finding("labels-pad-not-ignored", "fail", "batch", "pad tokens are supervised", {"rows": [0, 1]}, fix="use -100")])
    r.record_checks([CheckResult("labels-pad-not-ignored", "fail", None, "batch")])
    r.samples = [{"row": 0, "ids": [1, 2, 3], "texts": ["a", "b", "c"], "classes": [0, 1, 3], "labels": [-100, 2, 0], "length": 3}]
    return r


@pytest.fixture
def run_json(tmp_path) -> Path:
    p = tmp_path / "run.json"
    small_report().save(p)
    return p


# ---- data loss: outputs are recognised by content -------------------------------------------------

@pytest.mark.parametrize("name, text", [
    ("train.py", "import sftdoctor\nsftdoctor.attach(model)\n"),
    ("pyproject.toml", "[tool.sftdoctor]\nignore = ['bos-duplicated']\n"),
    ("notes.json", '{"tool": "sftdoctor", "schema": "not-ours"}\n'),
    ("page.html", "<!DOCTYPE html><p>about sftdoctor.report/1 and sftdoctor</p>\n"),
])
def test_a_file_that_mentions_sftdoctor_is_not_replaced(tmp_path, run_json, capsys, name, text):
    victim = tmp_path / name
    victim.write_text(text)
    code = main(["report", str(run_json), "--html", str(victim)])
    one_line_error(capsys, code, "is not an sftdoctor report")
    assert victim.read_text() == text
    code = main(["inspect-batch", "--json", str(victim)])  # checked before any work, whatever the verb
    one_line_error(capsys, code, "is not an sftdoctor report")
    assert victim.read_text() == text


def test_an_earlier_report_is_replaced_json_and_html(tmp_path, run_json, capsys):
    html = tmp_path / "old.html"
    assert main(["report", str(run_json), "--html", str(html), "-q"]) == 1
    assert '<meta name="sftdoctor-report" content="sftdoctor.report/1">' in html.read_text()
    html.write_text(html.read_text().replace("</body>", "<!-- edited --></body>"))
    assert main(["report", str(run_json), "--html", str(html), "-q"]) == 1  # an earlier report: replaced
    assert "<!-- edited -->" not in html.read_text()
    copy = tmp_path / "copy.json"
    small_report().save(copy)
    from sftdoctor.paths import is_report_file

    assert is_report_file(copy) and is_report_file(html) and not is_report_file(tmp_path)


def test_an_output_that_is_an_input_is_refused(run_json, capsys):
    before = run_json.read_bytes()
    code = main(["report", str(run_json), "--html", str(run_json)])
    one_line_error(capsys, code, "is also this command's input")
    assert run_json.read_bytes() == before


def test_json_and_html_at_one_path_are_refused(tmp_path, capsys):
    code = main(["inspect-batch", "--json", str(tmp_path / "r.out"), "--html", str(tmp_path / "r.out")])
    one_line_error(capsys, code, "--json and --html both name")


def test_watch_checks_the_output_folder_before_running_the_script(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "train.py"
    script.write_text("open('ran', 'w').write('yes')\n")
    code = main(["watch", "--json", str(tmp_path / "missing" / "r.json"), str(script)])
    one_line_error(capsys, code, "folder", "does not exist")
    assert not (tmp_path / "ran").exists()


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """Root passes every permission check, so writability is tried; here the try fails as on a read-only mount."""
    import tempfile

    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    script = tmp_path / "train.py"
    script.write_text("open('ran', 'w').write('yes')\n")
    code = main(["watch", "--json", str(tmp_path / "r.json"), str(script)])
    one_line_error(capsys, code, "not writable", "Read-only file system")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_a_late_write_failure_prints_the_report_and_keeps_a_fallback_copy(tmp_path, run_json, capsys, monkeypatch, err):
    import tempfile

    from sftdoctor.cli import common

    fallback = tmp_path / "fallback"
    fallback.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(fallback))

    def full(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(common, "write_atomic", full)  # every report file the CLI writes goes through it
    code = main(["report", str(run_json), "--html", str(tmp_path / "out.html")])
    out, errtext = capsys.readouterr()
    assert code == 2 and "Traceback" not in errtext
    assert "labels-pad-not-ignored" in out  # the console report was printed
    line = errtext.strip().splitlines()[-1]
    assert os.strerror(err) in line and str(fallback) in line
    copies = list(fallback.glob("sftdoctor-report-*.json"))
    assert len(copies) == 1 and Report.load(copies[0]).ids() == {"labels-pad-not-ignored"}


def test_train_report_write_failure_is_one_line_with_a_fallback(tmp_path, monkeypatch):
    import tempfile

    from sftdoctor.probes import REGISTRY
    from sftdoctor.session import Session
    from sftdoctor.train import trainer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def full(self, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Report, "save", full)
    report = small_report()
    trainer._write_report(Session.reopen(report, REGISTRY), tmp_path / "run")
    assert "No space left on device" in report.run["report_write_error"]
    assert Path(report.run["report_file"]).parent == tmp_path and Path(report.run["report_file"]).is_file()


# ---- data loss: train deletes only what it wrote -------------------------------------------------

def user_folder(tmp_path: Path) -> Path:
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "thesis.tex").write_text("years of work")
    (out / "final").mkdir()
    (out / "report.json").write_text('{"my": "data"}')
    return out


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("flags", [["--overwrite"], ["--overwrite", "--dry-run"], ["--resume"], []])
def test_train_never_touches_a_folder_it_did_not_write(tmp_path, capsys, flags):
    out = user_folder(tmp_path)
    before = snapshot(out)
    code = main(["train", "--output-dir", str(out), "--no-progress", "--quiet", *flags])
    one_line_error(capsys, code, str(out))
    assert snapshot(out) == before


def test_overwrite_deletes_only_the_entries_train_writes(tmp_path):
    from sftdoctor.train import rundir

    out = tmp_path / "run"
    rundir.write_marker(out)
    for name in ("checkpoints/checkpoint-5", "final"):
        (out / name).mkdir(parents=True)
    (out / "steps.jsonl").write_text('{"step": 1}\n')
    (out / "report.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    said = []
    # --dry-run: nothing deleted, and its report goes beside the run's, not over it
    assert rundir.prepare(out, resume=False, overwrite=True, dry_run=True, main=True, say=said.append) == rundir.DRY_RUN_REPORT
    assert (out / "final").is_dir() and (out / "steps.jsonl").exists() and "nothing deleted" in said[0]
    with pytest.raises(UserError, match="--overwrite to replace it"):
        rundir.prepare(out, resume=False, overwrite=False, dry_run=False, main=True, say=said.append)
    assert rundir.prepare(out, resume=False, overwrite=True, dry_run=False, main=True, say=said.append) == rundir.REPORT_FILE
    assert sorted(p.name for p in out.iterdir()) == [rundir.MARKER, "notes.txt"]
    # a marker with other content is not ours
    (out / rundir.MARKER).write_text('{"schema": "something/1"}')
    with pytest.raises(UserError, match="not a run of sftdoctor train"):
        rundir.prepare(out, resume=True, overwrite=False, dry_run=False, main=True, say=said.append)


# ---- crash consistency: resume --------------------------------------------------------------------

def fake_checkpoint(root: Path, step: int, *, state=True, torn: str | None = None) -> Path:
    from safetensors.torch import save_file

    ck = root / "checkpoints" / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    save_file({"w": torch.ones(4, 4)}, str(ck / "model.safetensors"))
    torch.save({"state": {}}, ck / "optimizer.pt")
    torch.save({"last_epoch": step}, ck / "scheduler.pt")
    if state:
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if torn:
        data = (ck / torn).read_bytes()
        (ck / torn).write_bytes(data[: len(data) // 2])
    return ck


def test_resume_takes_the_newest_complete_checkpoint_and_says_which_were_skipped(tmp_path):
    from sftdoctor.train.rundir import newest_complete_checkpoint

    fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 15, torn="optimizer.pt")
    fake_checkpoint(tmp_path, 20, torn="model.safetensors")
    fake_checkpoint(tmp_path, 25, state=False)
    found, skipped = newest_complete_checkpoint(tmp_path)
    assert found.name == "checkpoint-10"
    assert [name for name, _ in skipped] == ["checkpoint-25", "checkpoint-20", "checkpoint-15"]
    assert "trainer_state.json" in skipped[0][1] and "truncated" in skipped[1][1] and "optimizer.pt" in skipped[2][1]


def test_a_torn_last_line_of_steps_jsonl_is_dropped(tmp_path):
    from sftdoctor.train.rundir import read_steps, trim_steps_log

    (tmp_path / "steps.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 6)) + '{"step": 6, "lo')
    assert [r["step"] for r in read_steps(tmp_path / "steps.jsonl")[0]] == [1, 2, 3, 4, 5]
    assert trim_steps_log(tmp_path, 3) == (2, 1)
    assert [r["step"] for r in read_steps(tmp_path / "steps.jsonl")[0]] == [1, 2, 3]


TRAIN = [sys.executable, "-m", "sftdoctor", "train", "--threads", "1", "--no-progress", "--quiet", "--train-examples", "32",
         "--batch-size", "4", "--eval-limit", "4", "--max-new-tokens", "8", "--tiny-layers", "1", "--tiny-hidden", "32"]


@pytest.mark.slow
def test_resume_after_a_torn_checkpoint_and_a_torn_log_line(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([*TRAIN, "--output-dir", str(out), "--save-every", "2", "--epochs", "1"], capture_output=True, text=True, cwd=tmp_path)
    # exit 1 is allowed: an 8-step tiny model may end with a finding; only how the run ended matters here
    assert r.returncode in (0, 1) and Report.load(out / "report.json").run["status"] == "completed", r.stderr[-2000:]
    cks = sorted((out / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    (cks[-1] / "trainer_state.json").unlink()  # a kill during the save
    with open(out / "steps.jsonl", "a") as f:
        f.write('{"step": 99, "lo')  # a kill mid-line
    r = subprocess.run([*TRAIN, "--output-dir", str(out), "--save-every", "2", "--epochs", "1", "--resume"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"resume: skipped {cks[-1].name}: no trainer_state.json" in r.stderr
    assert f"resume: from {cks[-2].name}" in r.stderr and "1 torn line" in r.stderr
    assert Report.load(out / "report.json").run["status"] == "completed"


# ---- signals ------------------------------------------------------------------------------------------

def wait_for(path: Path, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_watch_writes_the_report_on_sigterm_and_sighup(tmp_path, sig):
    script = tmp_path / "train.py"
    script.write_text("import time\nopen('ready', 'w').close()\nwhile True:\n    time.sleep(0.05)\n")
    proc = subprocess.Popen([sys.executable, "-m", "sftdoctor", "watch", "--json", "r.json", "train.py"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(tmp_path / "ready")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    report = Report.load(tmp_path / "r.json")
    assert report.run["status"] == "interrupted" and report.run["exit_code"] == 128 + sig


@pytest.mark.slow
def test_train_writes_the_report_on_sigterm(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([*TRAIN, "--output-dir", str(out), "--epochs", "50"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out / "steps.jsonl")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    report = Report.load(out / "report.json")
    assert report.run["status"] == "interrupted" and "SIGTERM" in report.run["message"] and report.metrics["steps"]


# ---- foreign code ------------------------------------------------------------------------------------

def remote_code_folder(tmp_path: Path) -> Path:
    """A model folder whose config names its own Python (auto_map): loading it must not run it."""
    folder = tmp_path / "evil"
    folder.mkdir()
    sentinel = tmp_path / "PWNED"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    code = f"open({str(sentinel)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)
    return folder


@pytest.mark.parametrize("verb", ["inspect-batch", "train"])
def test_a_folders_own_code_never_runs_without_the_flag(tmp_path, verb):
    folder = remote_code_folder(tmp_path)
    torch.save({"input_ids": torch.tensor([[1, 2, 3]])}, tmp_path / "b.pt")
    args = (["inspect-batch", "--batch", "b.pt", "--tokenizer", GPT2, "--model", str(folder)] if verb == "inspect-batch"
            else ["train", "--model", str(folder), "--output-dir", "run", "--dry-run", "--no-progress"])
    # "y" on stdin: transformers' [y/N] question, if it were asked, would be answered yes
    r = subprocess.run([sys.executable, "-m", "sftdoctor", *args], input="y\n", capture_output=True, text=True, cwd=tmp_path,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "trust_remote_code" in r.stderr or "remote code" in r.stderr or "custom code" in r.stderr, r.stderr
    assert not (tmp_path / "PWNED").exists()


def test_loaders_pass_trust_remote_code_false_by_default(monkeypatch):
    from transformers import AutoConfig

    from sftdoctor import loading

    seen = []

    def fake(name, **kw):
        seen.append(kw.get("trust_remote_code"))
        raise OSError("stop here")

    monkeypatch.setattr(AutoConfig, "from_pretrained", fake)
    for allowed in (None, True):
        with pytest.raises(UserError):
            if allowed:
                with loading.remote_code(True):
                    loading.load_config(GPT2)
            else:
                loading.load_config(GPT2)
    assert seen == [False, True]


# ---- terminal escapes and bidi ----------------------------------------------------------------------

EVIL = "\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\x1b]0;owned\x07\r\x9b31m"


def test_terminal_safe_neutralises_c0_and_c1_controls():
    from sftdoctor.textsafe import terminal_safe

    out = terminal_safe("a\tb\n" + EVIL)
    assert out.startswith("a\tb\n") and "\\e]52" in out and "\\r" in out and "\\x9b" in out
    assert not any(ord(c) < 32 and c not in "\t\n" or 0x7f <= ord(c) <= 0x9f for c in out)


def test_console_report_live_view_and_error_lines_print_no_escape_sequences(capsys, monkeypatch):
    from rich.console import Console

    from sftdoctor.live import LiveView
    from sftdoctor.reports.console import render

    r = small_report()
    r.findings[0].message = "row text: " + EVIL
    r.findings[0].evidence = {"text" + EVIL: [EVIL]}
    r.samples[0]["texts"] = [EVIL, "b", "c"]
    r.run = {"status": "crashed", "error": {"message": EVIL}, "internal_errors": [EVIL]}
    buf = io.StringIO()
    render(r, Console(file=buf, width=200, color_system=None, force_terminal=False))
    live = io.StringIO()
    LiveView(stream=live, plain=True).finding(r.findings[0])
    for text in (buf.getvalue(), live.getvalue()):
        assert "\x1b" not in text and "\x07" not in text and "\r" not in text and "\x9b" not in text, repr(text)
        assert "\\e]52" in text
    import sftdoctor.cli.probes_cmd as probes_cmd

    def bad(args):  # a verb whose error quotes dataset text
        raise UserError("no question field in " + EVIL)

    monkeypatch.setattr(probes_cmd, "run", bad)
    err = one_line_error(capsys, main(["probes"]), "\\e]52")
    assert "\x1b" not in err


def test_html_isolates_bidi_overrides_and_carries_the_marker():
    from sftdoctor.reports.html import render_html

    r = small_report()
    r.findings[0].message = "total \u202egnp.exe\u202c is fine"
    page = render_html(r)
    assert '<meta name="sftdoctor-report" content="sftdoctor.report/1">' in page
    assert "body * { unicode-bidi: isolate; }" in page


@pytest.mark.browser
def test_bidi_override_stays_inside_its_element_in_chromium(tmp_path):
    import html_fixtures as fx

    if fx.chromium_path() is None:
        if os.environ.get("SFTDOCTOR_REQUIRE_BROWSER") == "1":
            pytest.fail("SFTDOCTOR_REQUIRE_BROWSER=1 but chromium is not installed")
        pytest.skip("chromium is not installed")
    from sftdoctor.reports.html import write_html

    r = small_report()
    r.samples[0]["texts"] = ["\u202egnp.exe", "b", "c"]
    write_html(r, tmp_path / "r.html")
    with fx.open_page(tmp_path / "r.html") as (page, events):
        styles = page.evaluate("""() => [...document.querySelectorAll('body *')]
            .filter(e => e.textContent.includes('\u202e') && e.children.length === 0)
            .map(e => getComputedStyle(e).unicodeBidi)""")
    assert styles and set(styles) == {"isolate"} and not events.csp_violations, styles


# ---- hangs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["fifo", "/dev/stdout"])
def test_a_fifo_or_device_as_output_never_blocks(tmp_path, run_json, target):
    path = tmp_path / "pipe"
    if target == "fifo":
        os.mkfifo(path)
    else:
        path = Path(target)
    r = subprocess.run([sys.executable, "-m", "sftdoctor", "report", str(run_json), "--html", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a regular file" in r.stderr and "--html -" in r.stderr, r.stderr


def test_a_fifo_as_report_input_never_blocks(tmp_path):
    os.mkfifo(tmp_path / "pipe.json")
    r = subprocess.run([sys.executable, "-m", "sftdoctor", "report", str(tmp_path / "pipe.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "FIFO" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_fifo_as_train_config_or_data_never_blocks(tmp_path):
    from sftdoctor.train.data import load_local

    os.mkfifo(tmp_path / "recipe.toml")
    r = subprocess.run([sys.executable, "-m", "sftdoctor", "train", "--config", str(tmp_path / "recipe.toml"), "--output-dir",
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "FIFO" in r.stderr and "Traceback" not in r.stderr, r.stderr
    os.mkfifo(tmp_path / "rows.jsonl")
    with pytest.raises(UserError, match="FIFO"):
        load_local(str(tmp_path / "rows.jsonl"))


def test_dash_writes_the_report_to_stdout(run_json, capsys):
    code = main(["report", str(run_json), "--html", "-"])
    out, err = capsys.readouterr()
    assert code == 1 and out.startswith("<!DOCTYPE html>") and "labels-pad-not-ignored" in err


# ---- tracebacks become one line: report JSON ------------------------------------------------------

GOOD = small_report().to_dict()


def finding(**over):
    return {**GOOD["findings"][0], **over}


@pytest.mark.parametrize("data, needle", [
    ({**GOOD, "findings": "x"}, "findings is 'x', expected an array"),
    ({**GOOD, "findings": [{"severity": "fail", "level": "batch"}]}, "findings[0].id"),
    ({**GOOD, "findings": [finding(severity="fatal")]}, "findings[0].severity is 'fatal'"),
    ({**GOOD, "findings": [finding(evidence=[1, 2])]}, "findings[0].evidence is an array"),
    ({**GOOD, "findings": [finding(message=3)]}, "findings[0].message is 3"),
    ({**GOOD, "findings": [finding(step="3")]}, "findings[0].step"),
    ({**GOOD, "checks": {"a": "pass"}}, "checks is an object, expected an array"),
    ({**GOOD, "checks": [{"id": "x", "status": "maybe"}]}, "checks[0].status"),
    ({**GOOD, "metrics": [1]}, "metrics is an array"),
    ({**GOOD, "run": "completed"}, "run is 'completed'"),
    ({**GOOD, "samples": [{"ids": [1, 2], "texts": ["a"], "classes": [0, 0]}]}, "samples[0].texts"),
    ({**GOOD, "samples": [{"ids": [1], "texts": ["a"], "classes": [9]}]}, "samples[0].classes"),
    ({**GOOD, "metrics": {"token_classes": {"pad": {"tokens": "many"}}}}, "metrics.token_classes.pad"),
    ({**GOOD, "findings": [finding(evidence={"a": json.loads("[" * 200 + "]" * 200)})]}, "nested more than 64 levels"),
    ({**GOOD, "schema": "sftdoctor.report/2"}, "newer sftdoctor"),
    ({**GOOD, "schema": "something-else/1"}, "not an sftdoctor report"),
    ([GOOD], "not an sftdoctor report"),
])
def test_a_damaged_report_is_one_line(tmp_path, capsys, data, needle):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    code = main(["report", str(p)])
    one_line_error(capsys, code, needle)


@pytest.mark.parametrize("content, needle", [
    ("[" * 100000, "too deeply"),
    ("{not json", "not valid JSON"),
    (b"\xff\xfe\x00binary", "not valid JSON"),
])
def test_unreadable_report_files_are_one_line(tmp_path, capsys, content, needle):
    p = tmp_path / "bad.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line_error(capsys, main(["report", str(p)]), needle)


def test_a_folder_as_the_report_path_is_one_line(tmp_path, capsys):
    one_line_error(capsys, main(["report", str(tmp_path)]), "is a folder")


# ---- tracebacks become one line: batches, checkpoints, prompts, tokenizers, train data ------------------

@pytest.mark.parametrize("batch, needle", [
    ({"input_ids": [[1, 2, 3], [4, 5]]}, "rows of different lengths"),
    ({"input_ids": ["hello", "world"]}, "does not hold numbers"),
    ({"input_ids": [[1, 2, 3]], "labels": [[1.0, 2.0, 3.0]]}, "holds float32 values"),
    ({"input_ids": torch.tensor([[1.5, 2.0]])}, "must be integers"),
    ({"input_ids": [[1, 2]], "attention_mask": [[float("nan"), 1.0]]}, "NaN"),
])
def test_bad_batches_are_one_user_error(batch, needle):
    import sftdoctor

    with pytest.raises(UserError, match=needle):
        sftdoctor.inspect_batch(batch)


def test_a_batch_file_of_ragged_lists_is_one_line(tmp_path, capsys):
    torch.save({"input_ids": [[1, 2, 3], [4]]}, tmp_path / "b.pt")
    one_line_error(capsys, main(["inspect-batch", "--batch", str(tmp_path / "b.pt"), "--tokenizer", GPT2]), "different lengths")


def test_a_batch_file_of_non_tensor_objects_says_how_to_save_it(tmp_path, capsys):
    from transformers import BatchEncoding

    torch.save(BatchEncoding({"input_ids": torch.tensor([[1, 2, 3]])}), tmp_path / "b.pt")
    line = one_line_error(capsys, main(["inspect-batch", "--batch", str(tmp_path / "b.pt"), "--tokenizer", GPT2]),
                          "holds non-tensor objects", "torch.save(dict(batch)")
    assert "\\e" not in line and "\x1b" not in line  # torch's coloured refusal text is not passed on
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    one_line_error(capsys, main(["inspect-batch", "--batch", str(tmp_path / "junk.pt"), "--tokenizer", GPT2]), "not a torch.save file")


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


def test_negative_safetensors_offsets_are_one_line(tmp_path):
    from sftdoctor.checkpoint import SafetensorsReader

    p = tmp_path / "model.safetensors"
    p.write_bytes(safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 16))
    with pytest.raises(UserError, match="negative offset"):
        SafetensorsReader(p)


def test_model_safetensors_that_is_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_embd": 8, "n_layer": 1, "n_head": 1}))
    (tmp_path / "m" / "model.safetensors").mkdir()
    one_line_error(capsys, main(["diagnose", str(tmp_path / "m"), "--tokenizer", GPT2]), "model.safetensors is a folder")


def test_a_binary_prompts_file_is_one_line(tmp_path):
    from sftdoctor.diagnose import read_questions

    (tmp_path / "p.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00binary")
    with pytest.raises(UserError, match="is binary, not text"):
        read_questions(tmp_path / "p.txt")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        read_questions(tmp_path / "latin.txt")


def test_a_tokenizer_folder_without_tokenizer_files_is_one_line(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    torch.save({"input_ids": torch.tensor([[1, 2, 3]])}, tmp_path / "b.pt")
    one_line_error(capsys, main(["inspect-batch", "--batch", str(tmp_path / "b.pt"), "--tokenizer", str(tmp_path / "tok")]),
                   "has no tokenizer files")


def test_the_train_data_error_shows_single_braces():
    from sftdoctor.train.data import _check_rows

    with pytest.raises(UserError) as e:
        _check_rows([{"q": 1}], "data.jsonl")
    assert '{"question": ...' in str(e.value) and "{{" not in str(e.value)

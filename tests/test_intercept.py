"""`sftdoctor inspect-batch train.py`: run the user's unmodified script until its first causal-LM
forward, inspect that batch, stop the script, and leave the interpreter as it was."""
from __future__ import annotations

import json
import os
import signal
import sys
import textwrap

import pytest

from sftdoctor.cli import main

from conftest import REPO, TOKENIZERS

EXAMPLES = REPO / "examples"


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def state():
    from transformers import PreTrainedModel

    return (sys.argv[:], list(sys.path), os.getcwd(), sys.modules.get("__main__"), signal.getsignal(signal.SIGINT),
            "__call__" in vars(PreTrainedModel))


def inspect(tmp_path, script, *script_args, ignore=()):
    out = tmp_path / "report.json"
    opts = [x for i in ignore for x in ("--ignore", i)]
    code = run_cli("inspect-batch", "-q", "--json", out, *opts, script, *script_args)
    return code, json.loads(out.read_text())


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # scripts write into their cwd
    return tmp_path


def test_raw_loop_with_its_own_loss_finds_labels_in_the_callers_batch(in_tmp):
    before = state()
    code, report = inspect(in_tmp, EXAMPLES / "good_loop.py")
    assert state() == before
    assert code == 0 and report["verdict"] != "fail"
    assert report["run"]["status"] == "stopped"
    assert report["run"]["forward"]["labels_from"].startswith("the batch dict")  # model got no labels=
    assert report["metrics"]["batch"]["supervised_tokens"] > 0
    assert report["metrics"]["token_classes"]["prompt"]["supervised"] == 0


def test_incident_loop_is_diagnosed_from_its_first_forward(in_tmp):
    code, report = inspect(in_tmp, EXAMPLES / "incident_loop.py")
    ids = {f["id"] for f in report["findings"] if f["severity"] == "fail"}
    assert code == 1 and {"labels-pad-not-ignored", "attention-mask-hides-tokens"} <= ids


def test_hf_trainer_forward_inside_train(in_tmp):
    before = state()
    code, report = inspect(in_tmp, EXAMPLES / "trainer_pad_eos.py", "--steps", "1")
    assert state() == before
    assert code == 1 and "pad-is-eos-masked" in {f["id"] for f in report["findings"]}
    assert report["run"]["forward"]["tokenizer"] == "GPT2Tokenizer"  # the Trainer's processing_class


def test_trl_sft_trainer_forward(in_tmp):
    pytest.importorskip("trl")
    before = state()
    code, report = inspect(in_tmp, EXAMPLES / "trl_template_mismatch.py", "--steps", "1")
    assert state() == before
    assert code == 1 and "labels-no-supervised-tokens" in {f["id"] for f in report["findings"]}
    assert report["run"]["forward"]["model"] == "LlamaForCausalLM"


PROBE_SCRIPT = """
    import json, os, sys
    import torch
    from transformers import AutoTokenizer
    from sftdoctor.tiny import tiny_model

    with open("seen.json", "w") as f:
        json.dump({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__}, f)
    sys.argv.append("--changed-by-script")
    os.chdir(os.path.dirname(os.path.abspath(__file__)))
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    tok.pad_token = tok.eos_token
    model = tiny_model("qwen2", len(tok), hidden=32, layers=1)
    enc = tok(["Question: 1+1?\\nAnswer: 2" + tok.eos_token], return_tensors="pt")
    labels = enc["input_ids"].clone()
    model(enc["input_ids"], enc["attention_mask"], labels=labels)  # forward(input_ids, attention_mask, ...)
    raise SystemExit("not reached: sftdoctor stops the script at its first forward")
"""


def test_script_sees_its_own_argv_cwd_and_path_and_nothing_leaks(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    script = scripts / "train.py"
    script.write_text(textwrap.dedent(PROBE_SCRIPT))
    monkeypatch.chdir(work)
    before = state()
    code, report = inspect(tmp_path, script, TOKENIZERS / "gpt2", "--lr", "3")
    assert state() == before  # argv, sys.path, cwd (the script chdir'ed), __main__, SIGINT, no patch left
    seen = json.loads((work / "seen.json").read_text())
    assert seen == {"argv": [str(script), str(TOKENIZERS / "gpt2"), "--lr", "3"], "cwd": str(work),
                    "path0": str(scripts), "name": "__main__"}
    assert report["run"]["forward"]["caller"] == f"{script}:16"
    assert report["metrics"]["batch"]["rows"] == 1 and report["metrics"]["tokenizer"]["class"] == "GPT2Tokenizer"
    assert report["samples"][0]["attention"] == [1] * report["metrics"]["batch"]["seq_len"]  # bound positionally


def test_module_mode(tmp_path, monkeypatch):
    pkg = tmp_path / "mytrain"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent(PROBE_SCRIPT))
    monkeypatch.chdir(tmp_path)
    before = state()
    code, report = inspect(tmp_path, "-m", "mytrain", TOKENIZERS / "gpt2")
    assert state() == before
    assert report["metrics"]["batch"]["rows"] == 1
    assert json.loads((tmp_path / "seen.json").read_text())["name"] == "__main__"


def test_script_raising_before_any_forward(tmp_path, capsys, monkeypatch):
    script = tmp_path / "broken.py"
    script.write_text("def load():\n    raise FileNotFoundError('data/train.jsonl')\n\nload()\n")
    monkeypatch.chdir(tmp_path)
    before = state()
    assert run_cli("inspect-batch", script) == 2
    assert state() == before
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f'File "{script}", line 4, in <module>' in err
    assert "FileNotFoundError: data/train.jsonl" in err
    assert "sftdoctor/" not in err.replace("sftdoctor: error", "")  # none of our frames
    last = err.strip().splitlines()[-1]
    assert last.startswith("sftdoctor: error:") and "raised FileNotFoundError: data/train.jsonl before any model forward" in last


def test_script_without_any_forward(tmp_path, capsys):
    script = tmp_path / "noop.py"
    script.write_text("print('hello')\n")
    assert run_cli("inspect-batch", script) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished without calling a causal LM" in err[0]


def test_script_exiting_without_any_forward(tmp_path, capsys):
    script = tmp_path / "bye.py"
    script.write_text("import sys\nsys.exit(3)\n")
    assert run_cli("inspect-batch", script) == 2
    assert "exited with code 3 without calling a causal LM" in capsys.readouterr().err


def test_missing_script(tmp_path, capsys):
    assert run_cli("inspect-batch", tmp_path / "nope.py") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sftdoctor: error: script") and "does not exist" in err[0]


def test_missing_module(capsys):
    assert run_cli("inspect-batch", "-m", "no_such_module_xyz") == 2
    assert "no module named 'no_such_module_xyz' to run" in capsys.readouterr().err


def test_script_that_never_trains_is_inspected_at_its_first_no_grad_forward(tmp_path):
    script = tmp_path / "evaluate.py"
    script.write_text(textwrap.dedent(PROBE_SCRIPT).replace(
        "model(enc[", "with torch.no_grad():\n    model(enc[").replace("raise SystemExit", "print"))
    code, report = inspect(tmp_path, script, TOKENIZERS / "gpt2")
    assert report["run"]["status"] == "completed" and report["run"]["forward"]["grad_enabled"] is False
    assert "labels-pad-not-ignored" not in {f["id"] for f in report["findings"]}  # pad == eos, one row: no padding
    assert report["metrics"]["batch"]["rows"] == 1


def test_decoy_reports_and_probes_folders_next_to_the_script(tmp_path):
    """A user's own reports/ or probes/ package beside train.py must not shadow sftdoctor's."""
    for name in ("reports", "probes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('decoy imported')\n")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(PROBE_SCRIPT))
    code, report = inspect(tmp_path, script, TOKENIZERS / "gpt2")
    assert report["run"]["status"] == "stopped" and report["checks"]


def test_a_4d_attention_mask_is_left_out_not_fatal(tmp_path):
    script = tmp_path / "train4d.py"
    script.write_text(textwrap.dedent(PROBE_SCRIPT).replace(
        'model(enc["input_ids"], enc["attention_mask"], labels=labels)',
        'T = enc["input_ids"].shape[1]\n'
        'mask4d = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None]\n'
        'model(input_ids=enc["input_ids"], attention_mask=mask4d, labels=labels)'))
    code, report = inspect(tmp_path, script, TOKENIZERS / "gpt2")
    assert report["run"]["forward"]["fields_not_checked"] == ["attention_mask"]
    assert report["metrics"]["batch"]["rows"] == 1

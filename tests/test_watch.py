"""`sftdoctor watch train.py`: the examples diagnosed with the right ids, --fail-fast and
--max-steps, a report however the script ends, everything patched restored, and torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sftdoctor.cli import main

from conftest import REPO, TOKENIZERS

EXAMPLES = REPO / "examples"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write their outputs under the cwd
    return tmp_path


def watch(tmp_path, script, *args, options=()):
    out = tmp_path / "watch.json"
    code = main(["watch", "-q", "--plain", "--json", str(out), *options, str(script), *map(str, args)])
    return code, json.loads(out.read_text())


def ids(report, severity=None):
    return {f["id"] for f in report["findings"] if severity is None or f["severity"] == severity}


def patched_state():
    """Everything watch patches, as identities to compare before and after."""
    from torch.optim import optimizer as optim_mod
    from transformers import PreTrainedModel, Trainer
    from transformers.generation import GenerationMixin

    return {
        "call_override": "__call__" in vars(PreTrainedModel),
        "save_pretrained": PreTrainedModel.save_pretrained,
        "generate": GenerationMixin.generate,
        "train": Trainer.train,
        "backward": torch.Tensor.backward,
        "torch.save": torch.save,
        "optimizer_hooks": (len(optim_mod._global_optimizer_pre_hooks), len(optim_mod._global_optimizer_post_hooks)),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
    }


# ---- the examples --------------------------------------------------------------------------------

def test_incident_loop_learned_and_numerical_causes(tmp_path):
    code, report = watch(tmp_path, EXAMPLES / "incident_loop.py", "--out", tmp_path / "model", options=["--max-steps", "2"])
    fails = ids(report, "fail")
    assert code == 1
    assert {"labels-pad-not-ignored", "attention-mask-hides-tokens"} <= fails  # batch level, first forward
    assert "precision-fp16-unsafe" in ids(report)  # fp16 weights of a bf16 checkpoint, Adam eps 0 in fp16
    assert fails & {"loss-nonfinite", "logits-nonfinite", "grad-nonfinite"}  # the NaN after the first step
    assert report["run"]["status"] == "stopped" and report["metrics"]["optimizer_steps"] == 2
    nan_rows = [s for s in report["metrics"]["steps"] if s["loss"] == "nan"]
    assert nan_rows and nan_rows[0]["step"] == 1  # the raw loss of micro-step 1, not a filtered average


def test_incident_loop_fail_fast_stops_before_the_first_optimizer_step(tmp_path):
    before = patched_state()
    code, report = watch(tmp_path, EXAMPLES / "incident_loop.py", options=["--fail-fast"])
    assert patched_state() == before
    assert code == 1 and report["run"]["status"] == "stopped"
    cause = report["run"]["stopped_by"].removeprefix("--fail-fast: ")
    assert cause in {"labels-pad-not-ignored", "attention-mask-hides-tokens"}  # the first batch's fails
    assert cause in ids(report, "fail")
    assert report["metrics"]["optimizer_steps"] == 0 and not report["metrics"].get("steps")  # step 0 never ran


def test_incident_loop_checks_what_it_saves_and_generates(tmp_path):
    code, report = watch(tmp_path, EXAMPLES / "incident_loop.py", "--steps", "2", "--out", tmp_path / "model")
    assert report["run"]["status"] == "completed" and code == 1
    assert report["metrics"]["saves"][0]["path"] == str(tmp_path / "model")
    assert "weights-nonfinite" in ids(report, "fail")  # the fp16 Adam step wrote NaN into the weights
    assert report["metrics"]["generations"][0]["prompts"] == 1
    assert {"generation-degenerate", "generation-never-stops"} <= {c["id"] for c in report["checks"]}


def test_good_loop_has_no_fail(tmp_path):
    code, report = watch(tmp_path, EXAMPLES / "good_loop.py", "--steps", "3", "--out", tmp_path / "model")
    assert code == 0 and not ids(report, "fail"), report["findings"]
    assert report["run"]["status"] == "completed"
    assert report["run"]["first_forward"]["labels_from"].startswith("the batch dict")  # its own loss
    assert len(report["metrics"]["steps"]) == 3 and report["metrics"]["saves"][0]["findings"] == []
    statuses = {c["id"]: c["status"] for c in report["checks"]}
    assert statuses["labels-pad-not-ignored"] == "pass" and statuses["grad-from-ignored-tokens"] == "pass"


def test_trainer_pad_eos(tmp_path):
    before = patched_state()
    code, report = watch(tmp_path, EXAMPLES / "trainer_pad_eos.py", options=["--max-steps", "1"])
    assert patched_state() == before
    assert code == 1 and "pad-is-eos-masked" in ids(report, "fail")
    assert report["run"]["status"] == "stopped" and report["metrics"]["optimizer_steps"] == 1


def test_good_trainer_has_no_fail(tmp_path):
    code, report = watch(tmp_path, EXAMPLES / "good_trainer.py", "--steps", "2", "--output-dir", tmp_path / "out")
    assert code == 0 and not ids(report, "fail"), report["findings"]
    assert report["metrics"]["optimizer_steps"] == 2 and len(report["metrics"]["steps"]) == 2
    assert report["metrics"]["saves"] and report["metrics"]["saves"][0]["findings"] == []  # trainer.save_model


def test_trl_template_mismatch(tmp_path):
    pytest.importorskip("trl")
    code, report = watch(tmp_path, EXAMPLES / "trl_template_mismatch.py", options=["--max-steps", "1"])
    assert code == 1 and "labels-no-supervised-tokens" in ids(report, "fail")
    # no loss signal at all is not frozen weights: the root cause is named once
    assert "params-frozen" not in ids(report)


def test_preshifted_labels(tmp_path):
    code, report = watch(tmp_path, EXAMPLES / "preshifted_labels.py", options=["--max-steps", "1"])
    assert code == 1 and "labels-misaligned" in ids(report, "fail")


def test_frozen_params(tmp_path):
    code, report = watch(tmp_path, EXAMPLES / "frozen_params.py", options=["--max-steps", "1"])
    assert code == 1 and "params-frozen" in ids(report, "fail")


# ---- however the script ends ---------------------------------------------------------------------

TRAIN_THEN = """
    import os, signal, sys
    import torch
    from transformers import AutoTokenizer
    from sftdoctor.tiny import tiny_model

    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    tok.pad_token = tok.eos_token
    model = tiny_model("gpt2", len(tok), hidden=32, layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    enc = tok(["Question: 1+1?\\nAnswer: 2" + tok.eos_token] * 2, return_tensors="pt")
    for step in range(2):
        out = model(**enc, labels=enc["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    {end}
"""


def end_script(tmp_path, end: str):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TRAIN_THEN).replace("{end}", end))
    return script


def test_script_that_raises_leaves_a_report_and_exits_1(tmp_path, capsys):
    script = end_script(tmp_path, "def evaluate():\n    raise ValueError('eval set missing')\n\nevaluate()")
    before = patched_state()
    code, report = watch(tmp_path, script, TOKENIZERS / "gpt2")
    assert patched_state() == before
    assert code == 1
    run = report["run"]
    assert run["status"] == "crashed" and run["exit_code"] == 1
    assert run["error"]["type"] == "ValueError" and run["error"]["message"] == "eval set missing"
    assert run["error"]["file"] == str(script) and run["error"]["line"] == 18 and run["error"]["function"] == "evaluate"
    assert len(report["metrics"]["steps"]) == 2  # the steps before the crash are in the report
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: eval set missing" in err
    assert f'File "{script}", line 20, in <module>' in err
    assert "sftdoctor" not in err.split("Traceback", 1)[1]  # no frame of ours


def test_script_calling_sys_exit_3(tmp_path):
    script = end_script(tmp_path, "sys.exit(3)")
    code, report = watch(tmp_path, script, TOKENIZERS / "gpt2")
    assert code == 3 and report["run"]["status"] == "exited" and report["run"]["exit_code"] == 3
    assert len(report["metrics"]["steps"]) == 2


def test_script_exiting_0_with_a_fail_finding_exits_1(tmp_path):
    script = end_script(tmp_path, "sys.exit(0)")  # labels = input_ids with pad == eos: pads supervised
    code, report = watch(tmp_path, script, TOKENIZERS / "gpt2")
    assert report["run"]["status"] == "exited" and code == (1 if ids(report, "fail") else 0)


def test_sigint_leaves_a_report_and_exits_130(tmp_path):
    script = end_script(tmp_path, "os.kill(os.getpid(), signal.SIGINT)\nimport time; time.sleep(5)")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "sftdoctor", "watch", "-q", "--plain", "--json", str(out), str(script),
                           str(TOKENIZERS / "gpt2")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["run"]["status"] == "interrupted" and report["run"]["exit_code"] == 130
    assert len(report["metrics"]["steps"]) == 2
    assert "KeyboardInterrupt" in proc.stderr


def test_script_without_a_model_still_reports(tmp_path):
    script = tmp_path / "noop.py"
    script.write_text("print('nothing to train')\n")
    code, report = watch(tmp_path, script)
    # nothing was checked: never a PASS, exit 3 (inconclusive)
    assert code == 3 and report["run"]["status"] == "completed" and report["verdict"] == "inconclusive"
    assert "no training forward" in report["run"]["note"]


def test_missing_script_is_a_one_line_error(tmp_path, capsys):
    assert main(["watch", str(tmp_path / "nope.py")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


# ---- several processes ---------------------------------------------------------------------------

DDP_SCRIPT = """
    import sys
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer
    from sftdoctor.tiny import tiny_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    tok.pad_token = tok.eos_token
    model = torch.nn.parallel.DistributedDataParallel(tiny_model("gpt2", len(tok), hidden=32, layers=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    texts = ["Question: 1+1?\\nAnswer: 2", "Question: what is 12 times 12?\\nAnswer: 144"]
    enc = tok([texts[rank] + tok.eos_token, "Hi" + tok.eos_token], return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    if rank == 1:
        labels[enc["attention_mask"] == 0] = -100  # rank 1 masks its padding, rank 0 does not
    for step in range(2):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("destroys_group", [False], ids=["store"])  # files: tests/test_distributed.py
def test_torchrun_two_processes_one_merged_report(tmp_path, destroys_group):
    """Ranks exchange reports through torchrun's store (or files in SFTDOCTOR_RANK_DIR); never a
    collective, even when the script left its process group up."""
    script = tmp_path / "ddp.py"
    source = textwrap.dedent(DDP_SCRIPT)
    script.write_text(source if destroys_group else source.replace("dist.destroy_process_group()", ""))
    out = tmp_path / "merged.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if destroys_group:
        env["SFTDOCTOR_RANK_DIR"] = str(tmp_path / "ranks")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sftdoctor", "watch", "-q", "--plain", "--json", str(out), str(script),
                           str(TOKENIZERS / "gpt2")], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    report = json.loads(out.read_text())
    assert proc.returncode == 1, proc.stderr[-3000:]  # a fail finding on rank 0
    assert report["run"]["world_size"] == 2 and report["run"]["ranks_reported"] == 2
    assert report["run"]["gathered_by"] == ("files" if destroys_group else "store")
    assert proc.stdout.count("sftdoctor watch: running") == 1  # the start line once (rank 0)
    pad = [f for f in report["findings"] if f["id"] == "labels-pad-not-ignored"]
    assert [f["rank"] for f in pad] == [0]  # only rank 0 supervises its padding
    assert {f.get("rank") for f in report["findings"]} <= {0, 1}
    assert all(r["status"] == "completed" for r in report["run"]["ranks"])
    assert not (tmp_path / "ranks").exists() or not list((tmp_path / "ranks").iterdir())  # rank files cleaned up


# ---- the live view -------------------------------------------------------------------------------

def test_live_view_plain_lines_show_probed_steps_and_fails_with_their_fix():
    import io

    from sftdoctor.findings import Finding
    from sftdoctor.live import LiveView

    buf = io.StringIO()  # not a terminal: plain lines (CI logs, nohup)
    view = LiveView(buf)
    view.step({"step": 0, "loss": 1.5, "grad_norm": 2.0, "full": True}, 0)
    view.step({"step": 1, "loss": 1.4, "grad_norm": 2.0, "full": False}, 1)  # a cheap step: no line
    view.step({"step": 2, "loss": float("nan"), "grad_norm": None, "full": False}, 2)  # non-finite: always
    view.finding(Finding("labels-pad-not-ignored", "fail", "batch", "pads supervised", fix="pad with -100", step=0))
    view.finding(Finding("bos-duplicated", "warn", "batch", "two BOS", fix="drop one", step=0))
    assert buf.getvalue().splitlines() == [
        "sftdoctor: step 0  opt 0  loss 1.5  grad_norm 2",
        "sftdoctor: step 2  opt 2  loss nan  grad_norm -",
        "sftdoctor: FAIL labels-pad-not-ignored (batch, step 0): pads supervised",
        "sftdoctor:   fix: pad with -100",
        "sftdoctor: WARN bos-duplicated (batch, step 0): two BOS",
    ]


def test_live_view_on_a_terminal_updates_a_status_line():
    import io
    import re

    from sftdoctor.findings import Finding
    from sftdoctor.live import LiveView

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    buf = Terminal()
    view = LiveView(buf)
    assert not view.plain
    view.step({"step": 0, "loss": 1.5, "grad_norm": 2.0, "loss_scale": 65536.0, "full": True}, 0)
    view.finding(Finding("loss-nonfinite", "fail", "step", "loss is nan", fix="use bf16", step=3))
    view.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert "loss 1.5" in text and "scale 6.554e+04" in text
    assert "FAIL loss-nonfinite (step, step 3): loss is nan" in text and "fix: use bf16" in text


def test_torch_save_of_a_state_dict_is_checked_and_other_saves_are_not(tmp_path):
    script = end_script(tmp_path, 'torch.save(model.state_dict(), "weights.pt")\ntorch.save(opt.state_dict(), "opt.pt")')
    code, report = watch(tmp_path, script, TOKENIZERS / "gpt2")
    saves = report["metrics"]["saves"]
    assert [s["path"] for s in saves] == ["weights.pt"] and saves[0]["findings"] == []
    assert (tmp_path / "weights.pt").exists() and (tmp_path / "opt.pt").exists()
    assert {c["id"]: c["status"] for c in report["checks"]}["weights-nonfinite"] == "pass"


def test_every_and_full_steps_set_the_sampling(tmp_path):
    script = end_script(tmp_path, "pass")
    _, default = watch(tmp_path, script, TOKENIZERS / "gpt2", options=["--full-steps", "1", "--every", "0"])
    _, every = watch(tmp_path, script, TOKENIZERS / "gpt2", options=["--full-steps", "0", "--every", "1"])
    assert [s["full"] for s in default["metrics"]["steps"]] == [True, False]
    assert [s["full"] for s in every["metrics"]["steps"]] == [True, True]

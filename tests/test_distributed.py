"""Several processes (torchrun / accelerate launch, gloo on CPU, 2 ranks): a failing rank never hangs
the job, the merged report tells every rank's story, rank 0 writes every output, FSDP2 is probed.

Each job runs under a hard timeout; "ends within 60 s" is measured from the moment the failure
happens (the script writes the time to FAIL_MARK), so a slow start on a busy machine does not count.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import TOKENIZERS

HARD_TIMEOUT = 240  # a hang fails the test instead of the CI job

DDP = """
    import os, sys, time
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer
    from sftdoctor.tiny import tiny_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    fail_rank = int(os.environ.get("FAIL_RANK", "-1"))
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    tok.pad_token = tok.eos_token
    model = tiny_model("gpt2", len(tok), hidden=32, layers=1)
    if os.environ.get("FSDP2"):
        from torch.distributed.fsdp import fully_shard
        for block in model.transformer.h:
            fully_shard(block)
        model = fully_shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    texts = ["Question: 1+1?\\nAnswer: 2", "Question: what is 12 times 12?\\nAnswer: 144"]
    enc = tok([texts[rank] + tok.eos_token, "Hi" + tok.eos_token], return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    if rank not in [int(r) for r in os.environ.get("PAD_BUG_RANKS", "").split(",") if r]:
        labels[enc["attention_mask"] == 0] = -100  # correct masking, except on the pad-bug ranks
    for step in range(int(os.environ.get("STEPS", "4"))):
        if rank == fail_rank and step == 2:
            open(os.environ["FAIL_MARK"], "w").write(str(time.time()))
            raise ValueError(f"bad row on rank {rank}")
        if step == 2 and os.environ.get("RUNNING_MARK") and rank == 0:
            open(os.environ["RUNNING_MARK"], "w").write(str(time.time()))
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
    dist.destroy_process_group()
"""

TRAINER = """
    import os, sys, time
    import transformers
    from transformers import AutoTokenizer, Trainer, TrainingArguments
    from sftdoctor.tiny import tiny_model

    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    tok.pad_token = tok.eos_token
    rank = int(os.environ.get("RANK", "0"))
    fail_rank = int(os.environ.get("FAIL_RANK", "-1"))
    rows = [tok(f"Question: what is {i} plus {i}?\\nAnswer: {2 * i}" + tok.eos_token) for i in range(64)]
    calls = {"n": 0}

    def collate(features):
        calls["n"] += 1
        if rank == fail_rank and calls["n"] == 6:  # in the third optimizer step (2 micro-batches each)
            open(os.environ["FAIL_MARK"], "w").write(str(time.time()))
            raise KeyError(f"collate: row without 'input_ids' on rank {rank}")
        batch = tok.pad([{"input_ids": f["input_ids"]} for f in features], return_tensors="pt")
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        return batch

    class LogLoss(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs and "loss" in logs:
                with open(os.environ["LOSS_LOG"], "a") as f:
                    f.write(f"{logs['loss']!r}\\n")

    args = TrainingArguments(output_dir="out", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             learning_rate=1e-3, dataloader_num_workers=0, disable_tqdm=True)
    Trainer(model=tiny_model("gpt2", len(tok), hidden=32, layers=1), args=args, train_dataset=rows,
            data_collator=collate, callbacks=[LogLoss()]).train()
"""


def launch(tmp_path: Path, source: str, *, env: dict | None = None, options: tuple = (), launcher: str = "torchrun",
           popen: bool = False):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(source))
    full_env = dict(os.environ, OMP_NUM_THREADS="1", FAIL_MARK=str(tmp_path / "failed_at"),
                    LOSS_LOG=str(tmp_path / "loss.log"), **(env or {}))
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:  # accelerate launch --multi_gpu on CPU starts its processes through torchrun's elastic agent
        cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["-m", "sftdoctor", "watch", "-q", "--plain", "--json", str(tmp_path / "run.json"),
            "--html", str(tmp_path / "run.html"), *options, str(script), str(TOKENIZERS / "gpt2")]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                                cwd=tmp_path, start_new_session=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HARD_TIMEOUT, env=full_env, cwd=tmp_path)
    return proc, time.time()


def outputs(tmp_path: Path, log: str) -> dict:
    assert (tmp_path / "run.json").exists(), log[-4000:]
    assert (tmp_path / "run.html").exists(), log[-4000:]  # every requested output is written
    return json.loads((tmp_path / "run.json").read_text())


def ended_promptly(tmp_path: Path, ended: float) -> None:
    failed_at = float((tmp_path / "failed_at").read_text())
    assert ended - failed_at < 60, f"the job took {ended - failed_at:.0f} s to end after the failure"


def by_rank(report: dict) -> dict[int, dict]:
    return {e["rank"]: e for e in report["run"]["ranks"]}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("fail_rank, channel", [(1, "store"), (0, "files")])
def test_a_crash_on_one_rank_ends_the_job_and_names_the_rank(tmp_path, fail_rank, channel):
    env = {"FAIL_RANK": str(fail_rank)}
    if channel == "files":
        env["SFTDOCTOR_RANK_DIR"] = str(tmp_path / "ranks")
    proc, ended = launch(tmp_path, DDP, env=env)
    log = proc.stdout + proc.stderr
    report = outputs(tmp_path, log)
    ended_promptly(tmp_path, ended)
    assert proc.returncode == 1, log[-3000:]
    run = report["run"]
    assert run["gathered_by"] == channel and run["ranks_reported"] == 2
    assert run["failed_rank"] == fail_rank and run["status"] == "crashed"  # the root cause, not its echo
    assert run["error"]["type"] == "ValueError" and f"on rank {fail_rank}" in run["error"]["message"]
    raise_line = next(i for i, t in enumerate(textwrap.dedent(DDP).splitlines(), 1) if "raise ValueError" in t)
    assert run["error"]["file"].endswith("train.py") and run["error"]["line"] == raise_line  # the user's frame
    assert by_rank(report)[fail_rank]["error"]["type"] == "ValueError"
    assert f"run crashed on rank {fail_rank} (first): ValueError: bad row on rank {fail_rank}" in proc.stdout
    assert proc.stdout.count("sftdoctor watch: running") == 1  # the start line once, from rank 0
    assert f"rank {fail_rank}, the first rank to fail" in (tmp_path / "run.html").read_text()
    if channel == "files":
        assert not (tmp_path / "ranks").exists() or not list((tmp_path / "ranks").iterdir())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fail_fast_on_one_rank_stops_every_rank(tmp_path):
    proc, ended = launch(tmp_path, DDP, env={"PAD_BUG_RANKS": "1", "STEPS": "200"}, options=("--fail-fast",))
    log = proc.stdout + proc.stderr
    report = outputs(tmp_path, log)
    assert proc.returncode == 1, log[-3000:]
    run = report["run"]
    assert run["failed_rank"] == 1 and run["stopped_by"] == "--fail-fast: labels-pad-not-ignored"
    ranks = by_rank(report)
    assert ranks[1]["status"] == "stopped" and ranks[0]["status"] in ("stopped", "crashed")
    assert ranks[0]["optimizer_steps"] < 50  # rank 0 did not train on alone
    assert [f["rank"] for f in report["findings"] if f["id"] == "labels-pad-not-ignored"] == [1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_trainer_collate_error_on_one_rank_under_accelerate_launch(tmp_path):
    proc, ended = launch(tmp_path, TRAINER, env={"FAIL_RANK": "1"}, launcher="accelerate")
    log = proc.stdout + proc.stderr
    report = outputs(tmp_path, log)
    ended_promptly(tmp_path, ended)
    assert proc.returncode == 1, log[-3000:]
    run = report["run"]
    assert run["gathered_by"] == "store" and run["failed_rank"] == 1
    assert run["error"]["type"] == "KeyError" and "on rank 1" in run["error"]["message"]
    assert run["error"]["function"] == "collate"  # the user's frame, not the DataLoader's
    # the loss per optimizer step is the one Trainer logged (DDP + gradient accumulation)
    logged = [float(x) for x in (tmp_path / "loss.log").read_text().split()]
    assert logged  # accelerate's loader prefetches a batch: the collate error comes during step 2
    assert report["metrics"]["logged_loss"]["values"][:len(logged)] == pytest.approx(logged, rel=1e-5)
    # each micro-step's recorded loss is its own tokens' mean (near the logged one), not a share of it
    steps = report["metrics"]["steps"]
    assert all(s["raw_loss"] < 0.5 * s["loss"] for s in steps)  # 2 ranks x 2 micro-batches share the step
    # (near ln(vocab) for a random-init model; Trainer's own log is lower here because this tiny config
    # has no loss_type, so HF counts unshifted labels in num_items_in_batch: docs/distributed.md)
    assert all(abs(s["loss"] - math.log(50257)) < 0.3 for s in steps), [(s["loss"], s["raw_loss"]) for s in steps]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigint_to_the_launcher_ends_the_job_with_a_report(tmp_path):
    proc = launch(tmp_path, DDP, env={"STEPS": "100000", "STEP_SLEEP": "0.05", "RUNNING_MARK": str(tmp_path / "running")},
                  popen=True)
    try:
        deadline = time.time() + HARD_TIMEOUT
        while not (tmp_path / "running").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (tmp_path / "running").exists(), proc.communicate()[0][-3000:]
        time.sleep(1)
        sent = time.time()
        proc.send_signal(signal.SIGINT)  # Ctrl-C on the launcher: torchrun passes it to every rank
        log, _ = proc.communicate(timeout=HARD_TIMEOUT)
        ended = time.time()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert ended - sent < 60
    report = outputs(tmp_path, log)
    assert proc.returncode != 0, log[-3000:]
    assert report["run"]["status"] in ("interrupted", "terminated")
    assert report["run"]["ranks_reported"] == 2
    assert {e["status"] for e in report["run"]["ranks"]} <= {"interrupted", "terminated", "stopped", "crashed"}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_pad_bug_is_found_by_the_step_probes(tmp_path):
    proc, ended = launch(tmp_path, DDP, env={"FSDP2": "1", "PAD_BUG_RANKS": "0,1", "STEPS": "3"})
    log = proc.stdout + proc.stderr
    report = outputs(tmp_path, log)
    assert proc.returncode == 1, log[-3000:]  # fail findings, no crash
    assert all(e["status"] == "completed" for e in report["run"]["ranks"])
    assert not report["metrics"].get("internal_errors") and not report["run"].get("internal_errors")
    checks = {c["id"]: c["status"] for c in report["checks"]}
    assert checks["grad-from-ignored-tokens"] == "fail"  # measured from the gradient, on DTensor params
    assert {f["rank"] for f in report["findings"] if f["id"] == "grad-from-ignored-tokens"} == {0, 1}
    steps = report["metrics"]["steps"]
    assert steps and all(s["grad_norm"] is not None for s in steps if s["optimizer_step"])


# ---- the merge, without processes (fast) --------------------------------------------------------

def _rank_report(rank: int, status: str = "completed", **run) -> dict:
    from sftdoctor.report import Report

    r = Report(command="watch")
    r.run.update(status=status, exit_code=run.pop("exit_code", 0), rank=rank, **run)
    return r.to_dict()


def test_merge_names_the_first_failing_rank_and_keeps_the_others():
    from sftdoctor.distributed import merge
    from sftdoctor.watch import exit_code

    echo = {"type": "RuntimeError", "message": "Connection closed by peer"}
    root = {"type": "ValueError", "message": "bad row", "file": "train.py", "line": 9, "function": "<module>"}
    merged = merge([_rank_report(0, "crashed", exit_code=1, error=echo), _rank_report(1, "crashed", exit_code=1, error=root)],
                   2, stop={"rank": 1, "status": "crashed"}, waited=0.1)
    assert merged.run["failed_rank"] == 1 and merged.run["error"] == root  # the root cause, not rank 0's echo
    assert merged.run["rank0"]["error"] == echo
    assert [e["error"]["type"] for e in merged.run["ranks"]] == ["RuntimeError", "ValueError"]
    assert exit_code(merged) == 1


def test_merge_says_which_rank_did_not_answer():
    from sftdoctor.distributed import merge
    from sftdoctor.watch import exit_code

    merged = merge([_rank_report(0), None], 2, waited=20.0)
    assert merged.run["ranks_missing"] == [1] and merged.run["status"] == "incomplete"
    assert "rank 1 did not answer within 20.0 s" in merged.run["ranks"][1]["note"]
    assert exit_code(merged) == 1  # a silent rank is never a clean pass


def test_a_stop_of_fail_fast_stops_the_job_a_max_steps_stop_does_not():
    from sftdoctor.distributed import is_failure

    assert is_failure({"status": "stopped", "stopped_by": "--fail-fast: labels-pad-not-ignored"})
    assert not is_failure({"status": "stopped", "stopped_by": "--max-steps 3 reached"})
    assert is_failure({"status": "exited", "exit_code": 3}) and not is_failure({"status": "exited", "exit_code": 0})
    assert is_failure({"status": "terminated", "exit_code": 143})

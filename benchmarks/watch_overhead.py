"""Overhead of `sftdoctor watch train.py` over `python train.py`, in ONE process, interleaved.

    python benchmarks/watch_overhead.py                 # 200 steps, 3 rounds
    python benchmarks/watch_overhead.py --steps 100 --rounds 2 --json out.json

The training script (written to a temp folder) is a plain GSM8K SFT loop on a tiny model: forward
with labels, backward, AdamW step, zero_grad; it times each step itself with perf_counter and
writes the list. Each round runs it bare (sftdoctor's script runner, nothing attached: the same
as `python train.py`) and under watch (default sampling: full probes on the first 3 optimizer
steps and every 50th, cheap checks on the others; the first batch's batch probes), in a fresh
random order. Ratios are watch / bare of the same round; the table shows the median over rounds.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import textwrap
from contextlib import redirect_stdout
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
    import json, os, sys, time
    from pathlib import Path
    import torch
    from sftdoctor.tiny import tiny_model, train_tokenizer

    torch.set_num_threads(1)
    shared, steps, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    with open(shared / "data" / "gsm8k" / "train.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(512), f)]
    tokenizer = train_tokenizer([r["question"] + "\\n" + r["answer"] for r in rows[:256]])
    torch.manual_seed(0)
    model = tiny_model("qwen2", len(tokenizer), hidden=HIDDEN, layers=LAYERS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def collate(batch_rows):
        ids, labels = [], []
        for r in batch_rows:
            prompt = tokenizer(f"Question: {r['question']}\\nAnswer:")["input_ids"]
            answer = tokenizer(" " + r["answer"] + tokenizer.eos_token)["input_ids"]
            ids.append((prompt + answer)[:SEQ])
            labels.append(([-100] * len(prompt) + answer)[:SEQ])
        pad = tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([x + [pad] * (SEQ - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (SEQ - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (SEQ - len(y)) for y in labels]),
        }

    batches = [collate(rows[i:i + BATCH]) for i in range(0, len(rows), BATCH)]
    wall, cpu = [], []
    for step in range(steps):
        batch = batches[step % len(batches)]
        t0, c0 = time.perf_counter(), time.thread_time()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    with open(out, "w") as f:
        json.dump({"wall": wall, "cpu": cpu}, f)
"""


MODES = ("bare", "runner", "watch")


def run_once(mode: str, script: Path, args: list[str]) -> dict[str, list[float]]:
    from sftdoctor.runner import run_script
    from sftdoctor.watch import Watcher, WatchOptions

    sink = io.StringIO()
    with redirect_stdout(sink):
        if mode == "bare":
            outcome = run_script(str(script), args)
            assert outcome.status == "completed", outcome
        else:  # runner: watch without the step probes (first-batch probes, save/generate checks)
            report = Watcher(WatchOptions(step_probes=(mode == "watch"))).run(str(script), args)
            assert report.run["status"] == "completed", report.run
    return json.loads(Path(args[2]).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=192)
    ap.add_argument("--json", help="write the raw numbers here")
    opts = ap.parse_args()
    torch.set_num_threads(1)
    shared = REPO.parent / "shared"
    work = Path(tempfile.mkdtemp(prefix="sftdoctor-bench-"))
    script = work / "train.py"
    script.write_text(textwrap.dedent(SCRIPT).replace("HIDDEN", str(opts.hidden)).replace("LAYERS", str(opts.layers))
                      .replace("BATCH", str(opts.batch)).replace("SEQ", str(opts.seq)))
    args = [str(shared), str(opts.steps), str(work / "times.json")]
    for mode in MODES:  # warm imports, caches and the allocator
        run_once(mode, script, [str(shared), "20", str(work / "times.json")])

    rounds = []
    for r in range(opts.rounds):
        order = list(MODES)
        random.Random(r).shuffle(order)
        got = {mode: run_once(mode, script, args) for mode in order}
        rounds.append(got)
        print(f"round {r + 1}/{opts.rounds}: " + ", ".join(
            f"{m} {statistics.mean(t['cpu']) * 1e3:.1f} ms cpu" for m, t in got.items()), file=sys.stderr)

    print(f"\nwatch overhead: {opts.steps} steps, tiny qwen2 hidden {opts.hidden} x {opts.layers} layers, "
          f"batch {opts.batch} x {opts.seq}, torch threads 1, {opts.rounds} rounds (modes in random order per round, "
          "one process)\n")
    print("| clock | measure | bare ms | runner / bare | watch / bare | watch [min-max] |")
    print("|---|---|---:|---:|---:|---|")
    for clock in ("cpu", "wall"):
        for label, reduce in (("mean step, all steps", lambda t: statistics.mean(t)),
                              ("mean step after the first 3", lambda t: statistics.mean(t[3:])),
                              ("median step (cheap steps)", lambda t: statistics.median(t))):
            per_mode = {m: [reduce(g[m][clock]) for g in rounds] for m in MODES}
            ratio = {m: [x / b for x, b in zip(per_mode[m], per_mode["bare"])] for m in MODES}
            print(f"| {clock} | {label} | {statistics.median(per_mode['bare']) * 1e3:.2f} | "
                  f"{statistics.median(ratio['runner']):.3f}x | {statistics.median(ratio['watch']):.3f}x | "
                  f"[{min(ratio['watch']):.3f}-{max(ratio['watch']):.3f}] |")
    print("\nbare: the script run as `python train.py` would (sftdoctor's runner, nothing attached); runner: watch "
          "without step probes (first-batch probes, save/generate checks); watch: `sftdoctor watch` defaults. cpu = "
          "thread CPU time of the training thread (robust to other processes on a shared machine).")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"options": vars(opts), "rounds": rounds}, indent=1))

if __name__ == "__main__":
    main()

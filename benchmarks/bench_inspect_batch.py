"""How long `inspect-batch` takes on a realistic batch, beyond interpreter and library imports.

Batch: 4 GSM8K rows (prompt -100, answer + EOS supervised, right padding) padded to 512 tokens,
Qwen2.5 tokenizer (151,665 tokens). Each figure is the median of several repetitions:

- import: `import torch, transformers, sftdoctor` in a fresh interpreter (subprocess);
- tokenizer load: AutoTokenizer.from_pretrained of the folder (the CLI does it once);
- TokenizerInfo: copying what probes need out of the tokenizer;
- probes: the 16 batch probes on a ready context, and each one alone;
- inspect_batch: the whole API call (context, probes, metrics, token samples);
- CLI: `sftdoctor inspect-batch --batch F --tokenizer DIR -q --json R` called in-process once
  the imports are done (what the command costs beyond imports: mostly the tokenizer load), and
  as a subprocess, and that minus the import time (which then also holds transformers' lazy
  imports of its tokenizer modules).

Run: python benchmarks/bench_inspect_batch.py [--reps N] [--markdown]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", REPO.parent / "shared"))
TOKENIZER = SHARED / "tokenizers" / "qwen2.5"
GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"
ROWS, WIDTH = 4, 512


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def subprocess_time(argv: list[str], reps: int, env: dict) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        subprocess.run(argv, check=False, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build_batch(tok):
    import torch

    rows = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()[:ROWS]]
    input_ids = torch.full((ROWS, WIDTH), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((ROWS, WIDTH), -100, dtype=torch.long)
    attention = torch.zeros((ROWS, WIDTH), dtype=torch.long)
    for b, r in enumerate(rows):
        prompt = tok(f"Question: {r['question']}\nAnswer:")["input_ids"]
        answer = tok(" " + r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (prompt + answer)[:WIDTH]
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, len(prompt): len(ids)] = torch.tensor(answer[: len(ids) - len(prompt)])  # prompt stays -100
        attention[b, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--markdown", action="store_true", help="print the figures as a markdown section")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    sub_reps = max(3, args.reps // 2)

    t_import = subprocess_time([sys.executable, "-c", "import torch, transformers, sftdoctor, sftdoctor.probes"],
                               sub_reps, env)

    import torch
    from transformers import AutoTokenizer

    import sftdoctor
    from sftdoctor.api import make_context
    from sftdoctor.context import TokenizerInfo
    from sftdoctor.engine import run_probes
    from sftdoctor.probes import BATCH

    torch.set_num_threads(1)
    t_load = median_time(lambda: AutoTokenizer.from_pretrained(str(TOKENIZER)), max(3, args.reps // 2))
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    batch = build_batch(tok)
    t_info = median_time(lambda: TokenizerInfo.from_tokenizer(tok), args.reps)
    info = TokenizerInfo.from_tokenizer(tok)

    def probes_once():
        ctx = make_context(batch, info)
        return run_probes(ctx, BATCH)

    t_probes = median_time(probes_once, args.reps)
    per_probe = {}
    for p in BATCH:
        def one(p=p):
            ctx = make_context(batch, info)
            ctx.token_classes  # computed once per context and shared by the probes: timed as its own line
            t = time.perf_counter()
            if all(ctx.has(n) for n in p.needs):
                p.check(ctx)
            return time.perf_counter() - t
        per_probe[p.id] = statistics.median(one() for _ in range(args.reps))
    t_classes = median_time(lambda: make_context(batch, info).token_classes, args.reps)
    report = sftdoctor.inspect_batch(batch, tok)
    t_api = median_time(lambda: sftdoctor.inspect_batch(batch, tok), args.reps)

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "batch.pt"
        torch.save(batch, path)
        exe = Path(sys.executable).with_name("sftdoctor")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sftdoctor"]
        from sftdoctor.cli import main as cli_main

        argv = ["inspect-batch", "--batch", str(path), "--tokenizer", str(TOKENIZER), "-q", "--json", str(Path(d) / "r.json")]
        import contextlib
        import io

        def cli_in_process():
            with contextlib.redirect_stdout(io.StringIO()):
                cli_main(argv)

        cli_in_process()  # first call pays transformers' lazy imports of the tokenizer modules
        t_cli_inproc = median_time(cli_in_process, max(3, args.reps // 2))
        t_cli = subprocess_time(cmd + ["inspect-batch", "--batch", str(path), "--tokenizer", str(TOKENIZER), "-q",
                                       "--json", str(Path(d) / "r.json")], sub_reps, env)

    rows = [
        ("import torch, transformers, sftdoctor (fresh interpreter)", t_import),
        ("tokenizer load (AutoTokenizer.from_pretrained)", t_load),
        ("TokenizerInfo.from_tokenizer", t_info),
        ("token classes (padding by position)", t_classes),
        (f"{len(BATCH)} batch probes (context + run_probes)", t_probes),
        ("inspect_batch(batch, tokenizer): whole API call", t_api),
        ("CLI main() in-process after imports (tokenizer load included)", t_cli_inproc),
        ("CLI inspect-batch, wall (subprocess)", t_cli),
        ("CLI inspect-batch beyond imports", t_cli - t_import),
    ]
    print(f"inspect-batch on a {ROWS}x{WIDTH} batch, Qwen2.5 tokenizer ({len(tok)} tokens), verdict "
          f"{report.verdict}; medians of {args.reps} (subprocess: {sub_reps}) runs, torch threads 1")
    width = max(len(n) for n, _ in rows)
    for name, t in rows:
        print(f"  {name:<{width}}  {t * 1000:9.1f} ms")
    print("  slowest probes:")
    for pid, t in sorted(per_probe.items(), key=lambda kv: -kv[1])[:5]:
        print(f"    {pid:<32} {t * 1000:7.2f} ms")
    if args.markdown:
        print("\n### inspect-batch speed\n")
        print(f"A {ROWS}x{WIDTH} GSM8K batch with the Qwen2.5 tokenizer ({len(tok)} tokens); medians of "
              f"{args.reps} runs (`python benchmarks/bench_inspect_batch.py`).\n")
        print("| step | time |\n|---|---:|")
        for name, t in rows:
            print(f"| {name} | {t * 1000:.1f} ms |" if t < 0.1 else f"| {name} | {t * 1000:.0f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Whole-dataset inspection (`inspect-batch --batches all`): what it costs beyond the user's own
DataLoader, and how fast the checks alone run on a 1M-row stream, in constant memory.

Part 1, GSM8K: all 7,473 rows of ../shared/data/gsm8k/train.jsonl through a typical user
pipeline: a map-style Dataset that tokenizes each row in __getitem__ with a fast tokenizer
(Qwen2.5, prompt labels -100, answer + EOS supervised, max_length 512) and a padding collator,
batch size 8. In the same process, in interleaved rounds:
  bare   - the user's own DataLoader (shuffle=False, num_workers=0) producing every batch;
  full   - sftdoctor's draw of the same batches through the same dataset and collator, with
           every batch check on every batch, the per-row statistics and the final report.
The figure is extra = (full - bare) / bare, on CPU time (steady on a shared machine) and wall time.
A second pipeline, pre-tokenized rows (a collator-only loader, the cheapest possible user
DataLoader), shows the checks' cost against almost nothing.

Part 2, stream: a torch IterableDataset of synthetic rows (random ids, lengths 32-384, prompt
masked, EOS supervised; 1,000,000 rows by default, batch 64) checked with --batches all: the
checks-only throughput (rows/s inside DatasetInspector.add) and the resident memory at 10%, 50%
and 100% of the stream (constant apart from 16 bytes per row for duplicate detection).

Run: python benchmarks/dataset_inspect.py [--rounds 3] [--stream-rows 1000000] [--skip-stream]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", REPO.parent / "shared"))
TOKENIZER = SHARED / "tokenizers" / "qwen2.5"
GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"
IGNORE = -100


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def gsm8k_pipeline(tokenizer, max_length: int = 512):
    from torch.utils.data import Dataset

    rows = [json.loads(line) for line in GSM8K.open(encoding="utf-8")]

    class GSM8KDataset(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            r = rows[i]
            prompt = tokenizer(f"Question: {r['question']}\nAnswer:")["input_ids"]
            answer = tokenizer(" " + r["answer"])["input_ids"] + [tokenizer.eos_token_id]
            ids = (prompt + answer)[:max_length]
            return {"input_ids": ids, "labels": ([IGNORE] * len(prompt) + answer)[:max_length]}

    class Pretokenized(Dataset):
        def __init__(self, ds):
            self.items = [ds[i] for i in range(len(ds))]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    def collate(items):
        T = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), T), tokenizer.pad_token_id)
        labels = torch.full((len(items), T), IGNORE)
        attn = torch.zeros((len(items), T), dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            ids[b, :n] = torch.tensor(it["input_ids"])
            labels[b, :n] = torch.tensor(it["labels"])
            attn[b, :n] = 1
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    return GSM8KDataset(), Pretokenized, collate


def timed(fn):
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c, time.perf_counter() - w, out


def part_gsm8k(rounds: int, batch_size: int) -> dict:
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from sftdoctor.dataset import DatasetInspector
    from sftdoctor.draw import Source, check_source

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    ds, Pretokenized, collate = gsm8k_pipeline(tok)
    pre = Pretokenized(ds)
    results = {}
    for name, dataset in (("tokenize in __getitem__", ds), ("pre-tokenized (collate only)", pre)):
        def bare():
            n = 0
            for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=0):
                n += batch["input_ids"].shape[0]
            return n

        def full():
            inspector = DatasetInspector(tok)
            check_source(Source("DataLoader", dataset, collate, batch_size), None, inspector, progress=False)
            report = inspector.report()
            return report

        bare()  # warm up: tokenizer caches, first allocations
        rows = []
        for r in range(rounds):
            order = [("bare", bare), ("full", full)] if r % 2 == 0 else [("full", full), ("bare", bare)]
            got = {}
            for label, fn in order:
                got[label] = timed(fn)
            rows.append(got)
        report = rows[-1]["full"][2]
        extra_cpu = [(g["full"][0] - g["bare"][0]) / g["bare"][0] for g in rows]
        extra_wall = [(g["full"][1] - g["bare"][1]) / g["bare"][1] for g in rows]
        results[name] = {
            "rows": rows[0]["bare"][2], "batches": report.metrics["dataset"]["batches"],
            "bare_cpu_s": statistics.median(g["bare"][0] for g in rows),
            "full_cpu_s": statistics.median(g["full"][0] for g in rows),
            "bare_wall_s": statistics.median(g["bare"][1] for g in rows),
            "full_wall_s": statistics.median(g["full"][1] for g in rows),
            "extra_cpu": statistics.median(extra_cpu), "extra_cpu_range": (min(extra_cpu), max(extra_cpu)),
            "extra_wall": statistics.median(extra_wall), "extra_wall_range": (min(extra_wall), max(extra_wall)),
            "check_rows_per_s": report.metrics["dataset"]["check_rows_per_s"],
            "findings": sorted(f.id for f in report.findings),
        }
    return results


class SyntheticStream(torch.utils.data.IterableDataset):
    """`rows` synthetic rows (or endless with rows=None): random ids, prompt masked, EOS supervised."""

    def __init__(self, rows: int | None, vocab: int = 32000, eos: int = 2, seed: int = 0):
        self.rows, self.vocab, self.eos, self.seed = rows, vocab, eos, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        i = 0
        while self.rows is None or i < self.rows:
            n = int(torch.randint(32, 384, (1,), generator=g))
            p = int(torch.randint(8, n // 2, (1,), generator=g))
            ids = torch.randint(10, self.vocab, (n,), generator=g)
            ids[-1] = self.eos
            labels = ids.clone()
            labels[:p] = IGNORE
            yield ids, labels
            i += 1


def stream_collate(pad: int):
    def collate(items):
        T = max(len(i) for i, _ in items)
        ids = torch.full((len(items), T), pad)
        labels = torch.full((len(items), T), IGNORE)
        attn = torch.zeros((len(items), T), dtype=torch.long)
        for b, (i, lab) in enumerate(items):
            ids[b, :len(i)] = i
            labels[b, :len(i)] = lab
            attn[b, :len(i)] = 1
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}
    return collate


def part_stream(rows: int, batch_size: int) -> dict:
    from sftdoctor.context import TokenizerInfo
    from sftdoctor.dataset import DatasetInspector
    from sftdoctor.draw import Source, draw

    tok = TokenizerInfo(class_name="synthetic", pad_id=0, eos_ids=frozenset({2}), vocab_len=32000)
    inspector = DatasetInspector(tok)
    src = Source("stream", SyntheticStream(rows), stream_collate(0), batch_size)
    marks = {}
    rss0 = rss_mb()
    t0 = time.perf_counter()
    for batch, idx in draw(src, None):
        inspector.add(batch, idx)
        done = inspector.rows
        for frac in (0.1, 0.5):
            if frac not in marks and done >= frac * rows:
                marks[frac] = rss_mb()
    marks[1.0] = rss_mb()
    wall = time.perf_counter() - t0
    report = inspector.report()
    return {"rows": inspector.rows, "batches": inspector.stats.batches, "wall_s": wall,
            "check_s": inspector.check_seconds, "check_rows_per_s": inspector.rows / inspector.check_seconds,
            "rss_start_mb": rss0, "rss_mb": {f"{int(k * 100)}%": round(v, 1) for k, v in sorted(marks.items())},
            "findings": sorted(f.id for f in report.findings)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--stream-rows", type=int, default=1_000_000)
    ap.add_argument("--stream-batch-size", type=int, default=64)
    ap.add_argument("--skip-gsm8k", action="store_true")
    ap.add_argument("--skip-stream", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, one torch thread; load average {os.getloadavg()[0]:.1f}")
    if not args.skip_gsm8k:
        res = part_gsm8k(args.rounds, args.batch_size)
        print(f"\nGSM8K train, Qwen2.5 fast tokenizer, batch {args.batch_size}, medians of {args.rounds} interleaved rounds")
        print(f"{'pipeline':32s} {'rows':>6s} {'bare CPU s':>10s} {'full CPU s':>10s} {'extra (CPU)':>22s} {'extra (wall)':>22s} {'checks rows/s':>13s}")
        for name, r in res.items():
            lo, hi = r["extra_cpu_range"]
            wlo, whi = r["extra_wall_range"]
            print(f"{name:32s} {r['rows']:6d} {r['bare_cpu_s']:10.2f} {r['full_cpu_s']:10.2f} "
                  f"{r['extra_cpu']:6.2f}x [{lo:.2f}-{hi:.2f}] {r['extra_wall']:8.2f}x [{wlo:.2f}-{whi:.2f}] {r['check_rows_per_s']:13,.0f}")
        print("findings on GSM8K train:", ", ".join(next(iter(res.values()))["findings"]) or "none")
    if not args.skip_stream:
        s = part_stream(args.stream_rows, args.stream_batch_size)
        print(f"\nstream: {s['rows']:,} synthetic rows, batch {args.stream_batch_size}, {s['batches']:,} batches")
        print(f"checks only: {s['check_rows_per_s']:,.0f} rows/s ({s['check_s']:.1f} s); whole draw {s['wall_s']:.1f} s")
        print(f"resident memory: start {s['rss_start_mb']:.0f} MB, " + ", ".join(f"{k} {v:.0f} MB" for k, v in s["rss_mb"].items()))
        print("findings:", ", ".join(s["findings"]) or "none")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

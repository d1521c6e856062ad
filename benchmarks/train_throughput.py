"""Supervised tokens per second: `sftdoctor train`'s pipeline vs a plain HF Trainer recipe.

    /work/venv/bin/python benchmarks/train_throughput.py [--rows 384] [--rounds 2] [--json out.json]

Same tiny model (same init), same GSM8K rows, same tokenizer, same batch size, learning rate and
epoch, on the CPU with one thread. The plain recipe is what most scripts do: DataCollatorForSeq2Seq
(dynamic padding to the longest row of each random batch, labels padded with -100) and the
default random sampler. Ours adds length-grouped batches (LengthGroupedSampler) and the rest of
the recipe (per-step logging, example ids, the step probes attached at their default sampling). Runs are interleaved (plain, ours, plain, ours, ...)
so that load from other processes hits both alike; each figure is the median over rounds.

"Final loss" is the token-mean loss on held-out rows after training (same rows for both), so a
faster recipe that learned less would show up there.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"


def held_out_loss(model, batches) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * n
            count += n
    model.train()
    return total / count


def padded_positions(trainer) -> int:
    """Token positions the model computes in one epoch (rows x padded width, summed over
    batches): the load-independent part of the speedup."""
    return sum(b["input_ids"].numel() for b in trainer.get_train_dataloader())


def run_plain(pipe, init_state, out: Path) -> tuple[float, int]:
    import transformers

    model = copy.deepcopy(pipe.model)
    model.load_state_dict(init_state)
    r = pipe.recipe
    rows = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in pipe.train_examples]
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=r.batch_size, learning_rate=r.learning_rate,
        lr_scheduler_type=r.schedule, warmup_steps=r.warmup_ratio, num_train_epochs=r.epochs, max_grad_norm=r.max_grad_norm,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=r.seed,
        dataloader_drop_last=True)
    collator = transformers.DataCollatorForSeq2Seq(pipe.tokenizer, padding=True, label_pad_token_id=-100)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    positions = padded_positions(trainer)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, model, positions


def run_ours(pipe, init_state, out: Path) -> tuple[float, object]:
    from sftdoctor.report import Report
    from sftdoctor.train.steplog import flops_per_token, step_logger_class
    from sftdoctor.train.trainer import attach_probes, make_trainer

    pipe = copy.copy(pipe)
    pipe.model = copy.deepcopy(pipe.model)
    pipe.model.load_state_dict(init_state)
    logger = step_logger_class()(out / "steps.jsonl", Report(command="train"), None, flops_per_token(pipe.model), None, False)
    trainer = make_trainer(pipe, out, on_step=logger)
    trainer.args.save_strategy = "no"  # as the plain run: time the training loop only
    doctor = attach_probes(trainer, pipe.tokenizer, Report(command="train"), set())  # the probes stay attached, as in `sftdoctor train`
    positions = padded_positions(trainer)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    if doctor is not None:
        doctor.detach()
    return seconds, pipe.model, positions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from sftdoctor.train.collate import Collator
    from sftdoctor.train.pipeline import build_pipeline
    from sftdoctor.train.recipe import Recipe

    recipe = Recipe(data=str(GSM8K), train_examples=a.rows, max_length=400, tiny_hidden=128, tiny_layers=4, tiny_vocab=2048,
                    batch_size=a.batch_size, epochs=1, learning_rate=2e-3, eval_limit=64)
    pipe = build_pipeline(recipe)
    init_state = copy.deepcopy(pipe.model.state_dict())
    collate = Collator(pipe.tokenizer.pad_token_id)
    from sftdoctor.train.collate import encode_example

    held = [encode_example(pipe.tokenizer, r) for r in pipe.eval_rows[:64]]
    held_batches = [collate(held[k:k + 16]) for k in range(0, len(held), 16)]
    usable = (len(pipe.train_examples) // a.batch_size) * a.batch_size
    pipe.train_examples = pipe.train_examples[:usable]  # whole batches: both recipes train on every row
    supervised = sum(sum(1 for x in ex["labels"] if x != -100) for ex in pipe.train_examples)
    print(f"{len(pipe.train_examples)} GSM8K rows ({usable} used per epoch), {supervised} supervised tokens; "
          f"tiny Qwen2 {sum(p.numel() for p in pipe.model.parameters()) / 1e6:.2f}M params; batch {a.batch_size}; 1 thread", file=sys.stderr)
    results = {"plain": [], "ours": []}
    losses = {"plain": [], "ours": []}
    positions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(a.rounds):
            for name, fn in (("plain", run_plain), ("ours", run_ours)):
                seconds, model, positions[name] = fn(pipe, init_state, Path(tmp) / f"{name}{k}")
                results[name].append(supervised / seconds)
                losses[name].append(held_out_loss(model, held_batches))
                print(f"round {k} {name:5s}: {seconds:6.1f}s  {supervised / seconds:8.0f} supervised tok/s  held-out loss {losses[name][-1]:.4f}",
                      file=sys.stderr)
    plain, ours = statistics.median(results["plain"]), statistics.median(results["ours"])
    # paired per round (plain then ours, back to back): the ratio is what load from other
    # processes disturbs least
    ratios = [o / p for o, p in zip(results["ours"], results["plain"])]
    table = {
        "rows": len(pipe.train_examples), "supervised_tokens": supervised, "rounds": a.rounds, "batch_size": a.batch_size,
        "plain_supervised_tok_s": round(plain, 1), "ours_supervised_tok_s": round(ours, 1), "speedup": round(statistics.median(ratios), 3), "speedup_per_round": [round(r, 3) for r in ratios],
        "plain_positions": positions["plain"], "ours_positions": positions["ours"],
        "plain_heldout_loss": round(statistics.median(losses["plain"]), 4), "ours_heldout_loss": round(statistics.median(losses["ours"]), 4),
    }
    print("| recipe | supervised tok/s (median) | held-out loss |")
    print("|---|---:|---:|")
    print(f"| plain HF Trainer (DataCollatorForSeq2Seq, random batches) | {plain:.0f} | {table['plain_heldout_loss']:.4f} |")
    print(f"| sftdoctor train (length-grouped) | {ours:.0f} | {table['ours_heldout_loss']:.4f} |")
    print(f"| token positions computed per epoch (rows x padded width) | plain {positions['plain']}, ours {positions['ours']} "
          f"({positions['plain'] / positions['ours']:.2f}x fewer) | |")
    print(f"| speedup (median of paired rounds: {', '.join(f'{r:.2f}' for r in ratios)}) | {statistics.median(ratios):.2f}x | |")
    if a.json:
        Path(a.json).write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

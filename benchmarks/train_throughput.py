"""`sftdoctor train` against the HF Trainer configured as an informed user would configure it.

    python benchmarks/train_throughput.py                      # CPU: tiny row + real-vocabulary row
    python benchmarks/train_throughput.py --quick              # a small smoke run (~2 min here)
    python benchmarks/train_throughput.py --config gpu-0.5b    # CUDA: Qwen2.5-0.5B architecture, bf16

Arms (same model init, same rows, same batch size, learning rate, schedule and epoch):
    ours           sftdoctor train's trainer (make_trainer): length-grouped sampler, the chunked lm_head +
                   loss on the supervised positions only (lean.py), the step probes attached at their
                   default sampling; on CUDA with liger-kernel: Liger's loss kernel and fused RMSNorm/SwiGLU/RoPE
    ours-packed    the same with --packing (padding-free rows, position_ids restarting per row)
    plain          Trainer + DataCollatorForSeq2Seq, random batches
    grouped        Trainer + train_sampling_strategy="group_by_length"
    flat           Trainer + DataCollatorWithFlattening (padding-free), random batches
    liger          Trainer + use_liger_kernel=True (CUDA with liger-kernel installed only)

Per arm: supervised tokens/s (wall clock of trainer.train()), peak memory (CUDA: max allocated;
CPU: the process's peak RSS during the run above its RSS before it, via /proc/self/clear_refs),
held-out loss (token mean over held-out rows, plain forward) and token positions computed per
epoch. Rounds are interleaved (every arm once per round, in a rotating order) so that load from
other processes hits all alike; figures are medians over rounds, speedups are per-round ratios.

Configs:
    cpu-tiny       GSM8K rows at natural length, a tiny Qwen2 (hidden 128, 4 layers) with a BPE vocabulary
                   of 2048 trained on the data, batch 8, fp32, 1 thread
    cpu-vocab      Qwen2.5's real tokenizer and vocabulary (151,936), a small random-init Qwen2 (hidden 64,
                   2 layers), GSM8K problems concatenated into rows of exactly 512 tokens, batch 8 x 512, fp32
    gpu-0.5b       Qwen2.5-0.5B architecture (hidden 896, 24 layers, vocab 151,936, tied), random init,
                   bf16 autocast, batch 8 x 512 filled rows; MFU = 6 N x real tokens/s / peak bf16 FLOP/s
    gpu-0.5b-gsm8k the same model on GSM8K rows at natural length, batch 8
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", REPO.parent / "shared"))
GSM8K = SHARED / "data" / "gsm8k"
QWEN_TOKENIZER = SHARED / "tokenizers" / "qwen2.5"
CUDA = torch.cuda.is_available()


# ---- memory -------------------------------------------------------------------------------------

def _proc_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """CUDA: max allocated during the block. CPU: peak RSS during the block minus RSS before it
    (VmHWM reset through /proc/self/clear_refs; torch has no CPU allocator statistics)."""

    def __enter__(self):
        gc.collect()
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except Exception:
                pass
            self.base = _proc_kb("VmRSS") * 1024
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if CUDA:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            self.above = self.peak - self.base
        else:
            self.peak = _proc_kb("VmHWM") * 1024
            self.above = self.peak - self.base
        return False


# ---- data and models ----------------------------------------------------------------------------

def fill_rows(examples: list[dict], width: int) -> list[dict]:
    """GSM8K problems concatenated (prompt masked, answer + EOS supervised) into rows of exactly
    `width` tokens: every batch is B x width with no padding (the issue's 8 x 512 shape)."""
    out, ids, labels, k = [], [], [], 0
    for ex in examples:
        ids += ex["input_ids"]
        labels += ex["labels"]
        while len(ids) >= width:
            out.append({"input_ids": ids[:width], "labels": labels[:width], "prompt_length": 0, "id": k})
            ids, labels, k = ids[width:], labels[width:], k + 1
    return out


def qwen_config(vocab: int, hidden: int, layers: int, heads: int, kv: int, ffn: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=ffn, max_position_embeddings=32768, rope_theta=1e6,
                       tie_word_embeddings=True, use_cache=False, rms_norm_eps=1e-6)


def build(config: str, rows: int, quick: bool, small: bool = False):
    """(pipeline, held-out batches, description)."""
    from sftdoctor.train.collate import Collator, PackedCollator, encode_example
    from sftdoctor.train.data import load_rows
    from sftdoctor.train.pipeline import Pipeline, build_pipeline
    from sftdoctor.train.recipe import Recipe

    if config == "cpu-tiny":
        recipe = Recipe(data=str(GSM8K), train_examples=rows, max_length=400, tiny_hidden=128, tiny_layers=4, tiny_vocab=2048,
                        batch_size=8, epochs=1, learning_rate=2e-3, eval_limit=64, dtype="fp32")
        pipe = build_pipeline(recipe)
        usable = (len(pipe.train_examples) // 8) * 8
        pipe.train_examples = pipe.train_examples[:usable]  # whole batches: every arm trains on every row
        held = [encode_example(pipe.tokenizer, r) for r in pipe.eval_rows[:64]]
        desc = f"tiny Qwen2 h128 L4, BPE vocab {len(pipe.tokenizer)}, GSM8K natural-length rows, batch 8, fp32"
    else:
        from transformers import AutoTokenizer, Qwen2ForCausalLM

        gpu = config.startswith("gpu")
        filled = config in ("cpu-vocab", "gpu-0.5b")
        tok = AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        cfg = (qwen_config(151936, 896, 24, 14, 2, 4864) if gpu and not small else qwen_config(151936, 64, 2, 4, 2, 256))
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg)
        model.config.pad_token_id = tok.pad_token_id
        train_rows, eval_rows, source = load_rows(str(GSM8K), data_config="main", levels="1", train_examples=0, eval_limit=64, seed=0)
        steps = rows // 8
        encoded = [encode_example(tok, r) for r in train_rows[: (steps * 8 * 4 if filled else steps * 8)]]
        examples = fill_rows(encoded, 512)[: steps * 8] if filled else [e for e in encoded if len(e["input_ids"]) <= 512][: steps * 8]
        held_src = [encode_example(tok, r) for r in eval_rows[:32]]
        held = fill_rows(held_src, 512)[:8] if filled else held_src
        recipe = Recipe(model="qwen2.5-arch", data=str(GSM8K), batch_size=8, epochs=1, learning_rate=1e-4 if gpu else 2e-3,
                        dtype="bf16" if gpu else "fp32", max_length=512)
        pipe = Pipeline(recipe=recipe, tokenizer=tok, model=model, train_rows=train_rows, eval_rows=eval_rows, train_examples=examples,
                        collate=Collator(tok.pad_token_id), dtype=recipe.dtype,
                        dtype_reason="benchmark", source=source)
        desc = (f"random-init Qwen2 {'h896 L24 (Qwen2.5-0.5B architecture)' if gpu and not small else 'h64 L2'}, Qwen2.5 vocab 151936, "
                + ("GSM8K problems filled into 8 x 512 rows" if filled else "GSM8K natural-length rows, batch 8")
                + (", bf16 autocast" if gpu else ", fp32"))
    collate = Collator(pipe.tokenizer.pad_token_id)
    held_batches = [collate(held[k:k + 8]) for k in range(0, len(held), 8)]
    return pipe, held_batches, desc


def held_out_loss(model, batches) -> float:
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=CUDA):
        for b in batches:
            b = {k: v.to(dev) for k, v in b.items()}
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * n
            count += n
    model.train(was)
    return total / count


# ---- arms ---------------------------------------------------------------------------------------

def trainer_args(pipe, out: Path, **extra):
    import transformers

    r = pipe.recipe
    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=r.batch_size, learning_rate=r.learning_rate,
        lr_scheduler_type=r.schedule, warmup_steps=r.warmup_ratio, num_train_epochs=r.epochs, max_grad_norm=r.max_grad_norm,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not CUDA, seed=r.seed,
        dataloader_drop_last=True, bf16=pipe.dtype == "bf16", **extra)


def run_hf(kind: str):
    def run(pipe, base, out: Path):
        import transformers

        model = copy.deepcopy(base)
        rows = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in pipe.train_examples]
        extra = {}
        if kind == "grouped":
            extra["train_sampling_strategy"] = "group_by_length"
        if kind == "liger":
            extra["use_liger_kernel"] = True
        if kind == "flat":
            collator = transformers.DataCollatorWithFlattening()
        else:
            collator = transformers.DataCollatorForSeq2Seq(pipe.tokenizer, padding=True, label_pad_token_id=-100)
        trainer = transformers.Trainer(model=model, args=trainer_args(pipe, out, **extra), train_dataset=rows, data_collator=collator)
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        return trainer, model, None
    return run


def run_ours(pipe, base, out: Path, packed: bool = False, kernel: str = "torch", probes: bool = True):
    from sftdoctor.report import Report
    from sftdoctor.train.collate import PackedCollator
    from sftdoctor.train.steplog import flops_per_token, step_logger_class
    from sftdoctor.train.trainer import attach_probes, make_trainer

    pipe = copy.copy(pipe)
    pipe.notes = []
    pipe.model = copy.deepcopy(base)
    pipe.recipe = pipe.recipe.replace(loss_kernel=kernel)
    if packed:  # what pipeline.py does for --packing
        pipe.recipe = pipe.recipe.replace(packing=True)
        pipe.collate = PackedCollator()
        pipe.model.config.use_cache = False
    logger = step_logger_class()(out / "steps.jsonl", Report(command="train"), None, flops_per_token(pipe.model), None, False)
    trainer = make_trainer(pipe, out, on_step=logger)
    trainer.args.save_strategy = "no"  # as the Trainer arms: time the training loop only
    doctor = attach_probes(trainer, pipe.tokenizer, Report(command="train"), set()) if probes else None  # attached, as in `sftdoctor train`
    return trainer, pipe.model, doctor


ARMS = {"ours": run_ours, "ours-packed": lambda p, b, o: run_ours(p, b, o, packed=True),
        "ours-liger": lambda p, b, o: run_ours(p, b, o, kernel="liger"), "ours-noprobes": lambda p, b, o: run_ours(p, b, o, probes=False), "plain": run_hf("plain"), "grouped": run_hf("grouped"), "flat": run_hf("flat"), "liger": run_hf("liger")}


def liger_installed() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return False
    return True


class RestoreModules:
    """Liger patches transformers' modeling modules (RoPE, RMSNorm, MLP classes, the CausalLM
    forward) process-wide; undo that after an arm so the next arm runs what it would alone."""

    def __enter__(self):
        import transformers.models.qwen2.modeling_qwen2 as m

        self.module = m
        self.saved = dict(vars(m))
        self.classes = {k: dict(vars(v)) for k, v in vars(m).items() if isinstance(v, type) and v.__module__ == m.__name__}
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(self.module, k, v)
        for name, d in self.classes.items():
            cls = self.saved[name]
            for k in list(vars(cls)):
                if k not in d:
                    try:
                        delattr(cls, k)
                    except (AttributeError, TypeError):
                        pass
            for k, v in d.items():
                if k not in ("__dict__", "__weakref__") and vars(cls).get(k) is not v:
                    try:
                        setattr(cls, k, v)
                    except (AttributeError, TypeError):
                        pass
        return False


def measure(name: str, pipe, base, out: Path, supervised: int, real: int, held_batches) -> dict:
    with RestoreModules():
        trainer, model, doctor = ARMS[name](pipe, base, out)
        positions = sum(b["input_ids"].numel() for b in trainer.get_train_dataloader())
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            trainer.train()
            if CUDA:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        if doctor is not None:
            doctor.detach()
        lean = getattr(trainer, "lean", None)
        if lean is not None:
            lean.enabled = False
        loss = held_out_loss(model, held_batches)
    del trainer, model
    gc.collect()
    return {"seconds": seconds, "supervised_tok_s": supervised / seconds, "real_tok_s": real / seconds, "peak_bytes": mem.above,
            "peak_total_bytes": mem.peak, "heldout_loss": loss, "positions": positions}


def run_config(config: str, rows: int, rounds: int, quick: bool, arms: list[str], warmup: int = 0, small: bool = False) -> dict:
    pipe, held_batches, desc = build(config, rows, quick, small)
    if config in ("cpu-vocab", "gpu-0.5b"):  # rows filled to 512 tokens: no padding to remove
        arms = [a for a in arms if a != "ours-packed"]
    if CUDA:
        pipe.model.to("cuda")
    base = copy.deepcopy(pipe.model)
    supervised = sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in pipe.train_examples)
    real = sum(len(ex["input_ids"]) for ex in pipe.train_examples)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"\n== {config}: {desc}; {len(pipe.train_examples)} rows, {real} real tokens, {supervised} supervised; "
          f"{n_params / 1e6:.1f}M params; {rounds} rounds", file=sys.stderr)
    res: dict[str, list[dict]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(warmup + rounds):
            order = arms[k % len(arms):] + arms[:k % len(arms)]  # rotate who goes first
            for name in order:
                m = measure(name, pipe, base, Path(tmp) / f"{name}{k}", supervised, real, held_batches)
                if k >= warmup:  # warm-up rounds (CUDA: Triton/cuBLAS autotuning, allocator) are not counted
                    res[name].append(m)
                print(f"  round {k}{' (warm-up)' if k < warmup else ''} {name:8s} {m['seconds']:7.2f}s {m['supervised_tok_s']:9.0f} sup tok/s  peak +{m['peak_bytes'] / 2**20:8.0f} MiB"
                      f"  held-out {m['heldout_loss']:.4f}  positions {m['positions']}", file=sys.stderr)
    peak = None
    if CUDA:
        from sftdoctor.train.steplog import peak_flops

        peak = peak_flops()
    table = {"config": config, "description": desc, "rows": len(pipe.train_examples), "supervised_tokens": supervised,
             "real_tokens": real, "params": n_params, "rounds": rounds, "device": torch.cuda.get_device_name(0) if CUDA else "cpu",
             "arms": {}}
    trainer_arms = [a for a in arms if not a.startswith("ours")]
    for a in arms:
        ms = res[a]
        row = {"supervised_tok_s": statistics.median(m["supervised_tok_s"] for m in ms),
               "real_tok_s": statistics.median(m["real_tok_s"] for m in ms),
               "peak_mib": statistics.median(m["peak_bytes"] for m in ms) / 2**20,
               "peak_total_mib": statistics.median(m["peak_total_bytes"] for m in ms) / 2**20,
               "heldout_loss": statistics.median(m["heldout_loss"] for m in ms), "positions": ms[0]["positions"],
               "per_round_supervised_tok_s": [round(m["supervised_tok_s"], 1) for m in ms]}
        if peak:
            row["mfu"] = 6 * n_params * row["real_tok_s"] / peak
        if not a.startswith("ours") and "ours" in res:
            row["ours_speedup_per_round"] = [round(o["supervised_tok_s"] / m["supervised_tok_s"], 3) for o, m in zip(res["ours"], ms)]
            row["ours_speedup"] = statistics.median(row["ours_speedup_per_round"])
            row["ours_memory_ratio"] = (statistics.median(o["peak_bytes"] for o in res["ours"]) / max(1, statistics.median(m["peak_bytes"] for m in ms)))
        table["arms"][a] = row
    if "ours" in res and trainer_arms:
        best = max(trainer_arms, key=lambda a: table["arms"][a]["supervised_tok_s"])
        o, b = table["arms"]["ours"], table["arms"][best]
        table["goal"] = {"best_trainer_arm": best, "speedup_vs_best": b["ours_speedup"],
                         "heldout_loss_rel_diff": (o["heldout_loss"] - b["heldout_loss"]) / b["heldout_loss"],
                         "memory_ratio_vs_plain": table["arms"].get("plain", b).get("ours_memory_ratio"),
                         "memory_ratio_vs_best": b["ours_memory_ratio"]}
    return table


LABELS = {"ours": "sftdoctor train (length-grouped, lean loss, probes)", "ours-packed": "sftdoctor train --packing (padding-free, lean loss, probes)",
          "ours-liger": "sftdoctor train --loss-kernel liger (Liger loss + RMSNorm/SwiGLU/RoPE kernels)", "ours-noprobes": "sftdoctor trainer without the probes attached", "plain": "Trainer, DataCollatorForSeq2Seq",
          "grouped": "Trainer, group_by_length", "flat": "Trainer, DataCollatorWithFlattening", "liger": "Trainer, use_liger_kernel"}


def markdown(table: dict) -> str:
    lines = [f"### {table['config']}: {table['description']} ({table['device']}, {table['rounds']} rounds)", "",
             "| arm | supervised tok/s | ours / arm (per round) | peak step memory MiB | held-out loss | positions/epoch |"
             + (" MFU |" if any("mfu" in r for r in table["arms"].values()) else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if any("mfu" in r for r in table["arms"].values()) else "")]
    for a, r in table["arms"].items():
        ratio = "" if a.startswith("ours") else f"{r['ours_speedup']:.2f}x ({', '.join(f'{x:.2f}' for x in r['ours_speedup_per_round'])})"
        lines.append(f"| {LABELS[a]} | {r['supervised_tok_s']:.0f} | {ratio} | {r['peak_mib']:.0f} | {r['heldout_loss']:.4f} | {r['positions']} |"
                     + (f" {r['mfu']:.1%} |" if "mfu" in r else ""))
    g = table.get("goal")
    if g:
        lines += ["", f"goal: ours / best Trainer arm ({g['best_trainer_arm']}) = {g['speedup_vs_best']:.2f}x tokens/s (>= 1.25), "
                      f"held-out loss {g['heldout_loss_rel_diff']:+.2%} (within 1%); peak step memory ours / plain Trainer = "
                      f"{g['memory_ratio_vs_plain']:.2f} (<= 0.5)"]
    lines.append(f"real tokens {table['real_tokens']}, supervised {table['supervised_tokens']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", choices=("cpu-tiny", "cpu-vocab", "gpu-0.5b", "gpu-0.5b-gsm8k"),
                    help="default: cpu-tiny and cpu-vocab on the CPU; gpu-0.5b and gpu-0.5b-gsm8k on CUDA")
    ap.add_argument("--rows", type=int, default=0, help="training rows of cpu-tiny (default 384; --quick 96)")
    ap.add_argument("--vocab-steps", type=int, default=0, help="optimizer steps of the 8 x 512 rows (default 6 CPU, 30 GPU; --quick 2)")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3; --quick 1)")
    ap.add_argument("--arms", default="", help="comma-separated subset of " + ",".join(ARMS))
    ap.add_argument("--warmup-rounds", type=int, default=-1, help="rounds run first and not counted (default: 1 on CUDA, 0 on the CPU)")
    ap.add_argument("--small", action="store_true", help="gpu configs with the small h64 L2 model (to try the script on the CPU)")
    ap.add_argument("--quick", action="store_true", help="small sizes, one round: for iterating")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--md", metavar="PATH")
    a = ap.parse_args(argv)
    if not CUDA:
        torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore")
    configs = a.config or (["gpu-0.5b", "gpu-0.5b-gsm8k"] if CUDA else ["cpu-tiny", "cpu-vocab"])
    rounds = a.rounds or (1 if a.quick else (2 if CUDA else 3))
    arms = [x for x in (a.arms.split(",") if a.arms else ARMS) if x]
    arms = [x for x in arms if x not in ("liger", "ours-liger") or (CUDA and liger_installed())]
    if not a.arms:
        arms = [x for x in arms if x != "ours-noprobes"]
    tables = []
    for c in configs:
        if c == "cpu-tiny":
            rows = a.rows or (96 if a.quick else 384)
        else:
            rows = 8 * (a.vocab_steps or (2 if a.quick else (30 if CUDA else 6)))
        warmup = a.warmup_rounds if a.warmup_rounds >= 0 else (1 if CUDA else 0)
        tables.append(run_config(c, rows, rounds, a.quick, arms, warmup, a.small))
        print(markdown(tables[-1]) + "\n", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(tables, indent=1) + "\n")
    if a.md:
        Path(a.md).write_text("\n\n".join(markdown(t) for t in tables) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The recipe on top of HF `Trainer`: preflight, training, save, reload check, evaluation.

    recipe -> pipeline -> preflight (--fix) -> Trainer.train -> save -> reload + checks -> eval -> report

Only rank 0 prints and writes; every rank trains.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..attach import attach
from ..errors import UserError
from ..findings import Finding
from ..probes import REGISTRY
from ..report import Report
from ..session import Session
from ..textsafe import terminal_safe
from .collate import WithExampleIds
from .pipeline import Pipeline, build_pipeline, stop_ids, world_size
from .preflight import PREFLIGHT_BATCHES, apply_fixes, run_preflight
from .recipe import Recipe
from .steplog import STEPS_FILE, flops_per_token, is_main, peak_flops, step_logger_class

REPORT_FILE = "report.json"


# ---- the Trainer ------------------------------------------------------------------------------

def make_trainer(pipe: Pipeline, output_dir: Path, *, on_step: Any, extra_callbacks: list | None = None):
    import transformers

    from .collate import LengthGroupedSampler

    r = pipe.recipe
    global_batch = r.batch_size * r.grad_accum * world_size()
    lengths = pipe.lengths()

    class RecipeTrainer(transformers.Trainer):
        """HF Trainer with a deterministic length-grouped sampler and per-step example ids."""

        def _get_train_sampler(self, train_dataset=None):
            # Same (seed, epoch) -> same order, so --resume can skip exactly the batches done.
            return LengthGroupedSampler(lengths, global_batch, r.seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs.pop("example_ids", None)
            if ids is not None:
                on_step.seen(ids.tolist(), inputs)
            # num_items_in_batch = supervised tokens of the whole accumulated batch on all ranks
            # (Trainer.get_batch_samples); the model's loss is sum(token losses) / num_items_in_batch,
            # so every supervised token weighs the same whatever its micro-batch.
            on_step.num_items = num_items_in_batch
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    use_cuda = torch.cuda.is_available()
    if pipe.dtype == "fp16" and not use_cuda:
        raise UserError("--dtype fp16 needs a CUDA GPU (mixed precision with a loss scaler); use --dtype fp32 on the CPU")
    if pipe.dtype == "bf16" and use_cuda and not torch.cuda.is_bf16_supported():
        raise UserError("--dtype bf16: this GPU does not support bf16; use --dtype fp32")
    args = transformers.TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        per_device_train_batch_size=r.batch_size,
        gradient_accumulation_steps=r.grad_accum,
        learning_rate=r.learning_rate,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(r.schedule, r.schedule),
        warmup_steps=r.warmup_ratio,  # a float < 1 is a share of the total steps
        weight_decay=r.weight_decay,
        max_grad_norm=r.max_grad_norm,  # gradient clipping on the global norm
        num_train_epochs=r.epochs,
        max_steps=r.max_steps or -1,  # > 0 overrides num_train_epochs (--max-steps)
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN loss must be seen, not filtered out of the logs
        save_strategy="steps" if r.save_every else "epoch",
        save_steps=r.save_every or 500,
        save_total_limit=3,
        seed=r.seed,
        bf16=pipe.dtype == "bf16",
        fp16=pipe.dtype == "fp16",  # autocast fp16 with fp32 master weights and a GradScaler
        use_cpu=not use_cuda,
        report_to="none",
        disable_tqdm=True,  # rich progress instead (rank 0)
        remove_unused_columns=False,  # the collator needs prompt_length and id
        dataloader_num_workers=0,
        ddp_backend="gloo" if (world_size() > 1 and not use_cuda) else None,
        average_tokens_across_devices=True,
    )
    lean = install_lean_loss(pipe)  # before the Trainer wraps the forward (autocast)
    trainer = RecipeTrainer(model=pipe.model, args=args, train_dataset=pipe.train_examples,
                            data_collator=WithExampleIds(pipe.collate), callbacks=[on_step, *(extra_callbacks or [])])
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # steps.jsonl and the rich bar instead
    if not trainer.model_accepts_loss_kwargs:  # never true for HF causal LMs today; kept honest
        raise UserError(f"{type(pipe.model).__name__} does not accept num_items_in_batch; its loss would be averaged per micro-batch")
    trainer.lean = lean
    return trainer


def install_lean_loss(pipe: Pipeline):
    """The chunked lm_head + cross-entropy (lean.py) on the model, per --lean-loss; None when off
    or when the model cannot take it (the reason goes to the notes)."""
    from .lean import LeanLoss, supports_lean

    if pipe.recipe.lean_loss == "off":
        return None
    why_not = supports_lean(pipe.model)
    if why_not:
        pipe.notes.append(f"lean loss off: {why_not}")
        return None
    existing = getattr(pipe.model, "_sftdoctor_lean", None)
    if existing is not None:  # a second Trainer on the same model: reuse the installed forward
        existing.enabled = True
        return existing
    from .lean import apply_fused_kernels, liger_available

    backend = "torch"
    if pipe.recipe.loss_kernel == "liger":
        if liger_available(torch.device("cuda")):
            backend = "liger"
            fused = apply_fused_kernels(pipe.model)
            pipe.notes.append(f"loss kernel: liger fused linear cross-entropy; fused kernels: {fused}")
        else:
            pipe.notes.append("loss kernel: liger asked for but needs CUDA and liger-kernel installed; using the torch chunked loss")
    lean = LeanLoss(pipe.model, backend=backend)
    pipe.model._sftdoctor_lean = lean
    return lean


def lean_loss_info(lean: Any, mode: str, doctor: Any) -> dict[str, Any]:
    """What the lean loss did and which checks it turned off during training (report.metrics)."""
    from .lean import liger_available

    if lean is None:
        return {"mode": "off"}
    device = next(lean.model.parameters()).device
    logit_checks = sorted({i for p in REGISTRY.at("step") if {"forward_stats", "logits_grad"} & set(p.needs) for i in p.ids})
    info: dict[str, Any] = {"mode": mode, "backend": "liger" if lean.backend == "liger" or (lean.backend == "auto" and liger_available(device)) else "torch",
                            "lean_steps": lean.lean_steps, "full_logits_steps": lean.full_steps}
    if mode == "always" or doctor is None:
        info["checks_off_during_training"] = logit_checks
        info["why"] = ("the full logits are never materialised during training, so the checks that read the logits or their "
                       "gradient ran at preflight on the first batches only (--lean-loss sampled runs them on the sampled steps too)")
    else:
        info["why"] = "the steps the probes sample compute the full logits, so every logit check runs on them"
    return info


# ---- the run ----------------------------------------------------------------------------------

def prepare_output_dir(recipe: Recipe, resume: bool, overwrite: bool, *, dry_run: bool = False, say=print) -> tuple[Path, str]:
    """(the output folder, the report file name in it). Deletes only what train wrote (rundir)."""
    from .rundir import prepare

    out = Path(recipe.output_dir or time.strftime("runs/train-%Y%m%d-%H%M%S"))
    report_name = prepare(out, resume=resume, overwrite=overwrite, dry_run=dry_run, main=is_main(), say=say)
    if world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out, report_name


def set_threads(recipe: Recipe) -> int:
    """CPU threads: --threads, else the cores not already busy (load average), split between
    the local processes. Measured on a shared 2-core machine: with the cores busy, 2 threads
    made a tiny model's step 10x slower than 1 thread (threads spin waiting for each other)."""
    if torch.cuda.is_available():
        return torch.get_num_threads()
    if recipe.threads:
        n = recipe.threads
    else:
        cores = os.cpu_count() or 1
        idle = cores - os.getloadavg()[0] if hasattr(os, "getloadavg") else cores
        n = max(1, min(8, int(idle)))
        n = max(1, n // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(n)
    return n


def console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)  # one line per message, never re-wrapped


def run(recipe: Recipe, *, fix: bool = False, resume: bool = False, overwrite: bool = False, ignore: set[str] = frozenset(),
        show_progress: bool = True, dry_run: bool = False, say=None) -> tuple[Report, Path]:
    """Train per the recipe. Returns (report, output dir). The report's verdict is fail when
    preflight refused the run or a probe stopped it. dry_run: stop after preflight (and --fix)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    main = is_main()
    quiet_libraries()
    err = console()
    say = say or ((lambda text: err.print(terminal_safe(text), highlight=False, markup=False)) if main else (lambda text: None))
    threads = set_threads(recipe)
    torch.manual_seed(recipe.seed)
    out, report_name = prepare_output_dir(recipe, resume, overwrite, dry_run=dry_run, say=say)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=err, transient=True) if (main and show_progress and err.is_terminal) else None

    session = Session("train", REGISTRY, ignore=ignore)
    report = session.report
    report.metrics["recipe"] = recipe.to_dict()
    report.environment["threads"] = threads
    report.environment["world_size"] = world_size()

    with (progress if progress is not None else nullcontext()):
        pipe = build_pipeline(recipe, progress=progress)
    say(f"data: {pipe.source}: {len(pipe.train_examples)} training rows, {len(pipe.eval_rows)} held out")
    say(f"model: {recipe.model} ({sum(p.numel() for p in pipe.model.parameters()) / 1e6:.2f}M parameters); dtype {pipe.dtype} ({pipe.dtype_reason})")
    for note in pipe.notes:
        say(f"note: {note}")

    # ---- preflight ------------------------------------------------------------------------
    pipe, pre, preflight_info = preflight_stage(pipe, fix=fix, ignore=ignore, say=say)
    session.merge(pre)
    report.samples = pre.samples
    report.metrics.update(pre.metrics)
    report.metrics["preflight"] = preflight_info
    report.metrics["recipe"] = pipe.recipe.to_dict()
    if pre.verdict == "fail":
        report.run = {"status": "refused", "stage": "preflight", "exit_code": 1,
                      "message": "preflight found failures; nothing was trained" + ("" if fix else " (--fix repairs what it can)")}
        _write_report(session, out, report_name)
        return session.finish(), out
    report.metrics["data"] = {"source": pipe.source, "train_rows": len(pipe.train_examples), "eval_rows": len(pipe.eval_rows),
                              **pipe.length_stats, "notes": pipe.notes}
    recipe = pipe.recipe
    if dry_run:
        report.run = {"status": "dry-run", "stage": "preflight", "exit_code": 1 if report.verdict == "fail" else 0,
                      "message": "preflight passed; --dry-run stops before training"}
        _write_report(session, out, report_name)
        return session.finish(), out

    # ---- training -------------------------------------------------------------------------
    StepLogger = step_logger_class()
    logger = StepLogger(out / STEPS_FILE, session, progress, flops_per_token(pipe.model), peak_flops(), bool(recipe.save_every))
    trainer = make_trainer(pipe, out, on_step=logger)
    doctor = attach_probes(trainer, pipe.tokenizer, session)
    if trainer.lean is not None and recipe.lean_loss == "sampled" and doctor is not None:
        # the probes' forward pre-hook has decided whether this step is sampled before the forward runs
        trainer.lean.want_logits = lambda: doctor.observer.observing_fully
    resume_from = None
    if resume:
        from .rundir import checkpoint_step, newest_complete_checkpoint, trim_steps_log

        resume_from, skipped = newest_complete_checkpoint(out)
        for name, why in skipped:  # a kill or a full disk during its save
            say(f"resume: skipped {name}: {why}")
        if resume_from is None:
            say(f"resume: no complete checkpoint in {out / 'checkpoints'}; starting from the beginning")
        else:
            step = checkpoint_step(resume_from)
            dropped, torn = trim_steps_log(out, step) if main else (0, 0)
            say(f"resume: from {resume_from.name} (step {step}); {dropped} logged steps after it are redone"
                + (f"; {torn} torn line(s) of {STEPS_FILE} dropped" if torn else ""))
            report.run["resumed_from"] = str(resume_from)
    if main and resume_from is None and (out / STEPS_FILE).exists():
        (out / STEPS_FILE).unlink()
    started = time.time()
    with (progress if progress is not None else nullcontext()):
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (cli.signals): the report is still written
            report.run = {**report.run, "status": "interrupted", "stage": "training", "exit_code": getattr(e, "exit_code", 130),
                          "message": f"{getattr(e, 'signal_name', 'SIGINT')} at step {trainer.state.global_step}; "
                                     "pass --resume to continue from the last checkpoint"}
            report.metrics["steps"] = [{k: rec.get(k) for k in ("step", "loss", "grad_norm", "lr")} for rec in _all_steps(out, logger)]
            _write_report(session, out)
            return session.finish(), out
        finally:
            if trainer.lean is not None:
                trainer.lean.enabled = False  # the model's own forward from here on (save, checks, evaluation)
    if doctor is not None:
        try:
            session.merge(doctor.report())
            doctor.detach()
        except Exception as e:  # the attached probes must never take the run down
            report.run["probe_error"] = f"{type(e).__name__}: {e}"
    report.metrics["train"] = {**logger.throughput(), "steps": trainer.state.global_step, "wall_seconds": round(time.time() - started, 2),
                               # HF Trainer passes num_items_in_batch (checked in make_trainer)
                               "loss_normalisation": "sum over supervised tokens / supervised tokens of the accumulated batch, all ranks",
                               "lean_loss": lean_loss_info(trainer.lean, recipe.lean_loss, doctor), "packing": recipe.packing,
                               "final_loss": logger.records[-1]["loss"] if logger.records else None,
                               "first_loss": logger.records[0]["loss"] if logger.records else None}
    report.metrics["steps"] = [{k: rec[k] for k in ("step", "loss", "grad_norm", "lr")} for rec in _all_steps(out, logger)]
    if report.verdict == "fail":
        report.run = {**report.run, "status": "stopped", "stage": "training", "exit_code": 1,
                      "message": "a probe found a failure during training; training stopped"}
        if main:
            _write_report(session, out)
        return session.finish(), out

    # ---- save, reload, check, evaluate (rank 0) --------------------------------------------
    final = out / "final"
    _configure_generation(pipe)
    trainer.save_model(str(final))
    if not main:
        return session.finish(), out
    pipe.tokenizer.save_pretrained(str(final))
    from .. import trainmeta  # what diagnose needs: prompt format, questions, end tokens, training evidence

    trainmeta.from_train_run(final, pipe, report)
    say(f"saved: {final}")
    from .checks import check_saved

    model = check_saved(final, session, pipe, say)
    if model is not None and pipe.eval_rows:
        from .evaluate import evaluate

        budget = recipe.max_new_tokens or max(32, int(1.5 * max(len(ex["input_ids"]) - ex["prompt_length"] for ex in pipe.train_examples)))
        with (progress if progress is not None else nullcontext()):
            report.metrics["eval"] = evaluate(model, pipe.tokenizer, pipe.eval_rows, prompt_format=recipe.prompt_format,
                                              stop=stop_ids(pipe.tokenizer, recipe.prompt_format), max_new_tokens=budget,
                                              batch_size=recipe.eval_batch_size, progress=progress)
        ev = report.metrics["eval"]
        trainmeta.update(final, eval_accuracy=ev.get("accuracy"), eval_stop_rate=ev.get("stop_rate"))
        say(f"eval: {ev['examples']} held-out problems: exact match {ev['accuracy']:.1%}, format {ev['format_rate']:.1%}, stop {ev['stop_rate']:.1%}")
    t = report.metrics["train"]
    if logger.records:
        say(f"train: {t['steps']} steps, loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}, {t['tokens_per_s']:.0f} tokens/s "
            f"({t['supervised_tokens_per_s']:.0f} supervised)" + (f", MFU {t['mfu']:.1%}" if "mfu" in t else ""))
    else:
        say(f"train: no step left to run ({t['steps']} steps were done before)")
    report.run = {**report.run, "status": "completed", "exit_code": 1 if report.verdict == "fail" else 0, "output_dir": str(out), "final_model": str(final)}
    _write_report(session, out)
    return session.finish(), out


def preflight_stage(pipe: Pipeline, *, fix: bool, ignore: set[str], say) -> tuple[Pipeline, Report, dict[str, Any]]:
    """Probes on the first real batches; with --fix, apply the remedies, print each change and
    run preflight again. Returns the (possibly rebuilt) pipeline, the last preflight report and
    what happened, for report.metrics["preflight"]."""
    global_batch = pipe.recipe.batch_size * pipe.recipe.grad_accum * world_size()
    pre = run_preflight(pipe, global_batch=global_batch, ignore=ignore)
    info: dict[str, Any] = {"batches_checked": PREFLIGHT_BATCHES + 1, "findings": [f.id for f in pre.findings], "changes": [], "fixed": []}
    if not fix or not pre.findings:
        return pipe, pre, info
    fixed_pipe, changes = apply_fixes(pipe, pre)
    if not changes:
        return pipe, pre, info
    say("preflight: --fix changed:")
    for c in changes:
        say(f"  {c.line()}")
    answered = {i for c in changes for i in c.findings}
    before, pre = pre, run_preflight(fixed_pipe, global_batch=global_batch, ignore=ignore)
    info["changes"] = [c.to_dict() for c in changes]
    # fixed: answered by a change and gone when preflight runs again
    info["fixed"] = [f.to_dict() for f in before.findings if f.id in answered and f.id not in pre.ids()]
    info["confirmed"] = pre.verdict != "fail"
    say("preflight: re-run after the fixes: " + ("no fail finding" if info["confirmed"] else "still failing"))
    return fixed_pipe, pre, info


def _all_steps(out: Path, logger: Any) -> list[dict]:
    """Every step of the run, also those logged before a resume (from steps.jsonl; a torn line is dropped)."""
    path = out / STEPS_FILE
    if is_main() and path.is_file():
        from .rundir import read_steps

        return read_steps(path)[0]
    return logger.records


def _configure_generation(pipe: Pipeline) -> None:
    """The saved generation config stops on every token the model was trained to end with."""
    stops = stop_ids(pipe.tokenizer, pipe.recipe.prompt_format)
    gc = pipe.model.generation_config
    gc.eos_token_id = stops if len(stops) > 1 else stops[0]
    gc.pad_token_id = pipe.tokenizer.pad_token_id
    if pipe.recipe.packing:
        pipe.model.config.use_cache = True  # off only for packed training (pipeline.py); inference wants it
    pipe.model.config.eos_token_id = pipe.tokenizer.eos_token_id


def attach_probes(trainer: Any, tokenizer: Any, session: Session):
    """Keep the step/run probes attached during training; a fail finding stops training with the report."""

    def on_finding(finding: Finding) -> None:
        if finding.severity == "fail":
            session.record([finding], [])  # kept even when training ends before the Doctor's report is merged
            trainer.control.should_training_stop = True

    try:
        return attach(trainer, tokenizer, on_finding=on_finding, ignore=session.ignore, command="train",
                      registry=session.registry)
    except Exception as e:  # our bug: said in the report (an internal error), never a lost run
        session.report.run["probe_error"] = f"attach: {type(e).__name__}: {e}"
        return None


def _write_report(session: Session, out: Path, name: str = REPORT_FILE) -> None:
    """report.run["report_file"] says where it went: a full disk or a read-only folder gets a
    fallback copy in the temporary folder (report.run["report_write_error"] says why)."""
    report = session.finish()  # the root causes ranked on what the run has seen so far
    if is_main():
        report.run["report_file"] = str(out / name)
        try:
            out.mkdir(parents=True, exist_ok=True)
            report.save(out / name)
        except OSError as e:
            from ..atomic import write_fallback

            report.run["report_write_error"] = f"could not write {out / name}: {os.strerror(e.errno) if e.errno else e}"
            copy = write_fallback(report.to_json() + "\n", ".json")
            report.run["report_file"] = str(copy) if copy else None


def quiet_libraries() -> None:
    """transformers' own tqdm bars and deprecation chatter would bury the run's output."""
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


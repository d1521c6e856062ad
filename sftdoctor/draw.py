"""Draw every batch through the user's own dataset and collator, no model forward:
`sftdoctor inspect-batch train.py --batches N|all` and `--batch FOLDER`.

The user's script runs (sftdoctor.runner) until its training data exists: the first DataLoader it
iterates, or a Trainer's train() (its train dataset and data collator, TRL's prepared dataset
included). sftdoctor then fetches rows and collates them itself, exactly as a DataLoader with
num_workers=0 does (dataset.__getitems__ or dataset[i], then collate_fn), in dataset order, so
each row's dataset index is known and a collator that raises is narrowed to the row that breaks
it. The script is stopped afterwards (StopScript), everything patched is restored.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import UserError
from .patches import Patches
from .runner import StopScript, print_user_traceback, run_patched

ALL_CAP_BATCHES = 100_000  # --batches all on a dataset with no length stops here (documented)


@dataclass
class Source:
    """Where the batches come from."""

    what: str  # for messages: "DataLoader at train.py:42", "Trainer.train_dataset + data_collator"
    dataset: Any
    collate: Callable[[list], Any] | None
    batch_size: int | None
    batch_sampler: Any = None  # a user's own batch sampler (its index lists are kept)
    tokenizer: Any = None
    hints: dict[str, Any] = field(default_factory=dict)
    loader: Any = None  # fallback: iterate the user's loader itself (batch_size=None loaders)
    finite: bool = False  # known to end (a folder of files) even without a length

    @property
    def length(self) -> int | None:
        try:
            return len(self.dataset)
        except Exception:
            return None


class CollateError(Exception):
    def __init__(self, row: int | None, rows: list[int], error: BaseException, stage: str):
        self.row, self.rows, self.error, self.stage = row, rows, error, stage
        super().__init__(f"{stage} raised {type(error).__name__}: {error}")


def source_from_loader(loader: Any, where: str = "") -> Source:
    from torch.utils.data import BatchSampler, IterableDataset

    ds = loader.dataset
    bs = getattr(loader, "batch_size", None)
    sampler = getattr(loader, "batch_sampler", None)
    custom = sampler is not None and type(sampler) is not BatchSampler and not isinstance(ds, IterableDataset)
    return Source(what=f"DataLoader{' at ' + where if where else ''}", dataset=ds, collate=loader.collate_fn,
                  batch_size=bs, batch_sampler=sampler if custom else None,
                  loader=loader if bs is None and not custom else None)


def source_from_trainer(trainer: Any) -> Source:
    loader = trainer.get_train_dataloader()  # the dataset after column removal, the collator Trainer wraps
    bs = getattr(trainer, "_train_batch_size", None) or trainer.args.per_device_train_batch_size
    src = Source(what=f"{type(trainer).__name__}.train_dataset + data_collator", dataset=loader.dataset,
                 collate=loader.collate_fn, batch_size=bs)
    src.tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    max_length = getattr(trainer.args, "max_length", None) or getattr(trainer.args, "max_seq_length", None)
    if isinstance(max_length, int):
        src.hints["max_length"] = max_length
    return src


def _fetch(ds: Any, idx: list[int]) -> list:
    getitems = getattr(ds, "__getitems__", None)
    return list(getitems(idx)) if getitems is not None else [ds[i] for i in idx]


def _collate_checked(src: Source, items: list, idx: list[int]) -> Any:
    try:
        return src.collate(items) if src.collate is not None else items
    except Exception as e:  # narrow it down to the row that breaks the collator
        for i, item in zip(idx, items):
            try:
                src.collate([item])
            except Exception as e1:
                raise CollateError(i, idx, e1, "the collator") from None
        raise CollateError(None, idx, e, "the collator") from None


def draw(src: Source, max_batches: int | None) -> Iterator[tuple[Any, list[int]]]:
    """Yield (collated batch, dataset index of each row), at most max_batches batches."""
    from torch.utils.data import IterableDataset

    n = 0
    if src.loader is not None:  # the loader batches by itself: count rows in order
        row = 0
        for batch in src.loader:
            if max_batches is not None and n >= max_batches:
                return
            ids = batch.get("input_ids") if hasattr(batch, "get") else None
            b = int(ids.shape[0]) if hasattr(ids, "shape") and len(ids.shape) == 2 else 1
            yield batch, list(range(row, row + b))
            row, n = row + b, n + 1
        return
    if isinstance(src.dataset, IterableDataset) or src.length is None:
        it, row, bs = iter(src.dataset), 0, src.batch_size or 1
        while max_batches is None or n < max_batches:
            items = []
            for _ in range(bs):
                try:
                    items.append(next(it))
                except StopIteration:
                    break
                except Exception as e:
                    raise CollateError(row + len(items), [], e, "reading the dataset") from None
            if not items:
                return
            idx = list(range(row, row + len(items)))
            yield _collate_checked(src, items, idx), idx
            row, n = row + len(items), n + 1
        return
    if src.batch_sampler is not None:
        index_lists: Any = (list(b) for b in src.batch_sampler)
    else:
        bs, total = src.batch_size or 1, src.length
        index_lists = (list(range(s, min(s + bs, total))) for s in range(0, total, bs))
    for idx in index_lists:
        if max_batches is not None and n >= max_batches:
            return
        try:
            items = _fetch(src.dataset, idx)
        except Exception:
            for i in idx:
                try:
                    src.dataset[i]
                except Exception as e1:
                    raise CollateError(i, idx, e1, "reading the dataset") from None
            raise
        yield _collate_checked(src, items, idx), idx
        n += 1


def check_source(src: Source, batches: int | None, inspector: Any, *, progress: bool = True,
                 all_cap: int = ALL_CAP_BATCHES) -> None:
    """Draw and check batches into inspector; inspector.run says how it ended (complete, partial)."""
    run = inspector.run
    run["source"] = src.what
    length = src.length
    limit = batches
    if batches is None and length is None and not src.finite:
        limit = all_cap
        run["cap"] = (f"the dataset has no length (an iterable or stream): --batches all stops after {all_cap:,} "
                      "batches; pass --batches N to choose")
        if progress:  # said before a long draw starts, not only at its end
            print(f"sftdoctor: note: {run['cap']}", file=sys.stderr)
    expected = None
    if length is not None and src.batch_size:
        expected = -(-length // src.batch_size)
        if limit is not None:
            expected = min(expected, limit)
    elif limit is not None and batches is not None:
        expected = limit
    run["batches_requested"] = "all" if batches is None else batches
    bar = _Progress(expected, enabled=progress)
    status = "complete"
    try:
        for batch, idx in draw(src, limit):
            inspector.add(batch, idx)
            bar.update(inspector.stats.batches, inspector.stats.rows)
        if limit is not None and batches is None and inspector.stats.batches >= limit:
            status = "capped"
    except KeyboardInterrupt:
        status = "interrupted"
        run["note"] = "interrupted with Ctrl-C: the report covers the rows checked before"
    except CollateError as e:
        status = "collate-error"
        where = f"on row {e.row}" if e.row is not None else f"on the batch of rows {e.rows[0]}..{e.rows[-1]}" if e.rows else ""
        run["error"] = {"type": type(e.error).__name__, "message": str(e.error)[:500], "stage": e.stage,
                        "row": e.row, "rows": e.rows[:64]}
        run["note"] = (f"{e.stage} raised {type(e.error).__name__} {where}: {str(e.error)[:200]}; "
                       f"checked {inspector.stats.rows:,} rows before it")
    finally:
        bar.close()
    run["partial"] = status in ("interrupted", "collate-error") or (status == "capped")
    run["status"] = {"complete": "completed", "capped": "stopped", "interrupted": "interrupted",
                     "collate-error": "crashed"}[status]
    run["coverage"] = status
    if length is not None:
        run["rows_in_dataset"] = length
        if inspector.stats.rows < length and status == "complete":
            run["partial"] = batches is None  # --batches N over a longer dataset is what was asked
    if inspector.stats.batches == 0 and status != "interrupted":
        raise UserError(run.get("note") or f"{src.what} produced no batch to check")


class _Progress:
    """A rich progress bar on stderr with rows/s (nothing when stderr is not a terminal)."""

    def __init__(self, total: int | None, enabled: bool = True):
        self.p = None
        self.last = 0.0
        if not enabled or not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("checking batches"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[rows]:,} rows  {task.fields[rate]:,.0f} rows/s"), TimeElapsedColumn(),
                          console=Console(stderr=True), transient=True)
        self.task = self.p.add_task("batches", total=total, rows=0, rate=0.0)
        self.t0 = time.perf_counter()
        self.p.start()

    def update(self, batches: int, rows: int) -> None:
        if self.p is None:
            return
        now = time.perf_counter()
        if now - self.last < 0.1:
            return
        self.last = now
        self.p.update(self.task, completed=batches, rows=rows, rate=rows / max(now - self.t0, 1e-9))

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()


# ---- the user's script --------------------------------------------------------------------------

def inspect_script_dataset(script: str | None, script_args: list[str], *, module: str | None = None,
                           batches: int | None = None, ignore=frozenset(), max_length: int | None = None,
                           progress: bool = True, all_cap: int = ALL_CAP_BATCHES):
    """Run the script until its training data exists, check `batches` batches (None: all) of it
    through its own dataset and collator, stop the script, and return the Report."""
    from .dataset import DatasetInspector
    from .frames import find_tokenizer, tokenizer_in
    from .intercept import ForwardCatcher, close_progress_bars, running_main_globals

    captured: dict[str, Any] = {}
    script_ns: dict[str, Any] = {}
    busy = {"on": False}

    def run_checks(src: Source, frame) -> None:
        globals_ = script_ns.get("globals") or running_main_globals()
        tok = src.tokenizer
        if tok is None:

            tok = tokenizer_in(src.collate) or tokenizer_in(src.dataset) or find_tokenizer(frame, globals_)
        hints = dict(src.hints)
        if max_length:
            hints["max_length"] = max_length
        inspector = DatasetInspector(tok, None, hints=hints, ignore=ignore)
        busy["on"] = True
        try:
            check_source(src, batches, inspector, progress=progress, all_cap=all_cap)
        finally:
            busy["on"] = False
        report = inspector.report()
        report.run["tokenizer"] = type(tok).__name__ if tok is not None else None
        captured["report"] = report

    def stop(src_fn, frame, trainer=None) -> None:
        try:
            run_checks(src_fn(), frame)
        except UserError as e:
            captured["error"] = e
        except Exception as e:  # ours, not the script's: raised again once the script is unwound
            captured["error"] = e
        if trainer is not None:
            close_progress_bars(trainer)
        raise StopScript("training data inspected")

    def make_iter(original_iter):
        def __iter__(loader):
            if busy["on"] or "report" in captured or "error" in captured:
                return original_iter(loader)
            frame = sys._getframe(1)
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            stop(lambda: source_from_loader(loader, where), frame)
        return __iter__

    def make_train(original_train):  # the original never runs: the training data exists, the script stops here
        def train(trainer, *args, **kwargs):
            stop(lambda: source_from_trainer(trainer), sys._getframe(1), trainer)
        return train

    def on_forward(model, args, kwargs, frame) -> None:
        if "report" in captured or busy["on"]:
            return
        captured["no_loader"] = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        raise StopScript("model forward before any DataLoader")

    def install(patches: Patches) -> None:
        patches.wrap("dataloader-iter", make_iter)
        try:
            patches.wrap("trainer-train", make_train)
        except ImportError:
            pass
        try:
            ForwardCatcher(on_forward).install(patches)
        except ImportError:
            pass

    outcome = run_patched(install, script, script_args, module=module, globals_out=script_ns)
    name = module or script
    if "error" in captured:
        raise captured["error"]
    if "report" in captured:
        report = captured["report"]
        report.run["script"] = name
        return report
    if "no_loader" in captured:
        raise UserError(f"{name} ran a model forward (at {captured['no_loader']}) before iterating any DataLoader or "
                        "calling Trainer.train(): --batches needs a torch DataLoader or a Trainer; without --batches "
                        "inspect-batch checks the first batch, or save batches and use --batch FOLDER")
    if outcome.status == "crashed":
        print_user_traceback(outcome.exception)
        err = outcome.error or {}
        raise UserError(f"{name} raised {err.get('type')}: {err.get('message')} before its training data existed; "
                        "fix the error above and run again")
    if outcome.status == "interrupted":
        raise KeyboardInterrupt
    raise UserError(f"{name} ended without iterating a DataLoader or calling Trainer.train(): "
                    "--batches needs one (or save batches and use --batch FOLDER)")


def inspect_folder(folder: str, tokenizer: Any, model: Any = None, *, batches: int | None = None, hints=None,
                   ignore=frozenset(), progress: bool = True):
    """Check every torch.save'd batch in a folder (sorted by the number in the file name)."""
    import re
    from pathlib import Path

    from .loading import load_batch_file
    from .dataset import DatasetInspector

    files = sorted((p for p in Path(folder).iterdir() if p.is_file() and p.suffix in (".pt", ".pth", ".bin")),
                   key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    if not files:
        raise UserError(f"{folder} holds no .pt batch files; save each batch with torch.save(batch, f'{folder}/batch_{{i}}.pt')")
    inspector = DatasetInspector(tokenizer, model, hints=hints, ignore=ignore)
    src = Source(what=f"batch files in {folder}", dataset=None, collate=None, batch_size=None)
    src.loader, src.finite = (load_batch_file(str(p)) for p in files), True
    inspector.run["files"] = len(files)
    check_source(src, batches, inspector, progress=progress)
    inspector.run["rows_in_dataset"] = None
    return inspector.report()

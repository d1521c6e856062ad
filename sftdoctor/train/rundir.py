"""The output folder of `sftdoctor train`: what may be deleted, and which checkpoint to resume.

Invariants:
  - sftdoctor deletes only what it wrote: a folder counts as a run of ours only when it holds
    MARKER, a JSON file with `schema` == MARKER_SCHEMA that `train` writes before anything else;
    --overwrite then removes only the entries `train` writes (OURS), and --dry-run removes nothing.
  - --resume continues from the newest checkpoint whose files are all whole (a kill or a full disk
    during a save leaves a partial one: it is skipped, and said so).
  - steps.jsonl is append-only, so only its last line can be torn (a kill mid-write): unreadable
    lines are dropped, never fatal.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Callable

from ..atomic import write_atomic
from ..errors import UserError
from ..paths import PROBE_PREFIX, check_writable_folder, nearest_existing

MARKER = ".sftdoctor-run.json"
MARKER_SCHEMA = "sftdoctor.run/1"
STEPS_FILE = "steps.jsonl"
REPORT_FILE = "report.json"
DRY_RUN_REPORT = "dry-run-report.json"
OURS = ("checkpoints", "final", STEPS_FILE, REPORT_FILE, DRY_RUN_REPORT)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def check_output_dir(path: str | os.PathLike) -> None:
    """Before any work: the output folder is a folder (or can be created) and is writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output dir {p} is a file; pass a folder with --output-dir")
    base = nearest_existing(p)
    if not base.is_dir():
        raise UserError(f"output dir {p} cannot be created: {base} is a file")
    check_writable_folder(base, f"--output-dir {p}")


def is_run(out: Path) -> bool:
    """True when `out` holds the marker that `sftdoctor train` writes, with its exact schema."""
    m = out / MARKER
    try:
        if not m.is_file() or m.stat().st_size > 1 << 16:
            return False
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("schema") == MARKER_SCHEMA


def write_marker(out: Path) -> None:
    from .. import __version__

    out.mkdir(parents=True, exist_ok=True)
    if not is_run(out):
        write_atomic(out / MARKER, json.dumps({
            "schema": MARKER_SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sftdoctor": __version__,
            "note": "written by sftdoctor train: --overwrite and --resume act only on a folder holding this file, "
                    "and delete only checkpoints/, final/, steps.jsonl and the reports in it"}, indent=1) + "\n")


def prepare(out: Path, *, resume: bool, overwrite: bool, dry_run: bool, main: bool, say: Callable[[str], None]) -> str:
    """Check and prepare the output folder; returns the report file name to write in it."""
    check_output_dir(out)  # also when it came from --config or the default: a folder we can write
    if not main:  # rank 0 alone checks, deletes and marks (the others wait at the barrier after this)
        return REPORT_FILE
    # another process's writability probe (check_writable_folder) is not content of the folder
    held = out.is_dir() and any(not p.name.startswith(PROBE_PREFIX) for p in out.iterdir())
    if held and not is_run(out):
        what = "--resume" if resume else ("--overwrite" if overwrite else "output dir")
        raise UserError(f"{what}: {out} is not empty and is not a run of sftdoctor train (no {MARKER} in it); "
                        "nothing in it was touched: pass another --output-dir")
    if held and not resume:
        if not overwrite:
            raise UserError(f"output dir {out} holds an earlier run; pass --resume to continue it, --overwrite to replace it, "
                            "or another --output-dir")
        if dry_run:
            say(f"--dry-run: nothing deleted in {out}; the dry run's report goes to {out / DRY_RUN_REPORT}")
            return DRY_RUN_REPORT
        for child in OURS:  # only the entries train writes; anything else of the user's stays
            p = out / child
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    write_marker(out)
    return REPORT_FILE


# ---- checkpoints --------------------------------------------------------------------------------

def _whole_zip(path: Path) -> bool:
    """torch.save writes a zip: a file cut short has no central directory at its end."""
    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _whole_safetensors(path: Path) -> bool:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > size - 8:
                return False
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0) <= size
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def checkpoint_problem(ck: Path) -> str | None:
    """Why checkpoint folder `ck` cannot be resumed from, or None when all its files are whole."""
    state = ck / "trainer_state.json"
    try:
        step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
    except FileNotFoundError:
        return "no trainer_state.json (the save was cut short)"
    except (OSError, ValueError, AttributeError):
        return "trainer_state.json is torn or unreadable"
    if not isinstance(step, int):
        return "trainer_state.json has no global_step"
    weights = [p for p in ck.glob("*.safetensors") if p.is_file()] + [p for p in ck.glob("pytorch_model*.bin") if p.is_file()]
    if not weights:
        return "no model weights"
    for w in weights:
        ok = _whole_safetensors(w) if w.suffix == ".safetensors" else _whole_zip(w)
        if not ok:
            return f"{w.name} is truncated"
    for name in ("optimizer.pt", "scheduler.pt"):
        p = ck / name
        if not p.is_file():
            return f"no {name}"
        if not _whole_zip(p):
            return f"{name} is truncated"
    for p in ck.glob("rng_state*.pth"):
        if not _whole_zip(p):
            return f"{p.name} is truncated"
    return None


def newest_complete_checkpoint(out: Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """(the newest checkpoint with every file whole, [(name, why skipped) of newer partial ones])."""
    ck = out / "checkpoints"
    found = []
    if ck.is_dir():
        for p in ck.iterdir():
            m = _CHECKPOINT.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    skipped = []
    for _, p in sorted(found, reverse=True):
        why = checkpoint_problem(p)
        if why is None:
            return p, skipped
        skipped.append((p.name, why))
    return None, skipped


def checkpoint_step(ck: Path) -> int:
    return int(json.loads((ck / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


# ---- steps.jsonl --------------------------------------------------------------------------------

def read_steps(path: Path) -> tuple[list[dict], int]:
    """The records of steps.jsonl and the number of unreadable lines dropped (a torn last line)."""
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except ValueError:
            bad += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
        else:
            bad += 1
    return records, bad


def trim_steps_log(out: Path, keep_through: int) -> tuple[int, int]:
    """On resume: keep the steps up to the checkpoint (the rest are redone) and drop torn lines.
    Returns (steps dropped, torn lines dropped)."""
    path = out / STEPS_FILE
    if not path.is_file():
        return 0, 0
    records, bad = read_steps(path)
    kept = [r for r in records if r["step"] <= keep_through]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept), bad

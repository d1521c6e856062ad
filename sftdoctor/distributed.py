"""One report from many processes (torchrun, accelerate launch): each rank's findings carry its
`rank`; rank 0 gathers every rank's report and writes the merged one.

Gathering: torch.distributed.gather_object when the script left its process group initialised,
else each rank writes `rank{N}.json` to a folder all ranks share (SFTDOCTOR_RANK_DIR, default a
folder in the temp dir named after the torchrun run id) and rank 0 merges them.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .report import Report

WAIT_SECONDS = float(os.environ.get("SFTDOCTOR_RANK_WAIT", "120"))  # how long rank 0 waits for the others
STARTED = time.time()  # a rank file older than this run (less a minute of launch skew) is a stale one


def rank() -> int | None:
    """This process's global rank, or None when it is not one of several."""
    if world_size() <= 1:
        return None
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:
        pass
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except Exception:
        pass
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_dir() -> Path:
    given = os.environ.get("SFTDOCTOR_RANK_DIR")
    if given:
        return Path(given)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}"
    return Path(tempfile.gettempdir()) / f"sftdoctor-ranks-{run_id}"


def gather(report: Report) -> Report | None:
    """Rank 0: the merged report of every rank. Other ranks: None. Single process: the report."""
    n = world_size()
    me = rank()
    if n <= 1 or me is None:
        return report
    for f in report.findings:
        if f.rank is None:
            f.rank = me
    collected, how = _gather_collective(report, me, n), "gather_object"
    if collected is None:
        collected, how = _gather_files(report, me, n), "files"
    if me != 0:
        return None
    merged = merge(collected, n)
    merged.run["gathered_by"] = how
    return merged


def _gather_collective(report: Report, me: int, n: int) -> list[dict[str, Any]] | None:
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        out: list[Any] | None = [None] * n if me == 0 else None
        dist.gather_object(report.to_dict(), out, dst=0)
        return out if me == 0 else []
    except Exception:
        return None


def _gather_files(report: Report, me: int, n: int) -> list[dict[str, Any]]:
    folder = rank_dir()
    folder.mkdir(parents=True, exist_ok=True)
    report.save(folder / f"rank{me}.json")
    if me != 0:
        return []
    deadline = time.monotonic() + WAIT_SECONDS
    paths = [folder / f"rank{r}.json" for r in range(n)]
    def fresh(p: Path) -> bool:
        try:
            return p.stat().st_mtime >= STARTED - 60
        except FileNotFoundError:
            return False

    while time.monotonic() < deadline and not all(fresh(p) for p in paths):
        time.sleep(0.2)
    got = []
    for p in paths:
        if fresh(p):
            got.append(Report.load(p).to_dict())
            p.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass
    return got


def merge(reports: list[dict[str, Any]], world: int) -> Report:
    """Rank 0's report with every other rank's findings and checks added (each finding keeps its
    rank); run statuses and step counts per rank go to report.run["ranks"]."""
    parts = [Report.from_dict(d) for d in reports if d]
    base = parts[0] if parts else Report(command="watch")
    for other in parts[1:]:
        base.merge(other)
    ranks = []
    for d in reports:
        if d:
            ranks.append({"status": d.get("run", {}).get("status"), "exit_code": d.get("run", {}).get("exit_code"),
                          "optimizer_steps": d.get("metrics", {}).get("optimizer_steps"),
                          "rank": d.get("run", {}).get("rank")})
    base.run["world_size"] = world
    base.run["ranks"] = ranks
    base.run["ranks_reported"] = len(ranks)
    return base

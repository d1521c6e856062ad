"""One report from many processes (torchrun, accelerate launch), and a failing rank never hangs the job.

Invariants (docs/distributed.md tells the story):
  - sftdoctor never enters a collective. A peer may be dead or stuck in the user's all-reduce, so
    ranks exchange their reports through a key-value channel read without blocking: the launcher's
    own TCPStore (torchrun / accelerate launch run one for the whole job), or files in a folder all
    ranks share (SFTDOCTOR_RANK_DIR, or when no launcher store is there).
  - Every wait is bounded, and a rank that did not answer in time is named in the report.
  - The first rank whose script fails (crash, Ctrl-C, SIGTERM, --fail-fast, sys.exit(n != 0))
    publishes "stop" with its error, then its report, then aborts its process group: a peer blocked
    in a collective on it gets "Connection closed by peer" at once, and a peer between steps sees
    "stop" at its next forward and stops its script there instead of entering the next collective.
  - Rank 0 merges and writes every output; the other ranks wait (bounded) for rank 0's "written"
    before they exit, so a non-zero exit of theirs never makes torchrun SIGTERM rank 0 mid-write.
    A SIGTERM that still comes (the launcher cancelling the job) stops the script like Ctrl-C and is
    only noted once the report is being written.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .probes import REGISTRY
from .report import Report
from .session import Session

# how long rank 0 waits for a rank that is still running its script (ranks of one DDP job end together)
WAIT_SECONDS = float(os.environ.get("SFTDOCTOR_RANK_WAIT", "120"))
# how long rank 0 waits once a rank failed: its peers are unblocked (process group aborted) or stopped
# at their next forward, so they answer within seconds; a longer silence is a rank stuck for good
FAILED_WAIT_SECONDS = float(os.environ.get("SFTDOCTOR_RANK_WAIT_FAILED", "20"))
# how long a non-zero rank waits for rank 0 to write the report before it exits
LINGER_SECONDS = float(os.environ.get("SFTDOCTOR_RANK_LINGER", "60"))
POLL_SECONDS = 0.2  # a forward checks "stop" at most this often (one store round trip or one stat)
STARTED = time.time()  # a rank file older than this run (less a minute of launch skew) is a stale one
FAILED = ("crashed", "interrupted", "terminated")  # script statuses that stop the whole job


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


def _run_id() -> str:
    return os.environ.get("TORCHELASTIC_RUN_ID") or f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}"


def rank_dir() -> Path:
    given = os.environ.get("SFTDOCTOR_RANK_DIR")
    if given:
        return Path(given)
    return Path(tempfile.gettempdir()) / f"sftdoctor-ranks-{_run_id()}"


def is_failure(run: dict[str, Any]) -> bool:
    """A script end that stops the job: an exception, Ctrl-C, SIGTERM, sys.exit(n != 0), or a stop of
    --fail-fast (a --max-steps stop is every rank's normal end, not a failure)."""
    status = run.get("status")
    if status in FAILED or (status == "exited" and (run.get("exit_code") or 0) != 0):
        return True
    return status == "stopped" and str(run.get("stopped_by", "")).startswith("--fail-fast")


# ---- the channel ----------------------------------------------------------------------------------

class _StoreChannel:
    """Keys in the launcher's TCPStore (one per job, alive until the launcher ends), under a prefix
    for this sftdoctor run and restart. Reads never block: check() first, then get()."""

    how = "store"

    def __init__(self) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=30))
        prefix = f"sftdoctor/{_run_id()}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.store = dist.PrefixStore(prefix, store)

    def put(self, key: str, data: bytes) -> None:
        self.store.set(key, data)

    def get(self, key: str) -> bytes | None:
        if not self.store.check([key]):
            return None
        return bytes(self.store.get(key))

    def first(self, key: str) -> bool:
        return self.store.add(key + ".count", 1) == 1

    def done(self, world: int) -> None:
        self.store.set("written", b"1")

    def is_done(self, me: int) -> bool:
        return self.store.check(["written"])


class _FileChannel:
    """Files in a folder every rank can read (one node's temp dir, or SFTDOCTOR_RANK_DIR on a shared
    file system), written atomically; files older than this run are ignored."""

    how = "files"

    def __init__(self) -> None:
        self.folder = rank_dir()
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / (key.replace("/", "-") + ".json")

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a reader never sees half a report

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            if path.stat().st_mtime < STARTED - 60:
                return None  # left over from an earlier run
            return path.read_bytes()
        except OSError:
            return None

    def first(self, key: str) -> bool:
        path = self._path(key + ".first")
        try:
            if path.stat().st_mtime < STARTED - 60:
                path.unlink()  # an earlier run's
        except OSError:
            pass
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def done(self, world: int) -> None:
        # rank 0 has written the outputs: the files go, and a rank waiting for its own file to go exits
        for p in list(self.folder.glob("*.json")):
            try:
                p.unlink()
            except OSError:
                pass
        try:
            self.folder.rmdir()
        except OSError:
            pass

    def is_done(self, me: int) -> bool:
        return not self._path(f"report/{me}").exists()


def _channel() -> Any:
    """The launcher's store when there is one (torchrun, accelerate launch), else files; files when
    SFTDOCTOR_RANK_DIR is set (the user's choice, e.g. a shared file system)."""
    if not os.environ.get("SFTDOCTOR_RANK_DIR") and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" \
            and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        try:
            return _StoreChannel()
        except Exception:
            pass
    return _FileChannel()


# ---- one rank's part in the job -------------------------------------------------------------------

class Job:
    """This process as one rank of a multi-process job (None from start() when single process)."""

    def __init__(self, me: int, world: int):
        self.rank, self.world = me, world
        self.channel = _channel()
        self._next_poll = 0.0
        self.stop_info: dict[str, Any] | None = None  # the first failing rank's, once seen
        self._in_script: Callable[[], bool] = lambda: False
        self._old_handler: Any = None

    @classmethod
    def start(cls) -> "Job | None":
        n = world_size()
        if n <= 1:
            return None
        me = rank()
        return cls(0 if me is None else me, n)

    # -- while the script runs --------------------------------------------------------------------
    def stopped_by_peer(self) -> dict[str, Any] | None:
        """The first failing rank's stop record when another rank failed (polled at safe points,
        at most every POLL_SECONDS); None otherwise."""
        if self.stop_info is not None:
            return self.stop_info if self.stop_info.get("rank") != self.rank else None
        now = time.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + POLL_SECONDS
        try:
            data = self.channel.get("stop")
        except Exception:
            return None
        if data is None:
            return None
        self.stop_info = json.loads(data)
        return self.stop_info if self.stop_info.get("rank") != self.rank else None

    def install_signals(self, in_script: Callable[[], bool]) -> None:
        """SIGTERM (torchrun stopping the survivors, a scheduler cancelling the job) stops the script
        like Ctrl-C; once the script has ended it is ignored, so the report is still written. The handler
        stays until this process exits (torchrun SIGTERMs the survivors once a rank exits non-zero)."""
        from .runner import StopScript

        self._in_script = in_script
        job = self

        def on_sigterm(signum, frame):
            if job._in_script():
                raise StopScript("SIGTERM: the launcher stopped this rank", status="terminated", exit_code=128 + signum)

        try:
            self._old_handler = signal.signal(signal.SIGTERM, on_sigterm)
        except (ValueError, OSError):  # not the main thread
            self._old_handler = None

    # -- after the script --------------------------------------------------------------------------
    def collect(self, report: Report) -> Report | None:
        """Publish this rank's report (stopping the job first when this rank failed); rank 0 returns
        the merged report (call written() once the outputs are on disk), other ranks None."""
        for f in report.findings:
            if f.rank is None:
                f.rank = self.rank
        report.run["rank"] = self.rank
        failed = is_failure(report.run)
        if failed:
            self._announce_stop(report.run)
        try:
            self.channel.put(f"report/{self.rank}", report.to_json().encode())
        except Exception as e:
            report.run.setdefault("internal_errors", []).append(f"publishing rank {self.rank}'s report: {type(e).__name__}: {e}")
        if failed:
            abort_process_group()  # a peer blocked in a collective on this rank gets an error now
        if self.rank != 0:
            return None
        return self._merge_all(report)

    def _announce_stop(self, run: dict[str, Any]) -> None:
        try:
            if self.channel.first("stop"):
                info = {"rank": self.rank, "status": run.get("status"), "exit_code": run.get("exit_code"),
                        "error": run.get("error"), "reason": run.get("stopped_by") or run.get("reason")}
                self.stop_info = info
                self.channel.put("stop", json.dumps(info).encode())
        except Exception:
            pass

    def _merge_all(self, own: Report) -> Report:
        got: dict[int, dict[str, Any]] = {0: own.to_dict()}
        waited_from = time.monotonic()
        while len(got) < self.world:
            for r in range(1, self.world):
                if r not in got:
                    try:
                        data = self.channel.get(f"report/{r}")
                    except Exception:
                        data = None
                    if data is not None:
                        got[r] = json.loads(data)
            if len(got) == self.world:
                break
            failed = is_failure(own.run) or any(is_failure(d.get("run", {})) for d in got.values()) or self._peek_stop()
            limit = FAILED_WAIT_SECONDS if failed else WAIT_SECONDS
            if time.monotonic() - waited_from >= limit:
                break
            time.sleep(POLL_SECONDS)
        waited = round(time.monotonic() - waited_from, 1)
        merged = merge([got.get(r) for r in range(self.world)], self.world, stop=self._peek_stop(), waited=waited)
        merged.run["gathered_by"] = self.channel.how
        return merged

    def _peek_stop(self) -> dict[str, Any] | None:
        if self.stop_info is None:
            try:
                data = self.channel.get("stop")
                if data is not None:
                    self.stop_info = json.loads(data)
            except Exception:
                pass
        return self.stop_info

    def written(self) -> None:
        """Rank 0: every output is written; the other ranks may exit now."""
        try:
            self.channel.done(self.world)
        except Exception:
            pass

    def linger(self) -> None:
        """A non-zero rank: wait (bounded) until rank 0 has written the report, so that this rank's
        exit never gets rank 0 killed by the launcher mid-write."""
        deadline = time.monotonic() + LINGER_SECONDS
        while time.monotonic() < deadline:
            try:
                if self.channel.is_done(self.rank):
                    return
            except Exception:
                return
            time.sleep(POLL_SECONDS)


def abort_process_group(timeout: float = 5.0) -> None:
    """Abort the user's default process group, if still up (bounded: done in a daemon thread), so that
    a peer blocked in a collective on this rank fails at once ("Connection closed by peer") instead
    of waiting for the 30-minute collective timeout.

    NCCL: c10d's abort does it. gloo: abort()/destroy leave the sockets open while DDP still holds
    the group (measured: the peer stayed blocked until this process exited), so the group's TCP
    connections are shut down directly (every connected TCP socket of this process except those to
    or from MASTER_PORT, the launcher's store, which the report still travels through)."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        backend = str(dist.get_backend())
    except Exception:
        return

    def abort() -> None:
        try:
            from torch.distributed import distributed_c10d as c10d

            if hasattr(c10d, "_abort_process_group"):
                c10d._abort_process_group()
            else:
                dist.destroy_process_group()
        except Exception:
            pass

    if "gloo" in backend:
        _shutdown_peer_sockets()
    t = threading.Thread(target=abort, name="sftdoctor-abort-pg", daemon=True)
    t.start()
    t.join(timeout)


def _shutdown_peer_sockets() -> None:
    import socket
    import stat

    keep = {int(os.environ.get("MASTER_PORT", "0") or 0)}
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]  # Linux; elsewhere the peer waits for our exit
    except (OSError, ValueError):
        return
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=fd)
        except (OSError, ValueError):
            continue
        try:
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                peer, local = s.getpeername(), s.getsockname()
                if peer[1] not in keep and local[1] not in keep:
                    s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            s.detach()  # the fd stays the owner's; only the connection is shut


# ---- merging ----------------------------------------------------------------------------------

def _rank_entry(r: int, d: dict[str, Any] | None, waited: float | None) -> dict[str, Any]:
    if d is None:
        return {"rank": r, "status": "no-report",
                "note": f"rank {r} did not answer within {waited} s (stuck in a collective, killed, or still running)"}
    run = d.get("run", {})
    entry = {"rank": r, "status": run.get("status"), "exit_code": run.get("exit_code"),
             "optimizer_steps": d.get("metrics", {}).get("optimizer_steps"),
             "findings": sum(1 for f in d.get("findings", []) if f.get("severity") in ("fail", "warn"))}
    for k in ("error", "stopped_by", "reason", "internal_errors"):
        if run.get(k):
            entry[k] = run[k]
    return entry


def merge(reports: list[dict[str, Any] | None], world: int, *, stop: dict[str, Any] | None = None,
          waited: float | None = None) -> Report:
    """Rank 0's report with every other rank's findings and checks added (each finding keeps its
    rank). report.run["ranks"] has each rank's status, exit code, error and counts; a rank that sent
    nothing is there as "no-report". When a rank failed, run["status"]/["error"]/["exit_code"] are
    the first failing rank's (the root cause; the others' errors are usually its consequence) and
    run["failed_rank"] names it."""
    parts = [Report.from_dict(d) if d else None for d in reports]
    session = Session.reopen(parts[0], REGISTRY) if parts and parts[0] is not None else Session("watch", REGISTRY)
    base = session.report
    for other in parts[1:]:
        if other is not None:
            session.merge(other)
    ranks = [_rank_entry(r, d, waited) for r, d in enumerate(reports)]
    base.run["world_size"] = world
    base.run["ranks"] = ranks
    base.run["ranks_reported"] = sum(1 for d in reports if d)
    missing = [e["rank"] for e in ranks if e["status"] == "no-report"]
    if missing:
        base.run["ranks_missing"] = missing
    _job_loss(base, reports)
    first = _first_failure(ranks, stop)
    if first is not None:
        base.run["failed_rank"] = first["rank"]
        if first["rank"] != 0:
            base.run["rank0"] = {k: base.run.get(k) for k in ("status", "exit_code", "error", "stopped_by") if base.run.get(k)}
            for k in ("error", "stopped_by", "reason"):
                base.run.pop(k, None)
            base.run.update(status=first["status"], exit_code=first.get("exit_code") or 1)
            for k in ("error", "stopped_by", "reason"):
                if first.get(k):
                    base.run[k] = first[k]
    elif missing:
        base.run["status"] = "incomplete"
        base.run["error"] = {"type": "RankMissing", "message": ranks[missing[0]]["note"]}
    return session.finish()  # the root causes of the whole job, ranked once over every rank's findings


def _job_loss(base: Report, reports: list[dict[str, Any] | None]) -> None:
    """The loss per optimizer step as the user's own log prints it.

    HF Trainer passes num_items_in_batch (the supervised tokens of the whole optimizer step, summed
    over ranks and accumulated micro-batches) to the model, so each micro-step's loss is
    sum(own tokens' loss) / all tokens; Trainer logs mean over ranks of (world * sum over micro-steps),
    i.e. the sum over ranks and micro-steps of those losses. Rank 0's micro-step loss alone (the
    "loss" of metrics.steps) is a fraction of it."""
    if not any(d and d.get("run", {}).get("loss_normalized_by") == "num_items_in_batch" for d in reports):
        return
    per_rank = []
    for d in reports:
        if not d:
            continue
        sums, acc = [], 0.0
        for row in d.get("metrics", {}).get("steps", []):
            raw = row.get("raw_loss", row.get("loss"))  # the model's own value, should a row ever rescale "loss"
            if not isinstance(raw, (int, float)):
                continue
            acc += raw
            if row.get("optimizer_step"):
                sums.append(acc)
                acc = 0.0
        per_rank.append(sums)
    if len(per_rank) != len(reports):
        return  # a rank's steps are missing: a partial sum would be wrong, not approximate
    n = min((len(s) for s in per_rank), default=0)
    series = [sum(s[i] for s in per_rank) for i in range(n)]
    base.metrics["logged_loss"] = {"values": series, "how": "sum over ranks and micro-steps of the model's loss "
                                   "(normalised by num_items_in_batch), as HF Trainer logs it"}
    rows = [row for row in base.metrics.get("steps", []) if row.get("optimizer_step")]
    for row, value in zip(rows, series):
        row["logged_loss"] = value


def _first_failure(ranks: list[dict[str, Any]], stop: dict[str, Any] | None) -> dict[str, Any] | None:
    failed = [e for e in ranks if e["status"] != "no-report" and is_failure(e)]
    if stop is not None:
        for e in failed:
            if e["rank"] == stop.get("rank"):
                return e
    return failed[0] if failed else None


def gather(report: Report) -> Report | None:
    """The Python API's merge (sftdoctor.watch): rank 0 gets the merged report, other ranks None,
    a single process its own report."""
    job = Job.start()
    if job is None:
        return report
    merged = job.collect(report)
    if merged is None:
        job.linger()
        return None
    job.written()
    return merged

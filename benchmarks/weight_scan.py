"""Benchmark: the streamed weight scan of `sftdoctor diagnose` on a checkpoint of >= 1 GB.

Writes random bf16 weights shaped like a 0.5B model's largest tensors into a temporary folder
(deleted afterwards), then compares:
  - scan speed against a plain sequential read of the same file (16 MB readinto blocks), both in
    a child process that imported torch and sftdoctor (cold reads in such a process measured 2-4x
    slower than in this small one on a shared VM, so only like with like is compared), cold (the
    file evicted from the page cache with posix_fadvise DONTNEED before each run) and warm, the
    two alternating run by run and compared by their medians (the machine may be shared); and
    against the scan's reduction alone (max_magnitude_bits over as many values already in memory);
  - peak memory (ru_maxrss) of a child process that only imports sftdoctor and scans, against a
    child that only imports it, and against the checkpoint size.
The scan maps one chunk of the file at a time and reduces the mapped pages in place (no copy),
so warm it can run faster than a plain read, which copies every byte.

Run: python benchmarks/weight_scan.py [--gib 1.1] [--repeats 3] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 16 << 20  # plain-read block size


def write_checkpoint(folder: Path, gib: float) -> Path:
    """A model.safetensors of about `gib` GiB of bf16 values, written tensor by tensor (never the
    whole model in memory): one embedding-sized matrix, then MLP-sized ones."""
    import torch

    shapes = [("model.embed_tokens.weight", (151936, 896))]
    total = 151936 * 896
    i = 0
    while total * 2 < gib * (1 << 30):
        shapes.append((f"model.layers.{i}.mlp.up_proj.weight", (4864, 896 * 8)))
        total += 4864 * 896 * 8
        i += 1
    header, offset = {}, 0
    for name, shape in shapes:
        n = shape[0] * shape[1] * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    path = folder / "model.safetensors"
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in shapes:
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            f.write(t.view(torch.int16).numpy().tobytes())
    (folder / "config.json").write_text("{}")
    return path


def evict(path: Path) -> bool:
    """Drop this one file from the page cache (its pages are clean after fsync), so a read hits the
    disk; unlike /proc/sys/vm/drop_caches it needs no root and leaves torch's own code pages cached,
    which would otherwise be faulted back in during the timed scan."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def plain_read(path: Path) -> float:
    t0 = time.perf_counter()
    buf = bytearray(BLOCK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


CHILD = """
import resource, sys, time, json
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[3]))
from sftdoctor.checkpoint import scan_weights
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
scan = None
t0 = time.perf_counter()
if sys.argv[2] == "scan":
    scan = scan_weights(sys.argv[1])
elif sys.argv[2] == "read":  # the baseline, in the same kind of process: a plain read of each file
    buf = bytearray(int(sys.argv[4]))
    for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:  # no read-ahead hints (a POSIX_FADV_SEQUENTIAL one did not help)
            while fh.readinto(buf):
                pass
elif sys.argv[2] == "reduce":  # the arithmetic alone: the scan's integer passes over as many bf16 values, in memory
    from sftdoctor.checkpoint import CHUNK_ELEMENTS, max_magnitude_bits
    x = torch.randn(CHUNK_ELEMENTS).to(torch.bfloat16)
    t0 = time.perf_counter()
    for _ in range(int(sys.argv[4]) // x.numel()):
        max_magnitude_bits(x)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "import_maxrss_kib": base, "tensors": len(scan.weights) if scan else 0}))
"""


THREADS = 1  # torch threads in the scan child (--threads)


def child(folder: Path, what: str, values: int = 0) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), what, str(THREADS), str(values)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.1, help="checkpoint size in GiB (default 1.1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", metavar="DIR", help="write the checkpoint here and keep it (default: a temp dir, deleted)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the scan child (default 1; the scan's "
                    "integer passes run in numpy on one thread while the kernel reads ahead)")
    ap.add_argument("--write-only", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    if args.write_only:
        write_checkpoint(Path(args.write_only), args.gib)
        return

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sftdoctor-scan-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        # written by a child: Linux keeps a process's peak RSS across fork+exec, so this process
        # must stay small for the children's ru_maxrss to mean anything (it never imports torch)
        subprocess.run([sys.executable, __file__, "--write-only", str(folder), "--gib", str(args.gib)], check=True)
        path = folder / "model.safetensors"
        size = path.stat().st_size
        print(f"checkpoint: {size / 1e9:.2f} GB ({size / (1 << 30):.2f} GiB) written in {time.perf_counter() - t0:.1f} s")

        results = {"bytes": size}
        if evict(path):
            cold_reads, cold_scans = [], []
            for _ in range(args.repeats):  # alternate, so both see the same disk and machine load
                evict(path)
                cold_reads.append(child(folder, "read", BLOCK)["seconds"])
                evict(path)
                cold_scans.append(child(folder, "scan")["seconds"])
            cold_read, cold_scan = median(cold_reads), median(cold_scans)
            results["cold"] = {"read_gbps": size / cold_read / 1e9, "scan_gbps": size / cold_scan / 1e9,
                               "scan_speed_over_read": cold_read / cold_scan}
            print(f"cold cache (median of {args.repeats}): plain read {size / cold_read / 1e9:.2f} GB/s, "
                  f"scan {size / cold_scan / 1e9:.2f} GB/s (scan runs at {cold_read / cold_scan:.0%} of the read speed)")
        else:
            print("cold cache: not measured (no posix_fadvise here)")

        plain_read(path)  # warm the page cache
        reads, scans = [], []
        for _ in range(args.repeats):  # alternate, as cold
            reads.append(child(folder, "read", BLOCK)["seconds"])
            scans.append(child(folder, "scan"))
        idle = child(folder, "import")
        reduce_s = median([child(folder, "reduce", size // 2)["seconds"] for _ in range(args.repeats)])
        read_s = median(reads)
        scan_s = median([s["seconds"] for s in scans])
        peak = max(s["maxrss_kib"] for s in scans) * 1024
        base = idle["maxrss_kib"] * 1024
        results["warm"] = {"read_gbps": size / read_s / 1e9, "scan_gbps": size / scan_s / 1e9, "scan_over_read": scan_s / read_s,
                           "reduce_only_gbps": size / reduce_s / 1e9, "scan_over_bound": scan_s / max(read_s, reduce_s)}
        results["memory"] = {"scan_peak_rss": peak, "import_only_rss": base, "scan_extra": peak - base,
                             "peak_over_checkpoint": peak / size}
        print(f"warm cache (median of {args.repeats}): plain read {size / read_s / 1e9:.2f} GB/s ({read_s:.2f} s), "
              f"scan {size / scan_s / 1e9:.2f} GB/s ({scan_s:.2f} s): scan takes {scan_s / read_s:.2f}x the plain read")
        print(f"the reduction alone (integer max passes, data in memory) runs at {size / reduce_s / 1e9:.2f} GB/s: "
              f"the scan takes {scan_s / max(read_s, reduce_s):.2f}x max(read, reduce)")
        print(f"peak RSS of a scan-only child: {peak / 1e6:.0f} MB (import only: {base / 1e6:.0f} MB; scan adds "
              f"{(peak - base) / 1e6:.0f} MB) = {peak / size:.1%} of the {size / 1e9:.2f} GB checkpoint")
        print(json.dumps(results))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

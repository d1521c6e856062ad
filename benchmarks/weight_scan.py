"""Benchmark: the streamed weight scan of `sftdoctor diagnose` on a checkpoint of >= 1 GB.

Writes random bf16 weights shaped like a 0.5B model's largest tensors into a temporary folder
(deleted afterwards), then compares:
  - scan speed against a plain sequential read of the same file (both warm page cache; and cold
    too when the page cache can be dropped, which needs root and a writable /proc/sys/vm);
  - peak memory (ru_maxrss) of a child process that only imports sftdoctor and scans, against a
    child that only imports it, and against the checkpoint size.

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


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def plain_read(path: Path) -> float:
    t0 = time.perf_counter()
    buf = bytearray(BLOCK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


CHILD = """
import resource, sys, time, json
from sftdoctor.checkpoint import scan_weights
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
scan = scan_weights(sys.argv[1]) if sys.argv[2] == "scan" else None
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "import_maxrss_kib": base, "tensors": len(scan.weights) if scan else 0}))
"""


def child(folder: Path, what: str) -> dict:
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), what], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.1, help="checkpoint size in GiB (default 1.1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", metavar="DIR", help="write the checkpoint here and keep it (default: a temp dir, deleted)")
    ap.add_argument("--write-only", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
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
        if drop_caches():
            cold_read = plain_read(path)
            drop_caches()
            cold_scan = child(folder, "scan")
            results["cold"] = {"read_gbps": size / cold_read / 1e9, "scan_gbps": size / cold_scan["seconds"] / 1e9}
            print(f"cold cache: plain read {size / cold_read / 1e9:.2f} GB/s, scan {size / cold_scan['seconds'] / 1e9:.2f} GB/s "
                  f"(scan/read speed {cold_read / cold_scan['seconds']:.2f})")
        else:
            print("cold cache: not measured (cannot write /proc/sys/vm/drop_caches here)")

        plain_read(path)  # warm the page cache
        reads = [plain_read(path) for _ in range(args.repeats)]
        scans = [child(folder, "scan") for _ in range(args.repeats)]
        idle = child(folder, "import")
        read_s = min(reads)
        scan_s = min(s["seconds"] for s in scans)
        peak = max(s["maxrss_kib"] for s in scans) * 1024
        base = idle["maxrss_kib"] * 1024
        results["warm"] = {"read_gbps": size / read_s / 1e9, "scan_gbps": size / scan_s / 1e9, "scan_over_read": scan_s / read_s}
        results["memory"] = {"scan_peak_rss": peak, "import_only_rss": base, "scan_extra": peak - base,
                             "peak_over_checkpoint": peak / size}
        print(f"warm cache: plain read {size / read_s / 1e9:.2f} GB/s ({read_s:.2f} s), "
              f"scan {size / scan_s / 1e9:.2f} GB/s ({scan_s:.2f} s): scan takes {scan_s / read_s:.2f}x the plain read")
        print(f"peak RSS of a scan-only child: {peak / 1e6:.0f} MB (import only: {base / 1e6:.0f} MB; scan adds "
              f"{(peak - base) / 1e6:.0f} MB) = {peak / size:.1%} of the {size / 1e9:.2f} GB checkpoint")
        print(json.dumps(results))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

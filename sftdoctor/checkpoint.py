"""Checkpoint-level evidence: a streamed weight scan of a saved model, the CheckpointRecord that
the checkpoint probes read, and the measurements behind the two checks `watch` runs on what a
user's script saves or generates (measured here; sftdoctor.outputs hands them to the probes).

The scan never loads the whole model: it reads each safetensors file sequentially, one tensor at
a time in row chunks of at most CHUNK_ELEMENTS values, each chunk a mapping of just its own pages
(released when the chunk is dropped, so the pages never pile up in this process's RSS as with a
whole-file mapping, and without the copy a plain read makes), and keeps only per-tensor numbers,
computed on the float bits with integer max passes (max_magnitude_bits). A torch .bin is opened
with mmap=True. No transformers import here (probes import this module).
"""
from __future__ import annotations

import json
import math
import mmap
import os
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from .errors import UserError

FP16_MAX = 65504.0  # largest finite float16; anything above becomes inf when cast
DTYPE_LIMITS = {"float16": FP16_MAX, "bfloat16": float(torch.finfo(torch.bfloat16).max),
                "float32": float(torch.finfo(torch.float32).max)}
CHUNK_ELEMENTS = 1 << 22  # values read per chunk: 16 MB of fp32, whatever the tensor size

# safetensors header dtype codes -> torch dtype names
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}

EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                      "tok_embeddings.weight", "embedding.weight")
LM_HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight", "output.weight")


@dataclass
class CheckpointRecord:
    """Everything the checkpoint probes read about one saved model, as plain data.

    weights: one dict per tensor {name, dtype, shape, numel, max_abs, nan, inf}; max_abs is over
    the finite values. forward: per dtype name, the logits and activation statistics of a few
    prompts. generations: greedy outputs in `generation_dtype`, new tokens only.
    """

    path: str = ""
    name: str = ""  # as the user gave it (folder or Hub id)
    format: str = ""  # safetensors | bin
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0
    stored_dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> number of values stored
    weights: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # model_type, dtype, tie_word_embeddings, vocab_size, eos/pad ids
    generation_config: dict[str, Any] | None = None  # {"eos_token_id": [...], "pad_token_id": n, "source": file}
    tied: dict[str, Any] = field(default_factory=dict)  # config flag, tensor names present, equality
    special_rows: list[dict[str, Any]] = field(default_factory=list)  # per special token and matrix: norm, ratio, zero, duplicate
    serve_dtype: str = "float32"  # the dtype the model is served in (requested, else stored)
    forward: dict[str, dict[str, Any]] = field(default_factory=dict)  # dtype -> logits/activation stats
    generation_dtype: str | None = None
    generations: list[dict[str, Any]] = field(default_factory=list)  # {prompt, prompt_ids, output_ids, stopped, nonfinite_steps, text}
    max_new_tokens: int | None = None
    base: "CheckpointRecord | None" = None  # the same checks on --base under identical settings
    weight_change: list[dict[str, Any]] = field(default_factory=list)  # per tensor relative L2 change vs base
    scan_seconds: float = 0.0

    @property
    def logits_nonfinite(self) -> bool | None:
        """Did any greedy step see NaN/inf logits (None when nothing was generated)."""
        if not self.generations:
            return None
        return any(g.get("nonfinite_steps", 0) for g in self.generations)

    def summary(self) -> dict[str, Any]:
        """Plain-data summary for report.metrics (no tensors)."""
        nonfinite = [w for w in self.weights if w["nan"] or w["inf"]]
        finite_max = [w["max_abs"] for w in self.weights if w.get("max_abs") is not None]
        return {
            "path": self.path, "name": self.name, "format": self.format, "files": self.files,
            "bytes": self.total_bytes, "stored_dtypes": self.stored_dtypes, "tensors": len(self.weights),
            "parameters": sum(w["numel"] for w in self.weights), "max_abs": max(finite_max, default=None),
            "nonfinite_tensors": len(nonfinite), "serve_dtype": self.serve_dtype, "scan_seconds": round(self.scan_seconds, 3),
        }


# ---- streaming over the saved tensors ------------------------------------------------------------

RowReader = Callable[[int, int], torch.Tensor]  # (start_row, end_row) -> that slice of the tensor


@dataclass
class StoredTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    read: RowReader  # rows [start, end) along dim 0 (the whole tensor for 0-d)
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def row_ranges(self, max_elements: int | None = None) -> Iterator[tuple[int, int]]:
        """[start, end) row ranges of at most max_elements values each (at least one row)."""
        if not self.shape:
            yield 0, 1
            return
        per_row = max(1, self.numel // max(self.rows, 1))
        step = max(1, (max_elements or CHUNK_ELEMENTS) // per_row)
        for start in range(0, self.rows, step):
            yield start, min(start + step, self.rows)

    def chunks(self, max_elements: int | None = None) -> Iterator[torch.Tensor]:
        """The tensor in row chunks (see row_ranges); a chunk of a saved file maps only its own pages,
        released when the chunk is dropped."""
        for a, b in self.row_ranges(max_elements):
            yield self.read(a, b)


def weight_files(folder: str | os.PathLike) -> tuple[str, list[Path]]:
    """('safetensors' | 'bin', files) of a saved model folder; safetensors preferred as in transformers."""
    p = Path(folder)
    st = sorted(f for f in p.glob("*.safetensors") if not f.name.startswith("adapter_"))
    bins = sorted(p.glob("pytorch_model*.bin"))
    for f in st or bins:  # only regular files are opened (a folder raises, a FIFO would block)
        if not f.is_file():
            from .paths import describe_kind

            raise UserError(f"{f} is {describe_kind(f)}, not a weights file; pass the folder written by save_pretrained")
    if st:
        return "safetensors", st
    if bins:
        return "bin", bins
    if any(p.glob("adapter_model.*")):
        raise UserError(f"{folder} holds a LoRA adapter only; merge it into the base model (merge_and_unload) "
                        "and save_pretrained the result, then diagnose that folder")
    raise UserError(f"model folder {folder} has no weights (*.safetensors or pytorch_model*.bin); "
                    "pass the folder written by save_pretrained")


def _bad_file(f: Path, e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return UserError(f"{f} is truncated or corrupt ({first}); re-save or re-download the checkpoint")


def open_tensors(folder: str | os.PathLike, stack: ExitStack) -> tuple[str, list[StoredTensor]]:
    """Every tensor of a checkpoint as a lazy StoredTensor; files stay open (mmap) until `stack` closes."""
    fmt, files = weight_files(folder)
    out: list[StoredTensor] = []
    if fmt == "safetensors":
        for f in files:
            reader = SafetensorsReader(f)
            stack.callback(reader.close)
            # in file order, so that a full scan reads the file sequentially
            for name in sorted(reader.tensors, key=lambda n: reader.tensors[n][2]):
                dtype, shape, _, _ = reader.tensors[name]
                out.append(StoredTensor(name, dtype, shape, (lambda a, b, _r=reader, _n=name: _r.read(_n, a, b)), f.name))
    else:
        for f in files:
            try:
                # mmap: storages stay on disk and are paged in chunk by chunk as rows are read
                state = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
            except Exception:
                try:  # a legacy (pre-zip) .bin cannot be mapped: load it whole
                    state = torch.load(str(f), map_location="cpu", weights_only=True)
                except Exception as e:
                    raise _bad_file(f, e) from None
            if not isinstance(state, Mapping):
                raise UserError(f"{f} does not hold a state dict; pass the folder written by save_pretrained")
            for name, t in state.items():
                if isinstance(t, torch.Tensor):
                    out.append(in_memory(name, t, f.name))
    return fmt, out


_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
                 "bool": torch.bool, "float8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
                 "float8_e5m2": getattr(torch, "float8_e5m2", None)}
MAX_HEADER = 100 << 20  # the safetensors format caps its JSON header at 100 MB


class SafetensorsReader:
    """Reads row ranges of the tensors of one .safetensors file as zero-copy views of the file's
    pages: each read maps just that byte range (mmap) and the mapping is released as soon as the
    returned tensor is no longer referenced, so a sequential scan holds one chunk's pages at a
    time (a whole-file mapping would count every touched page in this process's RSS) and
    reduces them in place, without the copy a plain read makes. The header (8-byte
    little-endian length, then JSON) is validated against the file size first, so a truncated or
    corrupt file is one clear error."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "rb", buffering=0)
        try:
            self.tensors = self._header()
        except UserError:
            self.file.close()
            raise
        if hasattr(os, "posix_fadvise"):  # the kernel reads ahead of a sequential scan, also for mapped pages
            os.posix_fadvise(self.file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def _header(self) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        size = os.fstat(self.file.fileno()).st_size
        head = self.file.read(8)
        if len(head) < 8:
            raise _bad_file(self.path, ValueError("file shorter than its 8-byte header length"))
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER, size - 8):
            raise _bad_file(self.path, ValueError(f"header length {n} does not fit the {size}-byte file"))
        try:
            header = json.loads(self.file.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad_file(self.path, e) from None
        header.pop("__metadata__", None)
        start, out = 8 + n, {}
        for name, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                shape = tuple(int(x) for x in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError, OverflowError):
                raise _bad_file(self.path, ValueError(f"bad header entry for {name!r}")) from None
            if begin < 0 or end < begin or any(d < 0 for d in shape):  # negative offsets would read before the data
                raise _bad_file(self.path, ValueError(f"negative offset or size in the header entry for {name!r}"))
            tdtype = _TORCH_DTYPES.get(dtype)
            if tdtype is None:
                raise _bad_file(self.path, ValueError(f"unsupported dtype {info['dtype']} for {name!r}"))
            nbytes = (math.prod(shape) if shape else 1) * torch.empty((), dtype=tdtype).element_size()
            if end - begin != nbytes:
                raise _bad_file(self.path, ValueError(f"{name!r} holds {end - begin} bytes for shape {list(shape)}"))
            if start + end > size:
                raise _bad_file(self.path, ValueError(f"file ends at byte {size}, before tensor {name!r} (ends at {start + end})"))
            out[name] = (dtype, shape, start + begin, nbytes)
        return out

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of tensor `name`. The tensor owns its mapping: it stays valid while referenced
        and the pages leave this process's memory when it is dropped. The mapping is private
        copy-on-write, so nothing written to the tensor can reach the file."""
        dtype, shape, offset, nbytes = self.tensors[name]
        rows = shape[0] if shape else 1
        row_bytes = nbytes // max(rows, 1)
        a, b = max(0, a), min(rows, b)
        start, length = offset + a * row_bytes, max(0, (b - a) * row_bytes)
        raw = self._map(start, length) if length else torch.empty(0, dtype=torch.uint8)
        t = raw.view(_TORCH_DTYPES[dtype])
        return t.reshape((b - a, *shape[1:])) if shape else t.reshape(1)

    def _map(self, start: int, length: int) -> torch.Tensor:
        """Bytes [start, start + length) of the file as a uint8 tensor over a fresh mapping."""
        fd = self.file.fileno()
        # touching a mapped page past the end of a file kills the process (SIGBUS): refuse a file
        # that shrank since its header was checked (e.g. overwritten while being diagnosed)
        if os.fstat(fd).st_size < start + length:
            raise _bad_file(self.path, ValueError("the file shrank while being read"))
        base = start - start % mmap.ALLOCATIONGRANULARITY  # mappings start on a granularity boundary
        try:
            mapping = mmap.mmap(fd, start + length - base, access=mmap.ACCESS_COPY, offset=base)
        except (OSError, ValueError):  # a file system without mmap support: a plain read instead
            self.file.seek(start)
            data = torch.empty(length, dtype=torch.uint8)
            if self.file.readinto(memoryview(data.numpy())) != length:
                raise _bad_file(self.path, ValueError("short read")) from None
            return data
        if hasattr(mapping, "madvise"):  # read-ahead on page faults as for sequential reads
            mapping.madvise(mmap.MADV_SEQUENTIAL)
        if hasattr(os, "posix_fadvise"):
            # start reading this chunk and the next one from disk now (asynchronously): a sequential
            # scan then reduces chunk k while chunk k+1 is on its way (cold files: ~1.5x faster)
            os.posix_fadvise(fd, start, 2 * length, os.POSIX_FADV_WILLNEED)
        # the numpy array holds the mapping (a buffer export) and the tensor holds the array, so
        # the pages stay mapped exactly as long as some view of them is alive
        return torch.from_numpy(np.frombuffer(mapping, dtype=np.uint8, count=length, offset=start - base))

    def close(self) -> None:
        self.file.close()  # live views keep their own mappings (mmap holds its own descriptor)


def in_memory(name: str, t: torch.Tensor, file: str = "") -> StoredTensor:
    t = t.detach()
    return StoredTensor(name, str(t.dtype).replace("torch.", ""), tuple(t.shape),
                        (lambda a, b: t[a:b]) if t.dim() else (lambda a, b: t.reshape(1)), file)


# ---- per-tensor statistics -----------------------------------------------------------------------

# IEEE float dtype -> (integer dtype of the same width, its unsigned numpy twin, the sign bit, the
# smallest magnitude pattern that is not finite: all exponent bits set, i.e. inf; NaNs lie above it)
_FLOAT_BITS = {
    torch.bfloat16: (torch.int16, np.uint16, 1 << 15, 0x7F80),
    torch.float16: (torch.int16, np.uint16, 1 << 15, 0x7C00),
    torch.float32: (torch.int32, np.uint32, 1 << 31, 0x7F800000),
    torch.float64: (torch.int64, np.uint64, 1 << 63, 0x7FF0000000000000),
}
BIT_BLOCK = 1 << 20  # bytes reduced per step, so the second pass over them finds them in the CPU cache


def max_magnitude_bits(chunk: torch.Tensor) -> int:
    """max |x| of a CPU float chunk (a dtype of _FLOAT_BITS), as its bit pattern with the sign bit
    cleared: at least the dtype's non-finite pattern when the chunk holds inf or NaN.

    Invariant: in IEEE formats the bits below the sign bit, read as an unsigned integer, order
    values by magnitude (zero < subnormals < normals < inf < NaN). A value with the sign bit clear
    is a non-negative signed integer equal to its magnitude bits, so the signed max over the chunk
    is the largest non-negative value's magnitude (when that max is >= 0). A value with the sign
    bit set is, unsigned, sign bit + magnitude bits, above every value without it, so the
    unsigned max minus the sign bit is the largest negative value's magnitude (when that max is
    >= the sign bit). Two integer max passes: no conversion to float, no temporary tensor.
    """
    int_dtype, unsigned, sign, _ = _FLOAT_BITS[chunk.dtype]
    signed = chunk.reshape(-1).view(int_dtype).numpy()  # zero copy (reshape copies only a strided chunk)
    top, step = -1, max(1, BIT_BLOCK // signed.itemsize)
    for i in range(0, signed.size, step):
        block = signed[i:i + step]
        non_negative = int(block.max())
        top = max(top, non_negative)  # negative: no value without the sign bit in this block
        negative = int(block.view(unsigned).max())
        top = max(top, negative - sign)  # below 0: no value with the sign bit in this block
    return top


def bits_to_float(bits: int, dtype: torch.dtype) -> float:
    """The (non-negative) value of a magnitude bit pattern of a float dtype of _FLOAT_BITS."""
    return torch.tensor(bits, dtype=_FLOAT_BITS[dtype][0]).view(dtype).item()


class _Stats:
    """Per-tensor statistics accumulated chunk by chunk. A float chunk on the CPU costs two
    integer passes over its bits (max_magnitude_bits) when all its values are finite, the common
    case; a chunk holding inf/NaN, or on another device, gets float counting passes."""

    def __init__(self, st: StoredTensor):
        self.st, self.nan, self.inf, self.max_abs = st, 0, 0, None
        self.floating = st.dtype.startswith(("float", "bfloat"))

    def update(self, chunk: torch.Tensor) -> None:
        if chunk.numel() == 0:
            return
        if not self.floating:
            if chunk.dtype == torch.bool:
                m = float(chunk.any())
            else:  # aminmax, not abs().max(): no temporary, and abs(-128) overflows in int8
                lo, hi = torch.aminmax(chunk)
                m = max(-float(lo), float(hi))
        else:
            m = self._finite_max(chunk)
        if m is not None:
            self.max_abs = m if self.max_abs is None else max(self.max_abs, m)

    def _finite_max(self, chunk: torch.Tensor) -> float | None:
        """max |x| over the finite values of a float chunk (None when it has none); counts its NaN/inf."""
        if chunk.dtype in _FLOAT_BITS and chunk.device.type == "cpu":
            top = max_magnitude_bits(chunk)
            if top < _FLOAT_BITS[chunk.dtype][3]:  # below the pattern of inf: every value is finite
                return bits_to_float(top, chunk.dtype)
        else:  # float8, or a tensor on an accelerator: one aminmax pass
            lo, hi = (float(x) for x in torch.aminmax(chunk))
            if math.isfinite(lo) and math.isfinite(hi):  # aminmax propagates NaN and shows inf as an extreme
                return max(-lo, hi)
        # some value is inf or NaN: count them, and take the max over the others
        isnan, isinf = torch.isnan(chunk), torch.isinf(chunk)
        self.nan += int(isnan.sum())
        self.inf += int(isinf.sum())
        finite = chunk[~(isnan | isinf)]
        return float(finite.abs().max()) if finite.numel() else None

    def result(self) -> dict[str, Any]:
        st = self.st
        return {"name": st.name, "dtype": st.dtype, "shape": list(st.shape), "numel": st.numel,
                "max_abs": self.max_abs, "nan": self.nan, "inf": self.inf}


def tensor_stats(st: StoredTensor) -> dict[str, Any]:
    """{name, dtype, shape, numel, max_abs (over finite values), nan, inf} of one tensor."""
    acc = _Stats(st)
    for chunk in st.chunks():
        acc.update(chunk)
    return acc.result()


def _find(names: list[str], suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        hits = [n for n in names if n == suffix or n.endswith("." + suffix)]
        if hits:
            return min(hits, key=len)
    return None


def _tensors_equal(a: StoredTensor, b: StoredTensor) -> tuple[bool, float | None]:
    """(equal, max |a-b|) compared chunk by chunk; different shapes are not equal."""
    if a.shape != b.shape:
        return False, None
    worst = 0.0
    for start, end in a.row_ranges():
        x, y = a.read(start, end).float(), b.read(start, end).float()
        # tied copies are equal bit for bit, NaN and inf included: those positions differ by 0
        same = (x == y) | (x.isnan() & y.isnan())
        d = torch.nan_to_num(torch.where(same, 0.0, (x - y).abs()), nan=float("inf"))
        worst = max(worst, float(d.max()) if d.numel() else 0.0)
    return worst == 0.0, worst


def tied_status(tensors: list[StoredTensor], tie_word_embeddings: bool | None) -> dict[str, Any]:
    by_name = {t.name: t for t in tensors}
    names = list(by_name)
    emb, head = _find(names, EMBEDDING_SUFFIXES), _find(names, LM_HEAD_SUFFIXES)
    out: dict[str, Any] = {"config_tie": tie_word_embeddings, "embedding": emb, "lm_head": head, "equal": None, "max_diff": None}
    if emb and head:
        out["equal"], out["max_diff"] = _tensors_equal(by_name[emb], by_name[head])
    return out


def row_norm_checks(st: StoredTensor, token_ids: Mapping[int, str]) -> list[dict[str, Any]]:
    """Special-token rows of an embedding (or lm_head) matrix: norm, ratio to the mean row norm,
    zero, or an exact duplicate of another checked row. Streams the matrix once."""
    if len(st.shape) != 2:
        return []
    wanted = {i: t for i, t in token_ids.items() if 0 <= i < st.rows}
    rows: dict[int, torch.Tensor] = {}
    total, count, start = 0.0, 0, 0
    for chunk in st.chunks():
        c = chunk.float()
        norms = torch.nan_to_num(c.norm(dim=1), nan=0.0, posinf=0.0)
        total += float(norms.sum())
        count += int(norms.numel())
        for i in wanted:
            if start <= i < start + c.shape[0]:
                rows[i] = c[i - start].clone()
        start += c.shape[0]
    mean = total / max(count, 1)
    out = []
    for i, row in sorted(rows.items()):
        norm = float(row.norm())
        dup = next((j for j, other in rows.items() if j < i and torch.equal(other, row) and norm > 0), None)
        out.append({"token_id": i, "token": wanted[i], "matrix": st.name, "norm": round(norm, 6),
                    "mean_norm": round(mean, 6), "ratio_to_mean": round(norm / mean, 4) if mean > 0 else None,
                    "zero": norm == 0.0, "duplicate_of": dup})
    return out


@dataclass
class WeightScan:
    format: str
    files: list[str]
    total_bytes: int
    weights: list[dict[str, Any]]
    stored_dtypes: dict[str, int]
    tied: dict[str, Any]
    special_rows: list[dict[str, Any]]
    seconds: float


def scan_weights(folder: str | os.PathLike, *, tie_word_embeddings: bool | None = None,
                 special_tokens: Mapping[int, str] | None = None) -> WeightScan:
    """Stream every tensor of a saved model once: per-tensor stats, tied-weight consistency and
    the special-token rows. Memory stays at one chunk plus the (small) per-tensor results."""
    import time

    t0 = time.perf_counter()
    with ExitStack() as stack:
        fmt, tensors = open_tensors(folder, stack)
        _, files = weight_files(folder)
        # in file order, chunk by chunk: the kernel reads ahead (POSIX_FADV_SEQUENTIAL) while a
        # chunk is reduced, and at most two chunks are mapped at any time
        weights = [tensor_stats(t) for t in tensors]
        stored: Counter[str] = Counter()
        for w in weights:
            stored[w["dtype"]] += w["numel"]
        tied = tied_status(tensors, tie_word_embeddings)
        special: list[dict[str, Any]] = []
        if special_tokens:
            by_name = {t.name: t for t in tensors}
            for key in ("embedding", "lm_head"):
                name = tied.get(key)
                if name and not (key == "lm_head" and tied.get("equal")):
                    special += row_norm_checks(by_name[name], special_tokens)
    return WeightScan(fmt, [f.name for f in files], sum(f.stat().st_size for f in files), weights, dict(stored),
                      tied, special, time.perf_counter() - t0)


def weight_change(folder: str | os.PathLike, base_folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Per tensor present in both: relative L2 change ||w - w_base|| / ||w_base||, streamed in
    chunks (fp32 accumulation). Tensors whose shapes differ (resized embeddings) say so."""
    out = []
    with ExitStack() as stack:
        _, tuned = open_tensors(folder, stack)
        _, base = open_tensors(base_folder, stack)
        base_by_name = {t.name: t for t in base}
        for t in tuned:
            b = base_by_name.get(t.name)
            if b is None:
                continue
            if b.shape != t.shape:
                out.append({"name": t.name, "relative_change": None, "shape": list(t.shape), "base_shape": list(b.shape)})
                continue
            diff2 = ref2 = 0.0
            for start, end in t.row_ranges():
                x, y = t.read(start, end).double(), b.read(start, end).double()
                diff2 += float(((x - y) ** 2).sum())
                ref2 += float((y ** 2).sum())
            change, norm = math.sqrt(diff2), math.sqrt(ref2)
            # relative change is undefined for a zero base tensor (e.g. biases initialised to 0)
            rel = change / norm if norm > 0 and math.isfinite(change) else (0.0 if change == 0 else None)
            out.append({"name": t.name, "relative_change": rel, "change": change if math.isfinite(change) else None,
                        "base_norm": norm})
    return out


# ---- what `watch` checks on the weights a script saves ------------------------------------------


def state_dict_weights(state: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per tensor of an in-memory state dict: the weight-scan statistics (name, dtype, numel, nan, inf, max_abs)."""
    return [tensor_stats(in_memory(name, t)) for name, t in state.items() if isinstance(t, torch.Tensor)]


# ---- greedy generation outputs --------------------------------------------------------------------

DEGENERATE_HEAD = 8  # an output whose first (up to) 8 new tokens are one id is degenerate ("!!!!!!!!")
DEGENERATE_MIN = 4  # ... when it has at least this many tokens
PAD_SHARE = 0.5  # or when at least half of its tokens are the pad token / id 0


def split_output(prompt: list[int], output: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """(new tokens up to the first stop id, stopped). A leading copy of the prompt (what
    model.generate returns) is removed; tokens after the stop (batch padding) are dropped."""
    out = list(output)
    if len(out) >= len(prompt) and prompt and out[: len(prompt)] == list(prompt):
        out = out[len(prompt):]
    for k, t in enumerate(out):
        if t in stop_ids:
            return out[:k], True
    return out, False


def is_degenerate(tokens: list[int], pad_ids: set[int]) -> bool:
    if len(tokens) < DEGENERATE_MIN:
        return False
    head = tokens[:DEGENERATE_HEAD]
    if len(set(head)) == 1:
        return True
    return sum(t in pad_ids for t in tokens) >= PAD_SHARE * len(tokens)


@dataclass
class GenerationStats:
    """Greedy outputs measured, not judged (generation-degenerate and generation-never-stops judge).

    cut: per prompt, (new tokens before the first stop id, stopped). firsts: the first new token of
    each output (the stop token itself when it stopped at once). degenerate: one token repeated, or
    mostly pad / id 0 (is_degenerate), or an empty output ended by the pad token / id 0, or (with
    non-finite logits) empty. emits_pad: the output is the pad token / id 0 at once.
    """

    cut: list[tuple[list[int], bool]]
    firsts: list[int | None]
    limit: int  # max_new_tokens (or the longest output when unknown)
    nonfinite: bool | None  # logits NaN/inf somewhere (None: not checked)
    degenerate: list[bool]
    emits_pad: list[bool]
    stop_ids: set[int]
    pad_id: int | None
    pad_is_eos: bool
    tokenizer: Any = None

    @property
    def n(self) -> int:
        return len(self.cut)

    def text(self, token_id: int) -> str:
        tok = self.tokenizer
        return tok.token_text(token_id) if hasattr(tok, "token_text") else ""

    def sample(self, k: int) -> dict[str, Any]:
        tokens, stopped = self.cut[k]
        decode = getattr(self.tokenizer, "decode", None)
        s = decode(tokens[:48]) if decode is not None else " ".join(map(str, tokens[:48]))
        first = self.firsts[k]
        return {"prompt": k, "output": s, "ids": tokens[:16] or ([first] if first is not None else []),
                "tokens": len(tokens), "stopped": stopped}


def measure_generations(prompts: list[list[int]], outputs: list[list[int]], tokenizer_info: Any, *,
                        max_new_tokens: int | None = None, logits_nonfinite: Any = None) -> GenerationStats | None:
    """What greedy outputs look like (None when there are none).

    outputs: per prompt, the generated ids (new tokens, or prompt + new tokens as model.generate
    returns them). logits_nonfinite: True/False (or a share, or a per-prompt list) when known.
    """
    tok = tokenizer_info
    stop_ids = set(getattr(tok, "eos_ids", ()) or ())
    pad_id = getattr(tok, "pad_id", None)
    pad_is_eos = pad_id is not None and pad_id in stop_ids
    pad_ids = {0} | ({pad_id} if pad_id is not None and pad_id not in stop_ids else set())
    cut = [split_output(p, o, stop_ids) for p, o in zip(prompts, outputs)]
    if not cut:
        return None
    firsts = [_first_new(p, o) for p, o in zip(prompts, outputs)]
    limit = max_new_tokens if max_new_tokens is not None else max(len(t) for t, _ in cut)
    if isinstance(logits_nonfinite, (list, tuple)):
        nonfinite = any(bool(x) for x in logits_nonfinite)
    else:
        nonfinite = None if logits_nonfinite is None else bool(logits_nonfinite)
    degenerate = [is_degenerate(t, pad_ids) for t, _ in cut]
    # an output that is the pad token at once (pad == eos, or id 0 as a stop): it "stops" empty, which is
    # the learned-pad symptom, not a model that answers and stops
    emits_pad = [len(t) == 0 and stopped and f is not None and (f == pad_id or f == 0)
                 for (t, stopped), f in zip(cut, firsts)]
    if nonfinite:
        # NaN logits argmax to id 0; where id 0 is also the end token the output "stops" at once,
        # empty rather than `!!!!`: still degenerate, numerical family.
        degenerate = [d or len(t) == 0 for d, (t, _) in zip(degenerate, cut)]
    degenerate = [d or e for d, e in zip(degenerate, emits_pad)]
    return GenerationStats(cut, firsts, limit, nonfinite, degenerate, emits_pad, stop_ids, pad_id, pad_is_eos, tok)


def _first_new(prompt: list[int], output: list[int]) -> int | None:
    out = list(output)
    if len(out) >= len(prompt) and prompt and out[: len(prompt)] == list(prompt):
        out = out[len(prompt):]
    return out[0] if out else None


def read_generation_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """eos/pad ids the way a generation stack reads them: generation_config.json, else config.json."""
    for fname in ("generation_config.json", "config.json"):
        p = Path(folder) / fname
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        eos = data.get("eos_token_id")
        if eos is None and fname == "config.json" and "text_config" in data:
            eos = data["text_config"].get("eos_token_id")
        eos_list = [int(x) for x in (eos if isinstance(eos, list) else [eos]) if isinstance(x, int)]
        return {"eos_token_id": eos_list, "pad_token_id": data.get("pad_token_id"), "source": fname}
    return None

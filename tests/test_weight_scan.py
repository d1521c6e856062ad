"""The weight scan's statistics on the raw float bits equal a straightforward float computation,
and the mapped chunk reads of a safetensors file are exact, private and released."""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

import sftdoctor.checkpoint as ck
from sftdoctor.checkpoint import SafetensorsReader, in_memory, max_magnitude_bits, scan_weights, tensor_stats
from sftdoctor.errors import UserError

FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def reference(t: torch.Tensor) -> tuple[int, int, float | None]:
    """(nan, inf, max |x| over the finite values) the plain way, in float64."""
    x = t.double().reshape(-1)
    finite = x[torch.isfinite(x)]
    return int(torch.isnan(x).sum()), int(torch.isinf(x).sum()), float(finite.abs().max()) if finite.numel() else None


def scanned(t: torch.Tensor) -> tuple[int, int, float | None]:
    s = tensor_stats(in_memory("w", t))
    return s["nan"], s["inf"], s["max_abs"]


def special_values(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    info = torch.finfo(dtype)
    tiny_sub = info.smallest_normal * info.eps  # the smallest subnormal
    neg_nan = (torch.tensor([float("nan")], dtype=dtype).view(INT_OF[dtype]) | torch.iinfo(INT_OF[dtype]).min).view(dtype)
    v = lambda *xs: torch.tensor(xs, dtype=dtype)  # noqa: E731
    return {
        "normal mix": v(0.5, -0.75, 0.0, -0.0, 3.0, -2.5),
        "negative larger": v(0.25, -7.0, 1.0),
        "only negatives": v(-1.0, -3.5, -0.0),
        "only -0.0": v(-0.0, -0.0),
        "only +0.0": v(0.0),
        "subnormals": v(tiny_sub, -tiny_sub * 3, info.smallest_normal / 2, -0.0),
        "extremes": v(info.max, -info.max, info.tiny),
        "+inf": v(1.0, float("inf"), -2.0),
        "-inf": v(1.0, float("-inf"), -2.0),
        "nan": v(-5.0, float("nan"), 4.0),
        "negative nan": torch.cat([v(6.0, -1.0), neg_nan]),
        "all non-finite": v(float("nan"), float("inf"), float("-inf")),
        "inf and subnormal": v(float("inf"), -tiny_sub),
    }


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_bit_stats_equal_float_stats_on_special_values(dtype):
    for case, t in special_values(dtype).items():
        assert scanned(t) == reference(t), (dtype, case)
        # also as a strided view (a user's transposed tensor)
        wide = torch.stack([t, t]).t()
        assert scanned(wide) == reference(wide), (dtype, case, "strided")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_magnitude_bits_order_every_16_bit_value(dtype):
    """The invariant max_magnitude_bits relies on, checked on all 65536 patterns: the bits below the
    sign bit order the values by magnitude, and inf's pattern is the first non-finite one."""
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).double()
    magnitude = bits.to(torch.int32) & 0x7FFF
    inf_bits = ck._FLOAT_BITS[dtype][3]
    assert torch.equal(~torch.isfinite(values), magnitude >= inf_bits)
    finite = magnitude < inf_bits
    order = torch.argsort(magnitude[finite], stable=True)
    assert bool((values[finite].abs()[order].diff() >= 0).all())
    # and on the whole range at once: max |x| of the finite values, NaN and inf counts
    assert scanned(bits.view(dtype)) == reference(bits.view(dtype))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_bit_stats_equal_float_stats_on_random_bit_patterns(dtype):
    """Random bit patterns (every exponent, so subnormals, inf and NaN of both signs occur) in
    random-sized chunks, and the same with the non-finite values removed (the fast path)."""
    g = torch.Generator().manual_seed(1)
    size = torch.finfo(dtype).bits // 8
    for _ in range(60):
        n = int(torch.randint(1, 300, (1,), generator=g))
        t = torch.randint(0, 256, (n * size,), generator=g, dtype=torch.uint8).view(dtype)
        assert scanned(t) == reference(t)
        finite = t[torch.isfinite(t)]
        assert scanned(finite) == reference(finite)
        if finite.numel():
            top = max_magnitude_bits(finite)
            assert ck.bits_to_float(top, dtype) == float(finite.double().abs().max())


def test_integer_and_bool_stats():
    assert scanned(torch.tensor([-128, 3, 100], dtype=torch.int8))[2] == 128.0  # abs(-128) would overflow
    assert scanned(torch.tensor([5, 250], dtype=torch.uint8))[2] == 250.0
    assert scanned(torch.tensor([False, True]))[2] == 1.0


def test_mapped_scan_is_exact_private_and_released(tmp_path, monkeypatch):
    weights = {
        "bf16": (torch.randn(33, 17) * 0.02).to(torch.bfloat16),
        "fp16": torch.randn(9, 5).to(torch.float16),
        "fp32": torch.randn(40),
        "scalar": torch.tensor(-3.0),
        "empty": torch.zeros(0, 4),
    }
    weights["fp16"][2, 3] = float("-inf")
    weights["bf16"][30, 0] = -1e30
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(ck, "CHUNK_ELEMENTS", 20)  # many chunks, each its own mapping
    monkeypatch.setattr(ck, "BIT_BLOCK", 8)  # several integer blocks per chunk
    scan = scan_weights(tmp_path)
    got = {w["name"]: (w["nan"], w["inf"], w["max_abs"], w["dtype"]) for w in scan.weights}
    for name, t in weights.items():
        assert got[name] == (*reference(t), str(t.dtype).removeprefix("torch.")), name
    assert got["fp16"][1] == 1 and got["bf16"][2] == reference(weights["bf16"])[2] > 1e29

    path = tmp_path / "model.safetensors"
    if sys.platform.startswith("linux"):  # nothing of the file stays mapped after the scan
        with open("/proc/self/maps") as maps:
            assert str(path) not in maps.read()
    before = path.read_bytes()
    reader = SafetensorsReader(path)
    try:
        chunk = reader.read("fp32", 0, 40)
        assert torch.equal(chunk, weights["fp32"])
        chunk.fill_(7.0)  # a private copy-on-write mapping: the file is untouched
        assert torch.equal(reader.read("fp32", 0, 40), weights["fp32"])
    finally:
        reader.close()
    del chunk
    assert path.read_bytes() == before


def test_file_shrunk_after_opening_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    reader = SafetensorsReader(path)
    try:
        with open(path, "r+b") as f:  # e.g. overwritten by a training run while being diagnosed
            f.truncate(path.stat().st_size // 2)
        with pytest.raises(UserError, match="shrank"):
            reader.read("w", 0, 64)
    finally:
        reader.close()

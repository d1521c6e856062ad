"""What the step hooks observe, as plain data, and the tensor reductions that produce it.

Probes read StepRecord (ctx.step) and RunHistory (ctx.run); neither holds a tensor of the
model's graph. The reductions here run on the device and reduce [B, T, V] logits and their
gradient to [B, T] vectors in chunks of whole rows (temporaries are chunk-sized, never
[B, T, V]); each chunk is read from memory once and its other passes hit the cache. The
results are moved to the host once per step (`to_host`).

Alignment used everywhere below: logits row t predicts the token at position t + 1 (HF causal
LM convention), so a row's *target class* is the class of position t + 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import torch

from .context import IGNORE_INDEX, Batch, TokenizerInfo
from .tokens import CLASS_NAMES, TokenClass, classify

FP16_MAX = 65504.0
HEADROOM_FACTOR = 4.0  # precision-headroom: within this factor of the dtype's max
DTYPE_MAX = {
    torch.float16: FP16_MAX,
    torch.bfloat16: float(torch.finfo(torch.bfloat16).max),
    torch.float32: float(torch.finfo(torch.float32).max),
    torch.float64: float(torch.finfo(torch.float64).max),
}
LOW_PRECISION = ("float16", "bfloat16")
# Candidate targets compared with each logits row's effective target: target == input_ids[t + k].
OFFSETS = (0, 1, 2)
CORRECT_OFFSET = 1  # logits[t] must predict input_ids[t + 1]


def dtype_name(dt: Any) -> str:
    return str(dt).replace("torch.", "")


def dtype_limit(dt: Any) -> float | None:
    for k, v in DTYPE_MAX.items():
        if dtype_name(k) == dtype_name(dt):
            return v
    return None


@dataclass
class StepRecord:
    """One micro-step (one forward, usually one backward) as observed by the hooks."""

    step: int  # micro-step index, 0-based
    optimizer_step_index: int  # optimizer steps (attempts) completed before this micro-step
    full: bool  # the full probe set ran (else only the cheap checks)
    optimizer_step: bool = False  # an optimizer step (or a scaler-skipped one) followed this micro-step
    backward_seen: bool = False
    loss: float | None = None  # the model's loss if it returned one, else the tensor given to .backward()
    backward_loss: float | None = None  # what .backward() was called on (divided by the GradScaler scale)
    loss_source: str | None = None  # "model" | "backward"
    raw_loss: float | None = None  # the model's own loss when `loss` was rescaled (num_items_in_batch, see attach)
    loss_scale: float | None = None
    lr: float | None = None
    grad_norm: float | None = None  # global L2 norm of parameter grads after this backward (unscaled)
    nonfinite_grad_params: list[str] = field(default_factory=list)
    params: dict[str, Any] | None = None  # trainable / with grad / missing from optimizer (see attach)
    supervised_tokens: int | None = None
    supervised_source: str | None = None  # "labels" | "gradient"
    empty_rows: int | None = None  # rows with no supervised token (labels passed to the model): a per-row mean is 0/0
    scaler_active: bool = False
    dtypes: dict[str, Any] = field(default_factory=dict)  # param, config, autocast, compute, adam_eps_fp16_zero
    logits_requires_grad: bool | None = None
    # ---- full steps only ----
    activations: list[dict[str, Any]] = field(default_factory=list)  # forward (call order) then backward
    logits: dict[str, Any] | None = None  # dtype, positions, nonfinite_positions, nonfinite_share, rows
    by_class: dict[str, dict[str, Any]] = field(default_factory=dict)
    argmax: dict[str, Any] | None = None  # histogram, positions, top token, natural share
    targets: dict[str, Any] | None = None  # effective-target match rates, per-class gradient
    token_weight: float | None = None  # median d loss / d logit weight per supervised token
    grad_positions_nonfinite: int = 0
    fp16_forecast: dict[str, Any] | None = None  # from a non-fp16 forward: modules that would overflow in fp16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics_row(self) -> dict[str, Any]:
        """The report.metrics["steps"] row (keys read by the HTML renderer)."""
        return {
            "step": self.step, "optimizer_step": self.optimizer_step, "loss": self.loss,
            "loss_source": self.loss_source, "backward_loss": self.backward_loss,
            "grad_norm": self.grad_norm, "loss_scale": self.loss_scale, "lr": self.lr,
            "supervised_tokens": self.supervised_tokens, "by_class": self.by_class, "full": self.full,
            **({"raw_loss": self.raw_loss} if self.raw_loss is not None else {}),
        }


@dataclass
class OptimizerStep:
    index: int
    micro_steps: list[int]  # StepRecord.step of the micro-steps accumulated into it
    skipped: bool = False  # GradScaler found inf/NaN grads and did not call optimizer.step()
    scale_after: float | None = None
    lr: float | None = None


@dataclass
class RunHistory:
    """The time series a run-level probe reads. `checked_*` mark what earlier probe passes saw,
    so run probes look only at new points (O(window) per step, not O(run))."""

    records: list[StepRecord] = field(default_factory=list)
    optimizer_steps: list[OptimizerStep] = field(default_factory=list)
    scaler_seen: bool = False
    scales: list[float] = field(default_factory=list)  # GradScaler scale after each update()
    checked_records: int = 0
    checked_optimizer_steps: int = 0

    _by_step: dict[int, StepRecord] = field(default_factory=dict, repr=False)

    def add(self, record: StepRecord) -> None:
        self.records.append(record)
        self._by_step[record.step] = record

    def record(self, step: int) -> StepRecord | None:
        return self._by_step.get(step)


# ---------------------------------------------------------------------------------------------
# Device-side reductions (run inside hooks, under no_grad; return small device tensors)
# ---------------------------------------------------------------------------------------------

def candidate_targets(input_ids: torch.Tensor, labels: torch.Tensor | None, pad_id: int | None) -> torch.Tensor:
    """[B, T, K] ids each logits row is compared with: input_ids[t + k] for k in OFFSETS, the pad
    id, and labels[t + 1] (the HF target) when labels were passed; -1 where undefined."""
    B, T = input_ids.shape
    cols = []
    for k in OFFSETS:
        c = torch.full_like(input_ids, -1)
        if k < T:
            c[:, : T - k] = input_ids[:, k:]
        cols.append(c)
    cols.append(torch.full_like(input_ids, -1 if pad_id is None else int(pad_id)))
    lab = torch.full_like(input_ids, -1)
    if labels is not None and labels.shape == input_ids.shape:
        shifted = labels[:, 1:]  # HF shift: logits[t] is scored against labels[t + 1]
        lab[:, : T - 1] = torch.where(shifted == IGNORE_INDEX, torch.full_like(shifted, -1), shifted)  # no sync
    cols.append(lab)
    return torch.stack(cols, dim=-1)


CANDIDATE_NAMES = [f"offset_{k}" for k in OFFSETS] + ["pad", "labels"]


@lru_cache(maxsize=64)
def _block_width(V: int) -> int:
    """Width of the column blocks of the block-extreme arg-max/min search: a divisor of V in
    [256, 4096] as close to 1024 as possible (32000 -> 1000, 151936 -> 1187), so the blocks tile
    a row exactly; V itself when V < 256; else (V > 4096 without such a divisor) 1024 with a
    narrower leftover block."""
    if V < 256:
        return V
    fits = [w for w in range(256, min(V, 4096) + 1) if V % w == 0]
    return min(fits, key=lambda w: abs(w - 1024)) if fits else 1024


def _block_extreme(x: torch.Tensor, width: int, largest: bool, whole: torch.Tensor,
                   tail: torch.Tensor | None) -> torch.Tensor:
    """Per row of a contiguous [r, V] chunk: the max (or min) of each `width`-column block into
    `whole` [r, V // width], of the leftover columns (when V % width) into `tail` [r]. One pass,
    no temporary. Returns the row max (or min). amax/amin, maximum/minimum all propagate NaN, so
    a row holding a NaN gets NaN there (as x.amax(-1) would)."""
    r, V = x.shape
    n = V // width
    reduce = torch.amax if largest else torch.amin
    if V % width == 0:
        reduce(x.view(r, n, width), dim=-1, out=whole)
        return reduce(whole, dim=-1, keepdim=True)
    reduce(x.as_strided((r, n, width), (x.stride(0), width, 1)), dim=-1, out=whole)
    reduce(x[:, n * width:], dim=-1, out=tail)
    both = torch.maximum if largest else torch.minimum
    return both(reduce(whole, dim=-1), tail)[:, None]


def _arg_from_blocks(flat: torch.Tensor, width: int, whole: torch.Tensor, tail: torch.Tensor | None,
                     largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the max (or min) of every row of `flat` [N, V], given the block extremes
    of every row (_block_extreme). Equal to flat.max(-1) / flat.min(-1): first occurrence, NaN
    counted as the extreme. Why: argmax/argmin over the blocks return the FIRST block holding the
    row's extreme (or its first NaN, NaN being the extreme for them too); no earlier block holds
    that value, and inside the block max/min return the first occurrence again. Reads one window
    of `width` values per row (not the row), once for all rows."""
    N, V = flat.shape
    heads = whole if tail is None else torch.cat([whole, tail[:, None]], dim=1)
    best = heads.argmax(-1) if largest else heads.argmin(-1)
    # The leftover block is narrower than `width`: its window [V - width, V) also covers the end of
    # the block before it, whose values are all strictly less extreme (else argmax/argmin would
    # have picked that earlier block), so the first extreme inside the window is still in the tail.
    start = (best * width).clamp_(max=V - width)
    window = flat.unfold(1, width, 1)[torch.arange(N, device=flat.device), start]  # [N, width] copy
    vals, pos = window.max(-1) if largest else window.min(-1)
    return vals.float(), start + pos


CHUNK_ELEMENTS = 1 << 17  # CPU: logits rows are reduced in chunks of ~128K values (512 KB in float32)
CHUNK_ELEMENTS_ACCELERATOR = 1 << 22  # GPU: ~4M values (16 MB) per chunk, few kernel launches


def _chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk. On CPU a chunk and the two same-sized float32 buffers used with it
    (3 x 512 KB) stay in a core's L2 cache, so every pass after the first over a chunk reads the
    cache, not memory; smaller chunks would cost more Python dispatch (about ten torch calls per
    chunk). On an accelerator the chunk only bounds the buffers' memory: larger chunks, fewer
    kernel launches. Chunks hold whole rows whatever the size."""
    elements = CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR
    return max(1, elements // max(vocab, 1))


def _as_f32(x: torch.Tensor) -> torch.Tensor:
    """A chunk as a contiguous float32 tensor: itself when it already is one, else a copy of the
    chunk only (bf16/fp16 logits), never of the whole tensor."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
    return x


@torch.no_grad()
def logits_forward_stats(logits: torch.Tensor, candidates: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per logits row: logsumexp, L2 norm, entropy, argmax, max and min (the lm_head's max |output|),
    and the logit at each candidate target.

    Row-chunked (see _chunk_rows): a chunk is read from memory once, by its first pass (block
    maxima); the other passes (min, norm, x - max, exp, two sums) read it, or chunk-sized buffers,
    from the cache. Every statistic is a reduction over one row, and a chunk holds whole rows, so
    the chunked result is exactly the whole-tensor one. The argmax and the candidate logits are
    gathers done once after the loop. Extra memory: two chunk-sized float32 buffers and a few
    [B*T] vectors, whatever the batch."""
    B, T, V = logits.shape
    N = B * T
    dev = logits.device
    flat = logits.detach().reshape(N, V)
    width = _block_width(V)
    f32 = dict(device=dev, dtype=torch.float32)
    block_max = torch.empty(N, V // width, **f32)
    tail_max = torch.empty(N, **f32) if V % width else None
    row_min, norm, exp_sum, exp_dot = (torch.empty(N, **f32) for _ in range(4))
    rows = _chunk_rows(V, dev)
    buf_a = torch.empty(min(rows, N), V, **f32)
    buf_b = torch.empty_like(buf_a)
    tails = tail_max.split(rows) if tail_max is not None else [None] * len(range(0, N, rows))
    for x, bmax, tmax, rmin, nrm, s, dot in zip(flat.split(rows), block_max.split(rows), tails, row_min.split(rows),
                                                norm.split(rows), exp_sum.split(rows), exp_dot.split(rows)):
        x = _as_f32(x)
        n = x.shape[0]
        shifted, expd = (buf_a, buf_b) if n == buf_a.shape[0] else (buf_a[:n], buf_b[:n])
        mx = _block_extreme(x, width, True, bmax, tmax)  # [n, 1] row max (NaN if the row has one)
        torch.amin(x, dim=-1, out=rmin)
        torch.linalg.vector_norm(x, dim=-1, out=nrm)  # inf/NaN propagate: doubles as the finiteness test
        torch.sub(x, mx, out=shifted)  # x - max <= 0
        if dev.type == "cpu" and bool(((rmin - mx[:, 0]) < -80.0).any()):  # CPU only: no device sync
            shifted.clamp_(min=-80.0)  # exp below -87 is denormal in fp32: ~100x slower on CPU, and adds < 1e-34
        torch.exp(shifted, out=expd)  # e = exp(x - max), into a separate buffer
        torch.sum(expd, dim=-1, out=s)  # s = sum e >= 1 (the max's own term is exp(0) = 1)
        torch.sum(expd.mul_(shifted), dim=-1, out=dot)  # sum e * (x - max)
    row_max, argmax = _arg_from_blocks(flat, width, block_max, tail_max, largest=True)
    log_s = exp_sum.log()
    out = {
        "lse": row_max + log_s,  # lse = max + log sum exp(x - max)
        "logit_norm": norm,
        "entropy": log_s - exp_dot / exp_sum,  # H = lse - sum p x = log s - sum p (x - max), p = e / s
        "argmax": argmax, "row_max": row_max, "row_min": row_min,
    }
    out = {k: v.reshape(B, T) for k, v in out.items()}
    if candidates is not None:  # one gather of [N, K] values for all rows, not a pass over the logits
        # an id the logits have no column for (a pad id added to the tokenizer, embeddings not resized
        # (yet)) reads column 0 and is marked NaN: never an out-of-bounds gather
        cflat = candidates.reshape(N, candidates.shape[-1])
        outside = (cflat < 0) | (cflat >= V)
        got = flat.gather(-1, cflat.masked_fill(outside, 0)).float()
        out["cand_logit"] = got.masked_fill(outside, float("nan")).reshape(B, T, cflat.shape[-1])
    return out


@torch.no_grad()
def logits_grad_stats(grad: torch.Tensor, logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per logits row of d loss / d logits: L2 norm, most negative coordinate and its index (the
    effective target of a cross-entropy-like loss: softmax - onehot is negative only there), and
    the logit at the target when the logits are still alive. For such a loss |g[target]| is also the
    row's largest |coordinate| (w (1 - p_y) >= w p_j), so no max pass is spent on it.

    Row-chunked like logits_forward_stats: per chunk of whole rows, the block minima read it from
    memory and the norm from the cache; both are per-row reductions, so chunking changes nothing."""
    B, T, V = grad.shape
    N = B * T
    dev = grad.device
    flat = grad.detach().reshape(N, V)
    width = _block_width(V)
    f32 = dict(device=dev, dtype=torch.float32)
    block_min = torch.empty(N, V // width, **f32)
    tail_min = torch.empty(N, **f32) if V % width else None
    gnorm = torch.empty(N, **f32)
    rows = _chunk_rows(V, dev)
    tails = tail_min.split(rows) if tail_min is not None else [None] * len(range(0, N, rows))
    for g, bmin, tmin, nrm in zip(flat.split(rows), block_min.split(rows), tails, gnorm.split(rows)):
        g = _as_f32(g)
        _block_extreme(g, width, False, bmin, tmin)
        torch.linalg.vector_norm(g, dim=-1, out=nrm)  # inf/NaN propagate: the finiteness test
    gmin, target = _arg_from_blocks(flat, width, block_min, tail_min, largest=False)
    out = {"grad_norm": gnorm.reshape(B, T), "grad_min": gmin.reshape(B, T), "target": target.reshape(B, T)}
    if logits is not None and tuple(logits.shape) == (B, T, V):
        out["target_logit"] = logits.detach().gather(-1, out["target"][..., None])[..., 0].float()
    return out


def same_device(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors, moved to the first one's device when a model is split over several devices."""
    dev = tensors[0].device
    if all(t.device == dev for t in tensors):
        return tensors
    return [t.to(dev) for t in tensors]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 fully_shard, tensor parallel), else t itself. Never a
    collective: full_tensor() would all-gather, and a peer may be dead or stuck."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and type(t).__name__ == "DTensor" else t


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor split over ranks (some Shard placement): its local part is not the whole tensor."""
    return type(t).__name__ == "DTensor" and any(p.is_shard() for p in getattr(t, "placements", ()))


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move many small device tensors to the CPU with ONE transfer (one host sync)."""
    items = [(k, local_tensor(t)) for k, t in tensors.items() if t is not None]
    if not items:
        return {}
    flat = torch.cat([t.detach().reshape(-1).to(dtype=torch.float64) for t in same_device([t for _, t in items])]).cpu()
    out, i = {}, 0
    for k, t in items:
        n = t.numel()
        v = flat[i: i + n].reshape(t.shape)
        out[k] = v.long() if not t.is_floating_point() and t.dtype != torch.bool else (v.bool() if t.dtype == torch.bool else v)
        i += n
    return out


# ---------------------------------------------------------------------------------------------
# Host-side analysis of one full step (small [B, T] CPU tensors)
# ---------------------------------------------------------------------------------------------

def target_classes(classes: torch.Tensor) -> torch.Tensor:
    """[B, T] class of the position each logits row predicts: class[t + 1]; the last row keeps
    its own position's class (nothing follows it)."""
    return torch.cat([classes[:, 1:], classes[:, -1:]], dim=1)


def analyze_tokens(fwd: dict[str, torch.Tensor], grad: dict[str, torch.Tensor], batch: Batch,
                   tok: TokenizerInfo | None) -> dict[str, Any]:
    """Per-class logit norm / entropy / loss / gradient, effective targets, argmax histogram."""
    ids = batch.input_ids
    B, T = ids.shape
    out: dict[str, Any] = {}
    have_grad = bool(grad)
    supervised = torch.zeros(B, T, dtype=torch.bool)
    grad_finite = torch.ones(B, T, dtype=torch.bool)
    target = torch.full((B, T), -1, dtype=torch.long)
    if have_grad:
        gn = grad["grad_norm"]
        grad_finite = torch.isfinite(gn)
        # a row gets loss iff its logits gradient is non-zero (masked CE gives exactly 0)
        supervised = grad_finite & (gn > 0)
        target = torch.where(supervised, grad["target"], torch.full_like(grad["target"], -1))
    # Classes: from the labels seen by the forward; without labels, from the gradient itself.
    if batch.labels is None and have_grad:
        eff = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        eff[:, 1:] = torch.where(supervised[:, :-1], target[:, :-1], torch.full_like(target[:, :-1], IGNORE_INDEX))
        cls_batch = Batch(input_ids=ids, attention_mask=batch.attention_mask, labels=eff, labels_source="gradient")
        classes = classify(cls_batch, tok)
        out["classes_source"] = "gradient"
    else:
        classes = classify(batch, tok)
        out["classes_source"] = "labels" if batch.labels is not None else "none"
    tcls = target_classes(classes)

    # Per-token loss at the effective target: lse - logit[target].
    token_loss = torch.full((B, T), float("nan"), dtype=torch.float64)
    if have_grad and "lse" in fwd:
        logit_t = torch.full((B, T), float("nan"), dtype=torch.float64)
        if "target_logit" in grad:
            logit_t = grad["target_logit"].double()
        elif "cand_logit" in fwd:
            cands = candidate_targets(ids, batch.labels, tok.pad_id if tok else None)
            hit = cands == target[..., None]
            any_hit = hit.any(-1)
            first = hit.float().argmax(-1)
            got = fwd["cand_logit"].gather(-1, first[..., None])[..., 0]
            logit_t = torch.where(any_hit, got, logit_t)
        token_loss = torch.where(supervised, fwd["lse"] - logit_t, token_loss)
    out["token_loss"] = token_loss

    # Per-token weight of the loss: for softmax cross-entropy, g[target] = w * (p - 1).
    if have_grad:
        p = torch.exp(-token_loss)
        ok = supervised & torch.isfinite(p) & ((1 - p) > 1e-3)
        w = (-grad["grad_min"] / (1 - p))[ok]
        out["token_weight"] = float(w.median()) if w.numel() else None

    by_class: dict[str, dict[str, Any]] = {}
    for c in TokenClass:
        m = tcls == int(c)
        n = int(m.sum())
        row: dict[str, Any] = {"tokens": n}
        if n:
            for key in ("logit_norm", "entropy"):
                if key in fwd:
                    v = fwd[key][m]
                    v = v[torch.isfinite(v)]
                    row[key] = float(v.mean()) if v.numel() else None
            if have_grad:
                sup = m & supervised
                row["supervised"] = int(sup.sum())
                lv = token_loss[sup]
                lv = lv[torch.isfinite(lv)]
                row["loss"] = float(lv.mean()) if lv.numel() else None
                g = grad["grad_norm"][m & grad_finite]
                row["grad_norm"] = float(torch.linalg.vector_norm(g.double())) if g.numel() else 0.0
                row["grad_nonfinite"] = int((m & ~grad_finite).sum())
        by_class[c.label] = row
    out["by_class"] = by_class

    if have_grad:
        n_sup = int(supervised.sum())
        cands = candidate_targets(ids, None, tok.pad_id if tok else None)
        match = {}
        for j, k in enumerate(OFFSETS):
            match[str(k)] = round(float((supervised & (target == cands[..., j])).sum()) / max(n_sup, 1), 4)
        match["pad"] = (round(float((supervised & (target == tok.pad_id)).sum()) / max(n_sup, 1), 4)
                        if tok is not None and tok.pad_id is not None else None)
        per_class = {c.label: int((supervised & (tcls == int(c))).sum()) for c in TokenClass}
        tv = target[supervised]
        common = torch.bincount(tv, minlength=1).topk(min(5, int(tv.max()) + 1)) if tv.numel() else None
        out["targets"] = {
            "supervised_positions": n_sup,
            "match": match,
            "supervised_by_class": per_class,
            "grad_nonfinite_positions": int((~grad_finite).sum()),
            "common_targets": ([{"token_id": i, "count": c} for c, i in zip(common.values.tolist(), common.indices.tolist()) if c > 0]
                               if common is not None else []),
        }
        out["supervised_tokens"] = n_sup
        out["grad_positions_nonfinite"] = int((~grad_finite).sum())

    # Non-finite logits and the argmax histogram, over real (non-pad) positions.
    real = classes != int(TokenClass.PAD)
    if "logit_norm" in fwd:
        finite = torch.isfinite(fwd["logit_norm"])
        n_real = int(real.sum())
        bad = real & ~finite
        out["logits"] = {
            "positions": n_real,
            "nonfinite_positions": int(bad.sum()),
            "nonfinite_share": round(int(bad.sum()) / max(n_real, 1), 4),
            "nonfinite_all_positions": int((~finite).sum()),
            "rows": sorted({int(r) for r in (~finite).nonzero()[:, 0].tolist()})[:32],
        }
    if "argmax" in fwd:
        am = fwd["argmax"][real]
        n = int(am.numel())
        if n:
            counts = torch.bincount(am)
            top = counts.topk(min(5, counts.numel()))
            hist = [{"token_id": i, "count": c, "share": round(c / n, 4)}
                    for c, i in zip(top.values.tolist(), top.indices.tolist()) if c > 0]
            if tok is not None:
                for h in hist:
                    h["text"] = tok.token_text(h["token_id"])
            top_id = hist[0]["token_id"]
            nxt = torch.cat([ids[:, 1:], torch.full((B, 1), -1, dtype=ids.dtype)], dim=1)[real]
            at_top = real & (fwd["argmax"] == top_id)
            top_nonfinite = int((at_top & ~torch.isfinite(fwd["logit_norm"])).sum()) if "logit_norm" in fwd else 0
            out["argmax"] = {
                "positions": n, "histogram": hist, "top_token": top_id, "top_share": hist[0]["share"],
                "natural_share": round(float((nxt == top_id).sum()) / n, 4),  # how often it really comes next
                "top_nonfinite_share": round(top_nonfinite / max(int(at_top.sum()), 1), 4),
            }
    # Token-view extras aligned like HF labels: value at position i comes from logits row i - 1.
    def align(x: torch.Tensor, fill: float) -> torch.Tensor:
        y = torch.full_like(x, fill)
        y[:, 1:] = x[:, :-1]
        return y
    if have_grad:
        out["sample_extra"] = {
            "effective_target": align(target.masked_fill(~supervised, IGNORE_INDEX), IGNORE_INDEX),
            "token_loss": align(token_loss.float(), float("nan")),
            "grad_norm": align(grad["grad_norm"].float(), 0.0),
        }
    out["class_names"] = CLASS_NAMES
    return out

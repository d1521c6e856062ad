"""Whole-dataset inspection: the batch checks on every batch, findings aggregated per id over the
dataset (level `dataset`), and the per-row statistics users look at before training.

Memory is constant in the number of rows except for duplicate detection (16 bytes per row, up
to DUP_CAP_ROWS rows): every other statistic is a count, a sum, a histogram of token counts
(bounded by the longest row) or a few example rows per finding id. Every statistic is computed
on whole [B, T] tensors (no Python loop over tokens).

    inspector = DatasetInspector(tokenizer, model)
    for batch in loader:
        inspector.add(batch)
    report = inspector.report()
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from .context import Batch, Hints, ModelInfo, ProbeContext, TokenizerInfo
from .engine import Registry
from .errors import UserError
from .findings import CheckResult, Finding
from .probes import REGISTRY
from .probes._common import arrays
from .probes._dataset import DEFAULT, Tally
from .report import Report
from .session import Session
from .tokens import TokenClass

DUP_CAP_ROWS = 5_000_000  # rows hashed for exact-duplicate detection (16 bytes each); later rows are not
SAMPLE_TOKENS = 1024  # tokens kept per worst-row token view
WORST_ROWS = 4  # token views in the report (the first example of the most severe findings)
_HASH_CHUNK = 4096


def _coefficients(n: int, _cache: dict = {}) -> torch.Tensor:  # noqa: B006 (a module-level cache on purpose)
    """Random int64 hash coefficients per position, the same for every run (seeded per chunk)."""
    have = _cache.get("c")
    if have is None or have.numel() < n:
        chunks = -(-n // _HASH_CHUNK)
        parts = [torch.from_numpy(np.random.default_rng(1000 + k).integers(-(2 ** 62), 2 ** 62, _HASH_CHUNK, dtype=np.int64) | 1)
                 for k in range(chunks)]
        _cache["c"] = have = torch.cat(parts)
    return have[:n]


def _percentiles(counts: np.ndarray) -> dict[str, float | int] | None:
    """min / p50 / p90 / p99 / max / mean of the values whose histogram (value -> count) is given."""
    total = int(counts.sum())
    if total == 0:
        return None
    values = np.nonzero(counts)[0]
    cum = np.cumsum(counts)

    def q(p):
        return int(np.searchsorted(cum, p * total, side="left"))

    return {"min": int(values[0]), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": int(values[-1]),
            "mean": round(float((np.arange(len(counts)) * counts).sum() / total), 2)}


def _histogram(counts: np.ndarray, bins: int = 40) -> dict[str, list] | None:
    """The value -> count histogram folded into at most `bins` equal-width bins (for plots)."""
    nz = np.nonzero(counts)[0]
    if not nz.size:
        return None
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    width = max(1, -(-(hi - lo) // bins))
    edges = list(range(lo, hi + width, width))
    folded = np.add.reduceat(counts[lo:hi], np.arange(0, hi - lo, width))
    return {"edges": edges[:len(folded) + 1], "counts": [int(c) for c in folded]}


def _grow_add(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    add = np.bincount(values, minlength=len(counts))
    if len(add) > len(counts):
        counts = np.concatenate([counts, np.zeros(len(add) - len(counts), dtype=np.int64)])
    counts[:len(add)] += add
    return counts


class RowStats:
    """Per-row statistics over every batch seen, in (near) constant memory."""

    def __init__(self) -> None:
        self.rows = self.batches = 0
        self.positions = self.pad_positions = self.real_tokens = self.supervised_tokens = 0
        self.rows_no_supervised = self.rows_with_eos = self.rows_supervised = 0
        self.len_counts = np.zeros(1, dtype=np.int64)
        self.sup_counts = np.zeros(1, dtype=np.int64)
        self.class_tokens = np.zeros(len(TokenClass), dtype=np.int64)
        self.class_supervised = np.zeros(len(TokenClass), dtype=np.int64)
        self.pad_share_bins = np.zeros(20, dtype=np.int64)  # batches by pad share, 5% bins
        self.pad_share_max = (0.0, None)  # (share, batch index)
        self.max_width = 0
        self._hashes: list[np.ndarray] = []
        self._hash_rows: list[np.ndarray] = []
        self.hashed = 0

    def add(self, ctx: ProbeContext, rows: np.ndarray) -> dict[str, list]:
        """Fold one batch in; return its per-row statistics (lists indexed by position in the batch).
        Computed on numpy views of the batch and of the masks the probes shared (no copies)."""

        a = arrays(ctx)  # the numpy views the probes shared
        ids, classes, real, labeled = a.ids, a.classes, a.real, a.labeled
        B, T = ids.shape
        length = real.sum(axis=1)
        sup = a.sup if labeled is not None else np.zeros_like(real)
        n_sup = sup.sum(axis=1)
        has_eos = (sup & (classes == int(TokenClass.EOS))).any(axis=1)
        self.rows += B
        self.batches += 1
        self.positions += B * T
        n_real = int(length.sum())
        self.pad_positions += B * T - n_real
        self.real_tokens += n_real
        self.supervised_tokens += int(n_sup.sum())
        n_none = int(np.count_nonzero(n_sup == 0))
        self.rows_no_supervised += n_none
        self.rows_supervised += B - n_none
        self.rows_with_eos += int(np.count_nonzero(has_eos))
        self.len_counts = _grow_add(self.len_counts, length)
        self.sup_counts = _grow_add(self.sup_counts, n_sup)
        C = len(TokenClass)
        code = classes.astype(np.int64) * 2
        if labeled is not None:
            code += labeled
        both = np.bincount(code.ravel(), minlength=2 * C)[:2 * C].reshape(C, 2)  # one pass: class x supervised
        self.class_tokens += both.sum(axis=1)
        self.class_supervised += both[:, 1]
        share = 1 - n_real / max(B * T, 1)
        self.pad_share_bins[min(int(share * 20), 19)] += 1
        if share > self.pad_share_max[0]:
            self.pad_share_max = (share, self.batches - 1)
        self.max_width = max(self.max_width, T)
        if self.hashed < DUP_CAP_ROWS:
            self._hash(ids, real, length, rows)
        return {"length": length.tolist(), "supervised": n_sup.tolist(), "eos": has_eos.tolist()}

    def _hash(self, ids: np.ndarray, real: np.ndarray, length: np.ndarray, rows: np.ndarray) -> None:
        """A 64-bit hash of each row's real token ids, aligned at its first real token (so left and
        right padding of the same text hash alike); one vectorised pass, int64 arithmetic wraps."""
        B, T = ids.shape
        first = real.argmax(axis=1)[:, None]  # 0 for a row with no real token
        coef = _coefficients(T).numpy()
        if first.any():  # some row starts after padding: each row's coefficients from its first real token
            coef = coef[np.maximum(np.arange(T)[None, :] - first, 0)]
        mixed = (ids + 1) * np.int64(-7046029254386353131)  # a 64-bit odd constant: spreads small ids over all bits
        mixed ^= mixed >> 29
        h = np.where(real, mixed * coef, 0).sum(axis=1)
        h ^= length * np.int64(0x2545F4914F6CDD1D)
        self._hashes.append(h)
        self._hash_rows.append(rows.astype(np.int64, copy=True))
        self.hashed += B
        if len(self._hashes) >= 256:  # one array per 256 batches: 16 bytes a row, not an object per batch
            self._hashes = [np.concatenate(self._hashes)]
            self._hash_rows = [np.concatenate(self._hash_rows)]

    def duplicates(self, groups: int = 8) -> dict[str, Any]:
        if not self._hashes:
            return {"rows_repeated": 0, "rows_hashed": 0}
        h = np.concatenate(self._hashes)
        r = np.concatenate(self._hash_rows)
        self._hashes, self._hash_rows = [h], [r]
        order = np.argsort(h, kind="stable")
        hs = h[order]
        starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]])
        sizes = np.diff(np.r_[starts, len(hs)])
        repeated = sizes > 1
        top = np.argsort(-sizes, kind="stable")[:groups]
        out_groups = []
        for g in top:
            if sizes[g] < 2:
                break
            members = np.sort(r[order[starts[g]:starts[g] + sizes[g]]])
            out_groups.append({"rows": [int(x) for x in members[:8]], "count": int(sizes[g])})
        return {"rows_repeated": int((sizes[repeated] - 1).sum()), "distinct_repeated": int(repeated.sum()),
                "groups": out_groups, "rows_hashed": self.hashed, "complete": self.hashed >= self.rows}

    def summary(self) -> dict[str, Any]:
        pad_share = self.pad_positions / self.positions if self.positions else 0.0
        return {
            "rows": self.rows, "batches": self.batches, "positions": self.positions,
            "length": _percentiles(self.len_counts), "supervised": _percentiles(self.sup_counts),
            "prompt_tokens_mean": round((self.real_tokens - self.supervised_tokens) / self.rows, 2) if self.rows else None,
            "supervised_share_of_tokens": round(self.supervised_tokens / self.real_tokens, 4) if self.real_tokens else None,
            "pad_share": {"mean": round(pad_share, 4), "max": round(self.pad_share_max[0], 4),
                          "max_batch": self.pad_share_max[1],
                          "batches_by_share": {"edges": [i / 20 for i in range(21)], "counts": self.pad_share_bins.tolist()}},
            "rows_no_supervised": self.rows_no_supervised,
            "rows_with_supervised_eos": self.rows_with_eos,
            "rows_supervised": self.rows_supervised,
            "max_width": self.max_width,
            "length_histogram": _histogram(self.len_counts),
            "supervised_histogram": _histogram(self.sup_counts),
            "duplicates": self.duplicates(),
        }

    def class_table(self) -> dict[str, dict[str, int]]:
        return {c.label: {"tokens": int(self.class_tokens[c]), "supervised": int(self.class_supervised[c])} for c in TokenClass}


@dataclass
class _Check:
    ran: int = 0
    reason: str | None = None  # why skipped (when it never ran)


class DatasetInspector:
    """Runs the batch probes on every batch it is given and aggregates them over the dataset."""

    def __init__(self, tokenizer: Any = None, model: Any = None, *, hints: Mapping[str, Any] | None = None,
                 ignore: Iterable[str] = (), command: str = "inspect-batch", only: Iterable[str] | None = None,
                 registry: Registry = REGISTRY) -> None:
        self.tok = tokenizer if isinstance(tokenizer, TokenizerInfo) or tokenizer is None else TokenizerInfo.from_tokenizer(tokenizer)
        if isinstance(model, ModelInfo) or model is None:
            self.model = model
        elif hasattr(model, "get_input_embeddings"):
            self.model = ModelInfo.from_model(model)
        else:
            self.model = ModelInfo.from_config(model)
        self.hints = Hints.of(hints)
        self.session = Session(command, registry, ignore=ignore)  # runs the probes; writes the report
        self.only = None if only is None else frozenset(only)  # the batch checks to run (None: all)
        self.probes = self.session.probes("batch", self.only)
        self._rules = {p.id: p.dataset for p in self.probes}
        self.tallies: dict[str, Any] = {}
        self.checks: dict[str, _Check] = {}
        self.stats = RowStats()
        self.bad_batches = 0
        self.bad_batch_reasons: list[str] = []
        self.samples: dict[int, dict[str, Any]] = {}  # global row -> its token view (rows that are examples)
        self.started = time.perf_counter()
        self.check_seconds = 0.0
        self.run: dict[str, Any] = {}

    @property
    def rows(self) -> int:
        return self.stats.rows

    def add(self, batch: Mapping[str, Any] | Batch, rows: Iterable[int] | None = None) -> list[Finding]:
        """Check one collated batch. rows: the dataset index of each of its rows (default: the
        running count of rows seen). Returns the batch-level findings of this batch."""
        t0 = time.perf_counter()
        try:
            b = batch if isinstance(batch, Batch) else Batch.from_mapping(batch)
        except UserError as e:  # a malformed batch is counted and named, not a crash
            self.bad_batches += 1
            if len(self.bad_batch_reasons) < 5:
                self.bad_batch_reasons.append(f"batch {self.stats.batches + self.bad_batches - 1}: {e}")
            return []
        B = b.input_ids.shape[0]
        row_ids = np.arange(self.stats.rows, self.stats.rows + B) if rows is None else np.asarray(list(rows), dtype=np.int64)
        if row_ids.size != B:
            row_ids = np.arange(self.stats.rows, self.stats.rows + B)
        index = self.stats.batches
        ctx = ProbeContext(batch=b, tokenizer=self.tok, model=self.model, hints=self.hints, step_index=index)
        findings, checks = self.session.evaluate(ctx, "batch", only=self.only)  # aggregated below, recorded in report()
        per_row = self.stats.add(ctx, row_ids)
        rows_list = row_ids.tolist()
        for c in checks:
            st = self.checks.get(c.id) or self.checks.setdefault(c.id, _Check())
            if c.status == "skipped":
                st.reason = st.reason or c.reason
            else:
                st.ran += 1
        changed = False
        rules = self._rules
        for f in findings:
            tally = self.tallies.get(f.id) or self.tallies.setdefault(f.id, Tally(f.id))
            (rules.get(f.id) or DEFAULT).add(tally, f, rows_list, per_row, index)
            changed = True
        if changed:
            self._keep_samples(ctx, index, rows_list)
        self.check_seconds += time.perf_counter() - t0
        return findings

    def _keep_samples(self, ctx: ProbeContext, index: int, rows: list[int]) -> None:
        """Keep the token view of every example row from this batch; drop views no longer referenced."""
        wanted = {(e["row"], e["position"]) for t in self.tallies.values() for e in t.examples if e["batch"] == index}
        b, classes = ctx.batch, ctx.token_classes
        for row, pos in wanted:
            if row in self.samples:
                continue
            self.samples[row] = {
                "row": row, "batch": index, "position": pos,
                "ids": b.input_ids[pos, :SAMPLE_TOKENS].tolist(),
                "classes": classes[pos, :SAMPLE_TOKENS].tolist(),
                "labels": b.labels[pos, :SAMPLE_TOKENS].tolist() if b.labels is not None else None,
                "attention": b.attention_mask[pos, :SAMPLE_TOKENS].tolist() if b.attention_mask is not None else None,
                "length": int(b.input_ids.shape[1]),
            }
        keep = {e["row"] for t in self.tallies.values() for e in t.examples}
        for row in [r for r in self.samples if r not in keep]:
            del self.samples[row]

    # ---- the report ------------------------------------------------------------------------------
    def findings(self) -> tuple[list[Finding], list[CheckResult]]:
        """The dataset-level findings and one check per id, from everything seen so far."""
        findings: list[Finding] = []
        checks: list[CheckResult] = []
        for probe in self.probes:
            for fid in probe.ids:
                st = self.checks.get(fid, _Check())
                tally = self.tallies.get(fid)
                if tally is not None and fid not in self.session.ignore:
                    tally.rows_total, tally.batches_total = self.stats.rows, self.stats.batches
                    f = (probe.dataset or DEFAULT).finding(tally, fid)
                    findings.append(f)
                    checks.append(CheckResult(fid, f.severity if f.severity != "info" else "pass", None, "dataset"))
                elif st.ran:
                    checks.append(CheckResult(fid, "pass", None, "dataset"))
                else:
                    checks.append(CheckResult(fid, "skipped", st.reason or "no batch was checked", "dataset"))
        summary = self.summary()
        ctx = ProbeContext(tokenizer=self.tok, model=self.model, hints=self.hints, dataset=summary)
        more, more_checks = self.session.evaluate(ctx, "dataset")
        return findings + more, checks + more_checks

    def summary(self) -> dict[str, Any]:
        s = self.stats.summary()
        elapsed = time.perf_counter() - self.started
        s.update(seconds=round(elapsed, 3), check_seconds=round(self.check_seconds, 3),
                 rows_per_s=round(self.stats.rows / elapsed, 1) if elapsed > 0 else None,
                 check_rows_per_s=round(self.stats.rows / self.check_seconds, 1) if self.check_seconds > 0 else None,
                 bad_batches=self.bad_batches, bad_batch_reasons=self.bad_batch_reasons)
        return s

    def report(self) -> Report:
        """The session's report with every dataset-level finding (call once, at the end)."""
        report = self.session.report
        self.session.record(*self.findings())
        summary = self.summary()
        summary["max_length"] = self.hints.max_length
        report.metrics["dataset"] = summary
        report.metrics["token_classes"] = self.stats.class_table()
        if self.tok is not None:
            report.metrics["tokenizer"] = {"class": self.tok.class_name, "name": self.tok.name_or_path,
                                           "pad_id": self.tok.pad_id, "eos_ids": sorted(self.tok.eos_ids)}
        report.samples = self.worst_rows(report)
        report.run.update(self.run)
        report.run.setdefault("rows_checked", self.stats.rows)
        report.run.setdefault("batches_checked", self.stats.batches)
        return self.session.finish()

    def worst_rows(self, report: Report) -> list[dict[str, Any]]:
        """Token views of the worst example row of each finding, most severe finding first."""
        out, seen = [], set()
        for f in report.by_severity():
            for ex in (f.evidence or {}).get("examples") or []:
                row = ex.get("row") if isinstance(ex, dict) else None
                if row in self.samples and row not in seen:
                    seen.add(row)
                    s = dict(self.samples[row])
                    s["finding"] = f.id
                    tok = self.tok
                    s["texts"] = [tok.token_text(i) for i in s["ids"]] if tok is not None else [str(i) for i in s["ids"]]
                    out.append(s)
                    break
            if len(out) >= WORST_ROWS:
                break
        return out


def inspect_dataset(batches: Iterable[Mapping[str, Any]], tokenizer: Any = None, model: Any = None, *,
                    hints: Mapping[str, Any] | None = None, ignore: Iterable[str] = (), max_batches: int | None = None) -> Report:
    """Check every batch an iterable yields (a DataLoader, a list of collated dicts) and return one
    Report with dataset-level findings. No model forward runs; `model` only gives the embedding size."""
    inspector = DatasetInspector(tokenizer, model, hints=hints, ignore=ignore)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        inspector.add(batch)
    if inspector.stats.batches == 0:
        raise UserError("no batch could be checked" + (f" ({inspector.bad_batch_reasons[0]})" if inspector.bad_batch_reasons else ""))
    return inspector.report()


# ---- watch: the cheap batch checks on every training batch ------------------------------------------

CHEAP_PROBES = ("labels-pad-not-ignored", "attention-mask-hides-tokens", "labels-eos-missing",
                "labels-no-supervised-tokens", "token-id-out-of-range")  # vectorised, no decoding: ~1 ms a batch


class BatchStream:
    """What `watch` runs on every training forward it sees: the cheap batch probes on the batch
    the model got, aggregated over the run (so a defect first seen in batch 900 is named)."""

    def __init__(self, tokenizer: Any, model: Any, *, hints: Mapping[str, Any] | None = None, ignore: Iterable[str] = (),
                 registry: Registry = REGISTRY):
        self.inspector = DatasetInspector(tokenizer, model, hints=hints, ignore=ignore, command="watch", only=CHEAP_PROBES,
                                          registry=registry)

    def observe(self, batch: Mapping[str, Any]) -> None:
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return
        fields = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape == ids.shape}
        self.inspector.add(fields)

    def merge_into(self, session: Session) -> None:
        """Add the run's dataset-level findings to the run's session: a new id is added; an id the
        first batch already showed is replaced by its dataset-level count when later batches had it too."""
        ins = self.inspector
        if ins.stats.batches == 0:
            return
        findings, checks = ins.findings()
        report = session.report
        for f in findings:
            f.rank = session.rank
            old = next((x for x in report.findings if x.id == f.id), None)
            if old is None:
                session.record([f], [])
            elif f.evidence.get("batches_affected", 0) > 1 or f.evidence.get("first_batch", {}).get("batch", 0) > 0:
                f.rank = old.rank
                session.replace(old, f)
        session.record([], checks)
        report.metrics["dataset"] = ins.summary()

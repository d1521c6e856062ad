"""Rows cut at max_length lose the end of their answer: no EOS to learn to stop, and for GSM8K
no `#### N` line to learn the final answer format."""
from __future__ import annotations

import numpy as np
import torch

from sftdoctor.findings import Finding

from ._common import arrays, eos_mask, length_limit, rows_at_limit, rows_of, supervised_mask
from ._dataset import DatasetRule, by_rate

id = "truncation-answer-lost"
level = "batch"
summary = "rows cut at max_length lose their answer or EOS (GSM8K: the #### line)"
needs = ("labels", "tokenizer")
family = "learned"
priority = 18
cause = "Truncation cut the answers off: the model is trained on rows without their ends."
remedy = "truncation"

ANSWER_MARKER = "####"  # GSM8K's final-answer line; override with hints.answer_marker
FAIL_SHARE = 0.1  # at least this share of the batch's rows lost their answer: fail, else warn


def _limit_text(t) -> str:
    ev = t.first.evidence if t.first is not None else {}
    return f"at max_length {ev['max_length']:,}" if ev.get("max_length") else "(rows fill their batch width with no padding)"


# Over a dataset: 1% of rows without the end of their answer fails (the model learns to stop
# mid-answer on them); fewer warns (0.1% is worth fixing before a long run, not a broken recipe).
dataset = DatasetRule(
    count="rows_answer_lost", worst="supervised", what="lose the end of their answer to truncation",
    severity=by_rate(0.01), detail=_limit_text,
    worst_text=lambda e: f"row {e['row']} keeps {e['supervised']} supervised answer tokens of {e['length']} tokens",
)


def _supervised_texts(ctx, sup) -> list[str] | None:
    tok = ctx.tokenizer
    if tok.decode is None:
        return None
    ids = ctx.batch.input_ids
    return [tok.decode(ids[r][sup[r]].tolist()) if bool(sup[r].any()) else "" for r in range(ids.shape[0])]


def _marker_tokens(tok, marker: str) -> list[list[int]]:
    """Token sequences of the marker (alone, after a space, after a newline) whose decoded text holds
    the marker, also twice when repeated (decoding concatenates them), once per tokenizer."""
    cache = tok.__dict__.setdefault("_answer_marker_tokens", {})
    if marker not in cache:
        seqs = []
        try:
            nl = tok.encode("\n")
            for text in (marker, " " + marker, "\n" + marker):
                seq = list(tok.encode(text))
                if text.startswith("\n") and seq[:len(nl)] == nl:
                    seq = seq[len(nl):]
                if seq and seq not in seqs and marker in tok.decode(seq) and tok.decode(seq + seq).count(marker) >= 2:
                    seqs.append(seq)
        except Exception:
            seqs = []
        cache[marker] = seqs
    return cache[marker]


def _marker_shown(ids: np.ndarray, sup: np.ndarray, seqs: list[list[int]]) -> bool:
    """One row (numpy views): a marker token sequence sits on consecutive supervised positions, so
    the decoded supervised text surely holds the marker (False proves nothing: the caller decodes)."""
    T = len(ids)
    for seq in seqs:
        n = T - len(seq) + 1
        if n <= 0:
            continue
        at = (ids[:n] == seq[0]) & sup[:n]
        for j in range(1, len(seq)):
            at &= (ids[j:j + n] == seq[j]) & sup[j:j + n]
        if at.any():
            return True
    return False


def check(ctx) -> list[Finding]:
    b, tok = ctx.batch, ctx.tokenizer
    marker = ctx.hints.answer_marker or ANSWER_MARKER
    if tok.decode is not None:
        # Fast exit (same result as below): when every supervised row at the limit still has its
        # EOS and its answer line, no row lost anything; only those rows are looked at (numpy
        # views), and one is decoded only when the marker's tokens are not plainly in it.
        a = arrays(ctx)
        candidates = np.flatnonzero(rows_at_limit(ctx).numpy() & a.sup.any(axis=1)).tolist()
        eos = a.eos if tok.eos_ids else None
        seqs = _marker_tokens(tok, marker) if tok.encode is not None else []
        if all((eos is None or bool((a.sup[r] & eos[r]).any()))
               and (_marker_shown(a.ids[r], a.sup[r], seqs) or marker in tok.decode(a.ids[r][a.sup[r]].tolist()))
               for r in candidates):
            return []
    at_limit = rows_at_limit(ctx)
    if not bool(at_limit.any()):
        return []
    sup = supervised_mask(ctx)
    eos_missing = ~(sup & eos_mask(ctx)).any(dim=1) if tok.eos_ids else None
    marker_missing = None
    texts = _supervised_texts(ctx, sup)
    if texts is not None and any(marker in t for t in texts):  # the data has a final-answer line
        marker_missing = torch.tensor([marker not in t for t in texts])
    if eos_missing is not None and marker_missing is not None:
        reason = eos_missing | marker_missing  # [B] the end of the answer is not there
    else:
        reason = eos_missing if eos_missing is not None else marker_missing
    if reason is None:
        return []
    has_sup = sup.any(dim=1)
    lost = at_limit & has_sup & reason
    if length_limit(ctx) is None and bool((reason & ~at_limit & has_sup).any()):
        # Without a known max_length, full-width rows are only suspects: when padded rows lack the
        # EOS/answer too, the cause is not truncation (labels-eos-missing says what it is).
        return []
    n_lost, n_rows = int(lost.sum()), b.input_ids.shape[0]
    if n_lost == 0:
        return []
    limit = length_limit(ctx)
    severity = "fail" if n_lost / n_rows >= FAIL_SHARE else "warn"
    width = limit if limit is not None else b.input_ids.shape[1]
    return [Finding(
        id=id, severity=severity, level=level,
        message=(f"{n_lost} of {n_rows} rows reach the length limit ({width} tokens) and lost the end of their answer"
                 + (f" (no supervised EOS in {int((lost & eos_missing).sum())})" if eos_missing is not None else "")
                 + (f" (no {marker!r} line in {int((lost & marker_missing).sum())})" if marker_missing is not None else "")),
        evidence={
            "max_length": limit,
            "max_length_source": "hint" if limit is not None else "batch width (rows with no padding)",
            "rows_at_limit": int(at_limit.sum()),
            "share_at_limit": round(int(at_limit.sum()) / n_rows, 4),
            "rows_answer_lost": n_lost,
            "share_answer_lost": round(n_lost / n_rows, 4),
            "rows": rows_of(lost),
            "rows_without_eos": int((lost & eos_missing).sum()) if eos_missing is not None else None,
            "answer_marker": marker if marker_missing is not None else None,
            "rows_without_answer_marker": int((lost & marker_missing).sum()) if marker_missing is not None else None,
        },
        fix=("raise max_length above the longest rows (check length percentiles), or truncate the prompt from the "
             "left and keep the answer whole (e.g. TRL truncation_mode='keep_end'), or drop rows that do not fit"),
    )]


def judge_recipe(*, rows: int | None, truncated_rows: int | None, answer_lost_rows: int, max_length: int | None,
                 longest_row: int) -> list[Finding]:
    """The same id over a whole training set, before training (`sftdoctor train` preflight counts
    the rows cut at max_length whose last token is no longer a supervised end token): any such row fails."""
    if not truncated_rows or not answer_lost_rows:
        return []
    return [Finding(
        id=id, severity="fail", level=level,
        message=(f"{answer_lost_rows} of {rows} rows were cut at max_length {max_length} and lost the end of their answer "
                 "(the `#### N` line or EOS)"),
        evidence={"rows": rows, "truncated_rows": truncated_rows, "answer_lost_rows": answer_lost_rows,
                  "max_length": max_length, "longest_row": longest_row},
        fix="raise --max-length to fit the answers, or drop overlong rows (--overlong drop)",
    )]

"""Small vectorised helpers shared by the batch probes (not a probe: the registry never lists it).

Conventions they rely on: labels follow the HF convention (labels[t] is the target for
input_ids[t] before the model's internal shift; IGNORE_INDEX = -100 means no loss) and padding
is found by position in sftdoctor.tokens (the PAD token class).
"""
from __future__ import annotations

import numpy as np
import torch

from sftdoctor.context import IGNORE_INDEX
from sftdoctor.tokens import TokenClass, id_mask  # noqa: F401 (id_mask: re-exported for the probes)

MAX_LISTED = 32  # rows / positions listed in evidence; counts always cover everything


def real_mask(ctx) -> torch.Tensor:
    """[B, T] bool: positions that are not padding. Computed once per context and shared by every
    probe: callers must never modify the returned mask in place."""
    m = ctx.__dict__.get("_real_mask")
    if m is None:
        m = ctx.__dict__["_real_mask"] = torch.from_numpy(ctx.token_classes.numpy() != int(TokenClass.PAD))
    return m


def labeled_mask(ctx) -> torch.Tensor:
    """[B, T] bool: positions whose label is not IGNORE_INDEX, padding included (shared like
    real_mask: never modify it in place). Needs labels."""
    m = ctx.__dict__.get("_labeled_mask")
    if m is None:
        m = ctx.__dict__["_labeled_mask"] = torch.from_numpy(ctx.batch.labels.numpy() != IGNORE_INDEX)
    return m


def supervised_mask(ctx) -> torch.Tensor:
    """[B, T] bool: real (non-pad) positions whose label carries loss (shared like real_mask:
    never modify it in place)."""
    m = ctx.__dict__.get("_supervised_mask")
    if m is None:
        m = ctx.__dict__["_supervised_mask"] = torch.from_numpy(labeled_mask(ctx).numpy() & real_mask(ctx).numpy())
    return m


def eos_mask(ctx) -> torch.Tensor:
    """[B, T] bool: positions holding one of the tokenizer's eos ids, padding included (shared like
    real_mask: never modify it in place). Needs a tokenizer."""
    m = ctx.__dict__.get("_eos_mask")
    if m is None:
        m = ctx.__dict__["_eos_mask"] = id_mask(ctx.batch.input_ids, ctx.tokenizer.eos_ids)
    return m


class BatchArrays:
    """Numpy views of one batch and of the shared masks, for the probes' quick "nothing to report"
    screens: a small numpy op costs a fraction of the same torch op on [B, T] batches, and the views
    share memory with the tensors (no copy). Read-only, like the masks they view."""

    def __init__(self, ctx) -> None:
        b = ctx.batch
        self.ids = b.input_ids.numpy()
        self.real = real_mask(ctx).numpy()
        self.labels = b.labels.numpy() if b.labels is not None else None
        self.labeled = labeled_mask(ctx).numpy() if b.labels is not None else None
        self.sup = supervised_mask(ctx).numpy() if b.labels is not None else None
        self.am = b.attention_mask.numpy() if b.attention_mask is not None else None
        self.classes = ctx.token_classes.numpy()  # computed already: real_mask reads it
        self.eos = eos_mask(ctx).numpy() if ctx.tokenizer is not None else None  # (no reference to ctx: no cycle)


def arrays(ctx) -> BatchArrays:
    """The batch's BatchArrays, built once per context."""
    a = ctx.__dict__.get("_arrays")
    if a is None:
        a = ctx.__dict__["_arrays"] = BatchArrays(ctx)
    return a


def first_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the first True per row, -1 where a row has none."""
    if mask.shape[1] == 0:
        return torch.full((mask.shape[0],), -1, dtype=torch.long)
    idx = mask.to(torch.uint8).argmax(dim=1)  # argmax returns the first of equal maxima
    return torch.where(mask.any(dim=1), idx, -1)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last True per row, -1 where a row has none."""
    T = mask.shape[1]
    return torch.where(mask, torch.arange(T), torch.full_like(mask, -1, dtype=torch.long)).max(dim=1).values


def rows_of(row_mask: torch.Tensor) -> list[int]:
    """Row indices where row_mask [B] is True (capped at MAX_LISTED)."""
    return [int(r) for r in row_mask.nonzero().flatten()[:MAX_LISTED].tolist()]


def token_ref(tok, token_id: int | None) -> dict:
    """{"id", "text"} for evidence; text is '' without a decoder."""
    if token_id is None:
        return {"id": None, "text": ""}
    return {"id": int(token_id), "text": tok.token_text(int(token_id)) if tok is not None else ""}


def find_sequence(ids: torch.Tensor, pattern: list[int]) -> torch.Tensor:
    """[B, T] bool: True at each position where `pattern` starts (one compare per pattern token on
    numpy views of the batch: no [B, T, L] window tensor)."""
    B, T = ids.shape
    L = len(pattern)
    if L == 0 or L > T:
        return torch.zeros(B, T, dtype=torch.bool)
    if ids.device.type != "cpu":
        ids = ids.cpu()
    a = ids.numpy()
    n = T - L + 1
    out = np.zeros((B, T), dtype=bool)
    hit = out[:, :n]
    np.equal(a[:, :n], pattern[0], out=hit)
    for j in range(1, L):  # L is a few tokens
        if not hit.any():
            break
        hit &= a[:, j:j + n] == pattern[j]
    return torch.from_numpy(out)


def turn_end_ids(tok) -> set[int]:
    """EOS-like ids the chat template writes after every turn (<|im_end|>, <|eot_id|>, <|end|>):
    inside a row they end a turn, not a document."""
    if tok is None or not tok.chat_template:
        return set()
    key = (tok.chat_template, tok.eos_ids)
    cached = tok.__dict__.get("_turn_end_ids")  # decoding is slow: once per tokenizer, not per batch
    if cached is None or cached[0] != key:
        cached = tok.__dict__["_turn_end_ids"] = (key, {i for i in tok.eos_ids if (text := tok.token_text(i)) and text in tok.chat_template})
    return set(cached[1])


def chat_row_mask(ctx) -> torch.Tensor:
    """[B] bool: rows that hold a special token other than bos/eos/pad (role markers: a chat row)."""
    tok = ctx.tokenizer
    ids = ctx.batch.input_ids
    if tok is None:
        return torch.zeros(ids.shape[0], dtype=torch.bool)
    markers = set(tok.special_ids) - set(tok.eos_ids) - {tok.bos_id, tok.pad_id}
    return (id_mask(ids, markers) & real_mask(ctx)).any(dim=1)


def may_have_document_starts(ctx) -> bool:
    """False when document_starts(ctx) is surely all False (an exact screen, on numpy views): every
    kind of start is a real position after the row's first real token that holds a BOS, or follows
    a real eos-id token by one or two positions (turn ends and document ends are both eos ids)."""
    ids, tok = ctx.batch.input_ids, ctx.tokenizer
    if tok is None or ids.shape[1] < 2:
        return False
    a = arrays(ctx)
    r = a.real
    e = a.eos & r
    bos = tok.bos_id is not None and tok.bos_id not in tok.eos_ids
    return bool((e[:, :-1] & r[:, 1:]).any() or (e[:, :-2] & r[:, 2:]).any()
                or (bos and (ids[:, 1:].numpy() == tok.bos_id).any()))


def document_starts(ctx) -> torch.Tensor:
    """[B, T] bool: real positions (after a row's first real token) where a new document starts.

    A boundary is: a BOS inside the row; a token right after a document-end id (eos ids that the
    chat template does not use as turn ends, e.g. <|endoftext|>, <|end_of_text|>); in rows with no
    role markers, a token right after any eos id; in chat rows, a repeat of the row's opening
    (up to 8 tokens before its first turn end, e.g. the same system prompt) within 2 tokens after
    a turn end. A multi-turn conversation therefore stays one document.
    """
    ids, tok = ctx.batch.input_ids, ctx.tokenizer
    B, T = ids.shape
    real = real_mask(ctx)
    starts = torch.zeros(B, T, dtype=torch.bool)
    if not may_have_document_starts(ctx):
        return starts
    first_real = first_index(real)
    after_first = torch.arange(T).unsqueeze(0) > first_real.unsqueeze(1)
    turn_ends = turn_end_ids(tok)
    doc_ends = set(tok.eos_ids) - turn_ends
    chat = chat_row_mask(ctx)
    if tok.bos_id is not None and tok.bos_id not in tok.eos_ids:
        bos = ids == tok.bos_id
        starts[:, 1:] |= bos[:, 1:] & ~bos[:, :-1]  # a doubled BOS is one start (bos-duplicated's finding)
    prev_end = torch.zeros(B, T, dtype=torch.bool)
    prev_end[:, 1:] = id_mask(ids[:, :-1], doc_ends) & real[:, :-1]
    starts |= prev_end
    prev_turn = torch.zeros(B, T, dtype=torch.bool)
    prev_turn[:, 1:] = id_mask(ids[:, :-1], turn_ends) & real[:, :-1]
    starts |= prev_turn & ~chat.unsqueeze(1)
    if turn_ends and bool(chat.any()):
        turn_end_here = id_mask(ids, turn_ends) & real
        near_turn_end = torch.zeros(B, T, dtype=torch.bool)
        near_turn_end[:, 1:] |= turn_end_here[:, :-1]
        near_turn_end[:, 2:] |= turn_end_here[:, :-2]
        first_turn_end = first_index(turn_end_here)
        for b in chat.nonzero().flatten().tolist():
            f, e = int(first_real[b]), int(first_turn_end[b])
            if f < 0 or e <= f:
                continue
            opening = ids[b, f:min(e, f + 8)].tolist()
            if len(opening) < 3:
                continue
            starts[b] |= find_sequence(ids[b:b + 1], opening)[0] & near_turn_end[b]
    return starts & real & after_first


def length_limit(ctx) -> int | None:
    """The max_length rows were cut to, when the recipe says (hints max_length / model_max_length)."""
    for v in (ctx.hints.max_length, ctx.hints.model_max_length):
        if isinstance(v, int) and 0 < v < 1_000_000:
            return v
    return None


def rows_at_limit(ctx) -> torch.Tensor:
    """[B] bool: rows that reach the length limit, so truncation may have cut them.

    With a known max_length: rows with at least that many real tokens. Without one: rows that fill
    the whole width with no padding while other rows are padded (with dynamic padding the longest
    row also does, so this only marks candidates; callers also require a missing EOS/answer), or
    every row when none is padded (all cut to one length)."""
    real = arrays(ctx).real
    lengths = real.sum(axis=1)
    limit = length_limit(ctx)
    if limit is not None:
        return torch.from_numpy(lengths >= limit)
    full = lengths == real.shape[1]
    if full.all() and full.size >= 2:
        # every row fills the width with no padding at all: every row was cut to the same length
        # (natural rows of one batch are never all equally long); callers also require a lost end
        return torch.from_numpy(full)
    if not full.any():
        return torch.from_numpy(np.zeros_like(full))
    return torch.from_numpy(full)

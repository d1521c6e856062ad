"""Token classes for every position of a batch: prompt, response, EOS, pad, other special.

Derived only from what the batch holds (labels, attention_mask, input_ids) and the tokenizer's
pad/eos/special ids. Padding is found by *position* (a run at the end of a row, or at its start
for left padding), never by id alone: where pad == eos, the first EOS after the text is the real
one and only the rest of the run is padding.
"""
from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch

from .constants import CLASS_NAMES, IGNORE_INDEX

if TYPE_CHECKING:  # only for annotations: context imports this module
    from .context import Batch, TokenizerInfo


class TokenClass(IntEnum):
    PROMPT = 0  # real token, not supervised
    RESPONSE = 1  # real token, supervised
    EOS = 2  # eos / end-of-turn token that is not padding (supervised or not)
    PAD = 3  # padding position
    SPECIAL = 4  # other special token (BOS, role markers, ...)

    @property
    def label(self) -> str:
        return self.name.lower()


assert tuple(c.label for c in TokenClass) == CLASS_NAMES  # codes index CLASS_NAMES in every renderer


_ID_TABLES: dict[frozenset, tuple[list[int], np.ndarray | None]] = {}
_LUT_MAX_ID = 1 << 24  # id sets with a larger id use torch.isin (a lookup table would be too big)


def id_mask(ids: torch.Tensor, wanted: Iterable[int]) -> torch.Tensor:
    """[B, T] bool: positions whose id is one of `wanted`.

    A few ids: one compare each; more: a lookup table per id set (built once, kept by the set),
    indexed by the ids clipped to [-1, max + 1] (shifted by one), whose two end entries are False,
    so negative and larger ids never match. Same result as torch.isin, at a fraction of its cost."""
    key = wanted if isinstance(wanted, frozenset) else frozenset(int(i) for i in wanted)
    table = _ID_TABLES.get(key)
    if table is None:
        ws = sorted(int(i) for i in key)
        lut = None
        if len(ws) > 3 and 0 <= ws[0] and ws[-1] < _LUT_MAX_ID:
            lut = np.zeros(ws[-1] + 3, dtype=bool)
            lut[np.asarray(ws) + 1] = True
        if len(_ID_TABLES) > 256:  # id sets come from tokenizers: a handful per run
            _ID_TABLES.clear()
        table = _ID_TABLES[key] = (ws, lut)
    ws, lut = table
    if not ws:
        return torch.zeros(ids.shape, dtype=torch.bool)
    if len(ws) <= 3:
        a = ids.numpy() if ids.device.type == "cpu" else ids
        m = a == ws[0]
        for w in ws[1:]:
            m |= a == w
        return torch.from_numpy(m) if ids.device.type == "cpu" else m
    if lut is None or ids.device.type != "cpu" or ids.dtype not in (torch.int64, torch.int32):
        return torch.isin(ids, torch.tensor(ws, dtype=ids.dtype))
    # take(mode="clip") sends ids below -1 to entry 0 and ids above max + 1 to the last entry
    return torch.from_numpy(lut.take(ids.numpy() + 1, mode="clip"))


def _edge_run(row: torch.Tensor, value_mask: torch.Tensor, from_end: bool) -> int:
    """Length of the run of True in value_mask at the end (or start) of a row."""
    m = value_mask.flip(0) if from_end else value_mask
    # cumprod stays 1 exactly over the leading run of ones
    return int(m.long().cumprod(0).sum())


def pad_mask(batch: Batch, tok: TokenizerInfo | None) -> torch.Tensor:
    """[B, T] bool: positions that are padding (the rules of _pad_mask_rows below, computed on the
    whole batch at once, on numpy views of the tensors; tests/test_dataset.py checks both agree on
    random batches)."""
    ids_t = batch.input_ids
    B, T = ids_t.shape
    if T == 0:
        return torch.zeros(B, T, dtype=torch.bool)
    ids = ids_t.cpu().numpy()
    am = batch.attention_mask.cpu().numpy() if batch.attention_mask is not None else None
    pos = np.arange(T)[None, :]
    rows = np.arange(B)
    out = np.zeros((B, T), dtype=bool)
    pad_id = tok.pad_id if tok is not None else None

    def edge_runs(mask: np.ndarray, from_end: bool) -> np.ndarray:
        """[B] length of the run of True at the end (or start) of each row."""
        m = mask[:, ::-1] if from_end else mask
        return np.where(m.all(axis=1), T, m.argmin(axis=1))  # argmin: the first False

    def filler(from_end: bool) -> np.ndarray:  # [B] _filler_run per row
        if (am[:, -1 if from_end else 0] != 0).all():  # no row has a zero at that edge: no run
            return np.zeros(B, dtype=np.int64)
        n = edge_runs(am == 0, from_end)
        if not n.any():
            return n
        if from_end:
            ref = ids[rows, np.minimum(T - n, T - 1)][:, None]
            in_run = pos >= (T - n)[:, None]
        else:
            ref = ids[:, :1]
            in_run = pos < n[:, None]
        same = ((ids == ref) | ~in_run).all(axis=1)
        return np.where((n > 0) & same, n, 0)

    if pad_id is not None:
        # Each step below is skipped where its result is surely empty (a pad-free row start, no
        # zero at a mask edge): the same mask as the full computation, in fewer numpy calls.
        is_pad = ids == pad_id
        n_tail = edge_runs(is_pad, True)
        first = T - n_tail  # T where a row has no pad-id tail: nothing marked
        if tok.pad_is_eos:  # position rule: the first EOS after the text is real
            real_eos = np.ones(B, dtype=bool) if am is None else am[rows, np.minimum(first, T - 1)] != 0
            first = first + (real_eos & (n_tail > 0))
        out = pos >= first[:, None]
        tail_eff = n_tail
        if am is not None:
            no_tail = n_tail == 0
            if no_tail.any():  # rows without a pad-id tail: padded with another filler id?
                ft = np.where(no_tail, filler(True), 0)
                out |= pos >= (T - ft)[:, None]  # ft == 0: nothing
                tail_eff = np.where(no_tail, ft, n_tail)
        n_head = np.zeros(B, dtype=np.int64)
        if is_pad[:, 0].any():
            n_head = edge_runs(is_pad, False)
            head = pos < n_head[:, None]
            if am is not None:
                head &= am == 0  # a leading pad id that is attended is BOS-like
            out |= head
        if am is not None and not (am[:, 0] != 0).all():  # else filler(False) is 0 for every row
            no_head = (n_head == 0) & (tail_eff < T)
            if no_head.any():
                fh = np.where(no_head, filler(False), 0)
                out |= pos < fh[:, None]
        all_pad = n_tail == T
        if all_pad.any():
            out[all_pad] = True
    elif am is not None:
        n_tail = filler(True)
        n_head = np.where(n_tail < T, filler(False), 0)
        out |= pos >= (T - n_tail)[:, None]
        out |= pos < n_head[:, None]
    return torch.from_numpy(out)


def _pad_mask_rows(batch: Batch, tok: TokenizerInfo | None) -> torch.Tensor:
    """[B, T] bool: positions that are padding (reference implementation, one row at a time).

    - With a pad id: the trailing run of pad ids (right padding) and the leading run (left
      padding). Where pad == eos, the first id of a trailing run is the row's real EOS unless
      the attention mask says it is padding.
    - Without a pad id (or where a row's edge holds no pad id: the collator padded with another
      id): the zeros of attention_mask in a run at either end of the row, when that run holds a
      single repeated id (the collator's filler). A zero run of varied ids is real text hidden by
      the mask (a loss mask passed as attention_mask), not padding.
    """
    ids = batch.input_ids
    am = batch.attention_mask
    B, T = ids.shape
    out = torch.zeros(B, T, dtype=torch.bool)
    pad_id = tok.pad_id if tok is not None else None
    for b in range(B):
        if pad_id is not None:
            is_pad = ids[b] == pad_id
            n_tail = _edge_run(ids[b], is_pad, from_end=True)
            if n_tail == T:  # an all-pad row
                out[b] = True
                continue
            n_head = _edge_run(ids[b], is_pad, from_end=False)
            if n_tail:
                first = T - n_tail
                if tok.pad_is_eos and (am is None or am[b, first] != 0):
                    first += 1  # position rule: the first EOS after the text is real
                out[b, first:] = True
            elif am is not None:
                n_tail = _filler_run(ids[b], am[b], from_end=True)
                out[b, T - n_tail:] = n_tail > 0
            if n_head:
                head = torch.ones(n_head, dtype=torch.bool)
                if am is not None:
                    head = am[b, :n_head] == 0  # a leading pad id that is attended is BOS-like
                out[b, :n_head] = head
            elif am is not None and n_tail < T:
                out[b, :_filler_run(ids[b], am[b], from_end=False)] = True
        elif am is not None:
            n_tail = _filler_run(ids[b], am[b], from_end=True)
            n_head = _filler_run(ids[b], am[b], from_end=False) if n_tail < T else 0
            if n_tail:
                out[b, T - n_tail:] = True
            if n_head:
                out[b, :n_head] = True
    return out


def _filler_run(ids: torch.Tensor, am: torch.Tensor, from_end: bool) -> int:
    """Length of the attention_mask-zero run at one end of a row when it holds one repeated id
    (padding by a collator's filler id); 0 when the run holds varied ids (hidden real text)."""
    n = _edge_run(am, am == 0, from_end)
    if n == 0:
        return 0
    run = ids[-n:] if from_end else ids[:n]
    return n if bool((run == run[0]).all()) else 0


_CLASS_TABLES: dict[tuple[frozenset, frozenset], np.ndarray | None] = {}


def _class_table(tok: TokenizerInfo) -> np.ndarray | None:
    """int8 lookup table, indexed by id + 1: SPECIAL for special ids, EOS for eos ids, -1 elsewhere
    (its first and last entries too, where ids below 0 and above the largest are clipped to).
    None when there is no such id or one is negative or huge."""
    key = (frozenset(tok.special_ids), frozenset(tok.eos_ids))
    if key not in _CLASS_TABLES:
        every = key[0] | key[1]
        lut = None
        if every and min(every) >= 0 and max(every) < _LUT_MAX_ID:
            lut = np.full(max(every) + 3, -1, dtype=np.int8)
            lut[np.asarray(sorted(key[0]), dtype=np.int64) + 1] = int(TokenClass.SPECIAL)
            lut[np.asarray(sorted(key[1]), dtype=np.int64) + 1] = int(TokenClass.EOS)
        if len(_CLASS_TABLES) > 64:
            _CLASS_TABLES.clear()
        _CLASS_TABLES[key] = lut
    return _CLASS_TABLES[key]


def classify(batch: Batch, tok: TokenizerInfo | None) -> torch.Tensor:
    """[B, T] int8 TokenClass codes."""
    ids = batch.input_ids
    pad = pad_mask(batch, tok).numpy()
    if batch.labels is not None:
        cls = (batch.labels.cpu().numpy() != IGNORE_INDEX).astype(np.int8)  # PROMPT = 0, RESPONSE = 1
    else:
        cls = np.zeros(tuple(ids.shape), dtype=np.int8)
    lut = _class_table(tok) if tok is not None else None
    if lut is not None and ids.dtype in (torch.int64, torch.int32):
        # one lookup: SPECIAL / EOS by id (EOS wins), -1 elsewhere (out-of-range ids included)
        code = lut.take(ids.cpu().numpy() + 1, mode="clip")
        cls = np.where(code >= 0, code, cls)
    elif tok is not None:
        if tok.special_ids:
            cls[id_mask(ids, tok.special_ids).cpu().numpy()] = int(TokenClass.SPECIAL)
        if tok.eos_ids:
            cls[id_mask(ids, tok.eos_ids).cpu().numpy()] = int(TokenClass.EOS)
    cls[pad] = int(TokenClass.PAD)
    return torch.from_numpy(cls)


def class_table(batch: Batch, classes: torch.Tensor) -> dict[str, dict[str, int]]:
    """{class: {"tokens": n, "supervised": n}} over the whole batch."""
    sup = (batch.labels != IGNORE_INDEX) if batch.labels is not None else torch.zeros_like(classes, dtype=torch.bool)
    table = {}
    for c in TokenClass:
        m = classes == int(c)
        table[c.label] = {"tokens": int(m.sum()), "supervised": int((m & sup).sum())}
    return table

"""Token classes for every position of a batch: prompt, response, EOS, pad, other special.

Derived only from what the batch holds (labels, attention_mask, input_ids) and the tokenizer's
pad/eos/special ids. Padding is found by *position* (a run at the end of a row, or at its start
for left padding), never by id alone: where pad == eos, the first EOS after the text is the real
one and only the rest of the run is padding.
"""
from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

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


def _edge_run(row: torch.Tensor, value_mask: torch.Tensor, from_end: bool) -> int:
    """Length of the run of True in value_mask at the end (or start) of a row."""
    m = value_mask.flip(0) if from_end else value_mask
    # cumprod stays 1 exactly over the leading run of ones
    return int(m.long().cumprod(0).sum())


def pad_mask(batch: Batch, tok: TokenizerInfo | None) -> torch.Tensor:
    """[B, T] bool: positions that are padding (the rules of _pad_mask_rows below, computed on the
    whole batch at once; tests/test_dataset.py checks both agree on random batches)."""
    ids = batch.input_ids
    am = batch.attention_mask
    B, T = ids.shape
    pos = torch.arange(T).unsqueeze(0)
    out = torch.zeros(B, T, dtype=torch.bool)
    if T == 0:
        return out
    pad_id = tok.pad_id if tok is not None else None

    def edge_runs(mask: torch.Tensor, from_end: bool) -> torch.Tensor:
        m = mask.flip(1) if from_end else mask
        return m.long().cumprod(1).sum(1)  # cumprod stays 1 exactly over the leading run

    def filler(from_end: bool) -> torch.Tensor:  # [B] _filler_run per row
        n = edge_runs(am == 0, from_end)
        if from_end:
            ref = ids.gather(1, (T - n).clamp(max=T - 1).unsqueeze(1))
            in_run = pos >= (T - n).unsqueeze(1)
        else:
            ref = ids[:, :1]
            in_run = pos < n.unsqueeze(1)
        same = ((ids == ref) | ~in_run).all(dim=1)
        return torch.where((n > 0) & same, n, torch.zeros_like(n))

    if pad_id is not None:
        is_pad = ids == pad_id
        n_tail = edge_runs(is_pad, True)
        all_pad = n_tail == T
        n_head = edge_runs(is_pad, False)
        first = T - n_tail
        if tok.pad_is_eos:  # position rule: the first EOS after the text is real
            real_eos = torch.ones(B, dtype=torch.bool) if am is None else am.gather(1, first.clamp(max=T - 1).unsqueeze(1)).squeeze(1) != 0
            first = first + (real_eos & (n_tail > 0)).long()
        out |= (n_tail > 0).unsqueeze(1) & (pos >= first.unsqueeze(1))
        tail_eff = n_tail
        if am is not None:
            ft = torch.where(n_tail == 0, filler(True), torch.zeros_like(n_tail))
            out |= (ft > 0).unsqueeze(1) & (pos >= (T - ft).unsqueeze(1))
            tail_eff = torch.where(n_tail == 0, ft, n_tail)
        head = pos < n_head.unsqueeze(1)
        if am is not None:
            head &= am == 0  # a leading pad id that is attended is BOS-like
            fh = torch.where((n_head == 0) & (tail_eff < T), filler(False), torch.zeros_like(n_head))
            head |= pos < fh.unsqueeze(1)
        out |= head
        out[all_pad] = True
    elif am is not None:
        n_tail = filler(True)
        n_head = torch.where(n_tail < T, filler(False), torch.zeros_like(n_tail))
        out |= pos >= (T - n_tail).unsqueeze(1)
        out |= pos < n_head.unsqueeze(1)
    return out


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


def classify(batch: Batch, tok: TokenizerInfo | None) -> torch.Tensor:
    """[B, T] int8 TokenClass codes."""
    ids = batch.input_ids
    pad = pad_mask(batch, tok)
    if batch.labels is not None:
        cls = (batch.labels != IGNORE_INDEX).to(torch.int8)  # PROMPT = 0, RESPONSE = 1
    else:
        cls = torch.zeros(ids.shape, dtype=torch.int8)
    if tok is not None:
        if tok.special_ids:
            special = torch.isin(ids, torch.tensor(sorted(tok.special_ids)))
            cls.masked_fill_(special, int(TokenClass.SPECIAL))
        if tok.eos_ids:
            eos = torch.isin(ids, torch.tensor(sorted(tok.eos_ids)))
            cls.masked_fill_(eos, int(TokenClass.EOS))
    cls.masked_fill_(pad, int(TokenClass.PAD))
    return cls


def class_table(batch: Batch, classes: torch.Tensor) -> dict[str, dict[str, int]]:
    """{class: {"tokens": n, "supervised": n}} over the whole batch."""
    sup = (batch.labels != IGNORE_INDEX) if batch.labels is not None else torch.zeros_like(classes, dtype=torch.bool)
    table = {}
    for c in TokenClass:
        m = classes == int(c)
        table[c.label] = {"tokens": int(m.sum()), "supervised": int((m & sup).sum())}
    return table

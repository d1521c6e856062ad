"""The fast paths of whole-dataset inspection give what the plain rules give, on random batches:
id lookup tables vs torch.isin, token classes vs the isin-based classes, the sparse response-marker
match vs a find_sequence scan, and the numpy row hash vs the torch formula."""
from __future__ import annotations

import random

import numpy as np
import torch

from sftdoctor.context import Batch, Hints, IGNORE_INDEX, TokenizerInfo
from sftdoctor.probes._common import find_sequence, first_index
from sftdoctor.tokens import TokenClass, _pad_mask_rows, classify, id_mask


def test_id_mask_matches_isin_for_any_id_set():
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(500):
        ids = torch.randint(-5, 40, (rng.randint(1, 4), rng.randint(1, 12)), generator=g)
        wanted = rng.sample(range(-3, 45), rng.randint(0, 8))
        want = torch.isin(ids, torch.tensor(sorted(wanted), dtype=torch.long)) if wanted else torch.zeros(ids.shape, dtype=torch.bool)
        assert torch.equal(id_mask(ids, wanted), want), (ids, wanted)


def _classes_reference(batch: Batch, tok: TokenizerInfo) -> torch.Tensor:
    cls = (batch.labels != IGNORE_INDEX).to(torch.int8)
    if tok.special_ids:
        cls.masked_fill_(torch.isin(batch.input_ids, torch.tensor(sorted(tok.special_ids))), int(TokenClass.SPECIAL))
    if tok.eos_ids:
        cls.masked_fill_(torch.isin(batch.input_ids, torch.tensor(sorted(tok.eos_ids))), int(TokenClass.EOS))
    return cls.masked_fill_(_pad_mask_rows(batch, tok), int(TokenClass.PAD))


def test_classify_matches_the_isin_rules():
    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    for _ in range(500):
        B, T = rng.randint(1, 4), rng.randint(1, 10)
        ids = torch.randint(-1, 6, (B, T), generator=g)
        am = torch.randint(0, 2, (B, T), generator=g) if rng.random() < 0.5 else None
        labels = torch.where(torch.rand(B, T, generator=g) < 0.5, ids, torch.full_like(ids, IGNORE_INDEX))
        tok = TokenizerInfo(pad_id=rng.choice([None, 0, 1]), eos_ids=frozenset(rng.choice([(), (0,), (2,), (1, 2)])),
                            special_ids=frozenset(rng.choice([(), (3,), (0, 3, 4, 5), (1, 2, 3, 4, 5)])))
        batch = Batch(input_ids=ids, attention_mask=am, labels=labels)
        assert torch.equal(classify(batch, tok), _classes_reference(batch, tok)), (ids, am, tok)


def test_sparse_marker_match_equals_a_full_scan(monkeypatch):
    import sftdoctor.probes.labels_prompt_supervised as P

    class Ctx:
        def __init__(self, ids):
            self.batch = Batch(input_ids=ids)
            self.hints, self.tokenizer = Hints(), None

    def reference(ids, real, found):
        ends, text = torch.full((ids.shape[0],), -1, dtype=torch.long), None
        for t, seq in found:  # the marker loop: each row's earliest hit, the first marker that hits names it
            start = first_index(find_sequence(ids, seq) & real)
            better = (start >= 0) & ((ends < 0) | (start + len(seq) < ends))
            if bool(better.any()) and text is None:
                text = t
            ends = torch.where(better, start + len(seq), ends)
        return (torch.arange(ids.shape[1]).unsqueeze(0) < ends.unsqueeze(1)).numpy(), text

    rng, g = random.Random(2), torch.Generator().manual_seed(2)
    for _ in range(1500):
        B, T = rng.randint(1, 4), rng.randint(1, 14)
        ids = torch.randint(0, 6, (B, T), generator=g)
        real = torch.rand(B, T, generator=g) < 0.8
        found = [(f"m{k}", [rng.randint(0, 5) for _ in range(rng.randint(1, 3))]) for k in range(rng.randint(0, 6))]
        monkeypatch.setattr(P, "markers", lambda ctx, f=found: f)
        region, method, text = P._prompt_region(Ctx(ids), real.numpy(), first_index(real).numpy())
        want_region, want_text = reference(ids, real, found)
        assert method == "response marker"
        assert np.array_equal(region, want_region) and text == want_text, (ids, real, found)


def test_row_hash_equals_the_torch_formula_with_left_and_right_padding():
    from sftdoctor.dataset import RowStats, _coefficients

    g = torch.Generator().manual_seed(3)
    for T in (1, 7, 300):
        ids = torch.randint(0, 150_000, (6, T), generator=g)
        real = torch.zeros(6, T, dtype=torch.bool)
        for r in range(6):
            n = int(torch.randint(0, T + 1, (1,), generator=g))
            real[r, :n] = True
            if r % 3 == 0:
                real[r] = real[r].flip(0)  # left padded
        length = real.sum(1)
        first = real.int().argmax(dim=1, keepdim=True)
        pos = (torch.arange(T).unsqueeze(0) - first).clamp(min=0)
        mixed = (ids + 1) * -7046029254386353131
        mixed = mixed ^ (mixed >> 29)
        want = torch.where(real, mixed * _coefficients(T)[pos], torch.zeros_like(mixed)).sum(dim=1) ^ (length * 0x2545F4914F6CDD1D)
        stats = RowStats()
        stats._hash(ids.numpy(), real.numpy(), length.numpy(), np.arange(6))
        assert np.array_equal(stats._hashes[0], want.numpy())

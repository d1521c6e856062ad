"""Completion-only SFT supervises the answer, not the prompt. Supervised prompt tokens spend the
loss on the question (weaker fine-tune, models that echo prompts).

The prompt/response boundary comes from hints.prompt_lengths (per row, the number of prompt
tokens from the row's first real token) when an adapter knows it;
otherwise from a response marker found in the row (the chat template's assistant header,
hints.response_template, or a text marker such as "Answer:" / "### Response:"); otherwise,
rows whose labels copy every input id are reported as "no completion-only masking"."""
from __future__ import annotations

import os

import numpy as np
import torch

from sftdoctor.findings import Finding

from ._common import arrays, id_mask, rows_of

id = "labels-prompt-supervised"
level = "batch"
summary = "prompt tokens are supervised (completion-only loss not applied)"
needs = ("labels",)
remedy = "prompt"
fix_on_warn = True

TEXT_MARKERS = ("### Response:", "### Answer:", "### Assistant:", "Answer:", "Response:", "Assistant:")
MIN_SHARE = 0.05  # supervised share of the prompt region below this is noise (e.g. one header token)


def _encodings(tok, text: str) -> list[list[int]]:
    """Token sequences `text` may take inside a row: alone, after a space, after a newline."""
    out = []
    try:
        out.append(tok.encode(text))
        out.append(tok.encode(" " + text))
        nl = tok.encode("\n")
        with_nl = tok.encode("\n" + text)
        if with_nl[: len(nl)] == nl:
            out.append(with_nl[len(nl):])
    except Exception:
        return []
    return [list(s) for s in out if s]


_MARKERS: dict[tuple, list] = {}  # (tokenizer, response_template) -> marker token sequences
_HEADERS: dict[tuple, str | None] = {}  # (chat template, tokenizer) -> its assistant header: rendering is slow


def _template_header(tok) -> str | None:
    """The assistant header the chat template writes before an answer (its generation prompt)."""
    if not tok.chat_template or tok.apply_chat_template is None:
        return None
    key = (tok.chat_template, tok.class_name, tok.name_or_path, tok.eos_token)
    if key not in _HEADERS:
        _HEADERS[key] = _render_header(tok)
    return _HEADERS[key]


def _render_header(tok) -> str | None:
    try:
        msgs = [{"role": "user", "content": "x"}]
        with_prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        without = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    except Exception:
        return None
    if not isinstance(with_prompt, str) or not isinstance(without, str):
        return None
    # Some templates close the conversation differently without a generation prompt (Phi-3 writes
    # eos): the header is what follows the common prefix.
    common = os.path.commonprefix([with_prompt, without])
    if common != without:  # back off to a token boundary ('<|' of <|endoftext|> vs <|assistant|>)
        common = common[: max(common.rfind("\n"), common.rfind(">")) + 1]
    header = with_prompt[len(common):].strip()
    return header or None


def markers(ctx) -> list[tuple[str, list[int]]]:
    tok = ctx.tokenizer
    if tok is None or tok.encode is None:
        return []
    texts = []
    given = ctx.hints.response_template
    if isinstance(given, (list, tuple)) and all(isinstance(i, int) for i in given):
        return [(str(given), list(given))]
    key = (tok.chat_template, tok.class_name, tok.name_or_path, tok.vocab_len, given if isinstance(given, str) else None)
    if key not in _MARKERS:
        if isinstance(given, str):
            texts.append(given)
        header = _template_header(tok)
        if header:
            texts.append(header)
        texts.extend(TEXT_MARKERS)
        # one entry per token sequence, the first text that gives it: a later copy can never end a
        # prompt earlier than the first (same start, same end), so it changes neither ends nor the text
        seen: set[tuple[int, ...]] = set()
        _MARKERS[key] = [(t, seq) for t in texts for seq in _encodings(tok, t)
                         if tuple(seq) not in seen and not seen.add(tuple(seq))]
    return _MARKERS[key]


_NO_END = np.iinfo(np.int64).max  # a row with no marker hit


def _prompt_region(ctx, real: np.ndarray, first_real: np.ndarray) -> tuple[np.ndarray, str, str | None]:
    """[B, T] bool prompt positions (after each row's first token), the method, the marker text.
    Arrays are numpy views of the batch's masks (one small numpy op costs a fraction of a torch op)."""
    B, T = real.shape
    pos = np.arange(T)[None, :]
    lengths = ctx.hints.prompt_lengths
    if lengths is not None and len(lengths) == B:
        end = np.maximum(first_real, 0) + torch.as_tensor(list(lengths), dtype=torch.long).numpy()
        return pos < end[:, None], "prompt_lengths hint", None
    # the earliest marker occurrence per row ends its prompt (earliest: never counts answer text as prompt)
    ends = np.full(B, -1, dtype=np.int64)
    found_text = None
    ids = ctx.batch.input_ids
    found = markers(ctx)
    if not found:
        return pos < ends[:, None], "response marker", None
    firsts = frozenset(seq[0] for _, seq in found)
    # One lookup over the batch: the positions holding some marker's first token (a few per row),
    # with the token after each (-1 at the row's end). A marker is matched only where its first two
    # tokens occur together; its prompt end is start + length, the earliest per row wins, and the
    # marker text reported is the first marker (in list order) that matches anywhere, as a marker
    # loop taking each row's earliest hit would report.
    a = ids.numpy()
    rr, cc = np.nonzero(id_mask(ids, firsts).numpy())
    heads = a[rr, cc]
    nxt = np.where(cc + 1 < T, a[rr, np.minimum(cc + 1, T - 1)], -1)
    pair = (heads << 32) ^ (nxt & 0xFFFFFFFF)
    present, present2 = set(heads.tolist()), set(pair.tolist())
    real_at = real[rr, cc]
    best = np.full(B, _NO_END, dtype=np.int64)
    for text, seq in found:
        L = len(seq)
        if seq[0] not in present:
            continue
        if L == 1:
            keep = heads == seq[0]
        else:
            key = (seq[0] << 32) ^ (seq[1] & 0xFFFFFFFF)
            if key not in present2:
                continue
            keep = (heads == seq[0]) & (nxt == seq[1])  # (the pair set only filters)
            for j in range(2, L):
                keep &= a[rr, np.minimum(cc + j, T - 1)] == seq[j]
            keep &= cc + L <= T
        keep &= real_at
        if not keep.any():
            continue
        if found_text is None:
            found_text = text
        # rows ascend and, within a row, positions ascend (np.nonzero's order): reversed, each row's
        # earliest hit is written last, so it is the one that stays
        r_, e_ = rr[keep][::-1], cc[keep][::-1] + L
        best[r_] = np.minimum(best[r_], e_)
    ends = np.where(best == _NO_END, -1, best)
    return pos < ends[:, None], "response marker", found_text


def check(ctx) -> list[Finding]:
    b = ctx.batch
    a = arrays(ctx)
    real, sup = a.real, a.sup
    T = real.shape[1]
    first_real = np.where(real.any(axis=1), real.argmax(axis=1), -1)
    # labels[first token] never carries loss under the HF shift: leave it out of every count
    body = real & (np.arange(T)[None, :] > first_real[:, None])
    sup_body = sup & body
    has_sup = sup_body.any(axis=1)
    if not has_sup.any():
        return []
    region, method, marker = _prompt_region(ctx, real, first_real)
    region &= body
    prompt_sup_np = sup & region
    n_prompt_sup = int(np.count_nonzero(prompt_sup_np))
    # the counts and masks below are read only by the branch that uses them (fewer than 2
    # supervised prompt tokens never report; fully supervised rows matter only without a marker)
    n_region = int(np.count_nonzero(region)) if n_prompt_sup >= 2 else 0
    n_sup = int(np.count_nonzero(sup_body)) if n_prompt_sup >= 2 else 0
    fully_supervised = None
    if method == "response marker" and marker is None:
        fully_supervised = torch.from_numpy(has_sup & ~(body & ~sup).any(axis=1))
    has_sup = torch.from_numpy(has_sup)
    prompt_sup = torch.from_numpy(prompt_sup_np)
    evidence = {"method": method, "marker": marker}
    if n_region and n_prompt_sup >= 2 and n_prompt_sup / n_region >= MIN_SHARE:
        rows = prompt_sup.any(dim=1)
        evidence.update({
            "prompt_supervised_tokens": n_prompt_sup,
            "prompt_tokens": n_region,
            "share_of_supervised": round(n_prompt_sup / max(n_sup, 1), 4),
            "share_of_prompt": round(n_prompt_sup / n_region, 4),
            "rows": rows_of(rows),
        })
        message = (f"{n_prompt_sup} of {n_region} prompt tokens are supervised ({n_prompt_sup / max(n_sup, 1):.0%} of "
                   f"all supervised tokens), prompt end found by {method}" + (f" {marker!r}" if marker else ""))
        # what the "supervised" prompt labels hold: the prompt's own ids (no masking), or one fill value such
        # as 0 / the pad id (masking done with the wrong value: the model is taught to emit that id)
        vals = b.labels[prompt_sup]
        common = torch.bincount(vals.clamp(min=0)).argmax() if vals.numel() else None
        fill_share = float((vals == common).float().mean()) if common is not None else 0.0
        copies = float((b.labels[prompt_sup] == b.input_ids[prompt_sup]).float().mean()) if vals.numel() else 0.0
        if common is not None and fill_share >= 0.8 and copies < 0.5:
            fill = int(common)
            tok = ctx.tokenizer
            text = tok.token_text(fill) if tok is not None else None
            is_pad = tok is not None and tok.pad_id == fill
            evidence.update({"label_fill_id": fill, "label_fill_text": text, "fill_share": round(fill_share, 4),
                             "fill_is_pad_id": is_pad})
            message = (f"{n_prompt_sup} of {n_region} prompt positions carry the label id {fill}"
                       + (f" ({text!r}{', the pad id' if is_pad else ''})" if text is not None else "")
                       + " instead of -100: the prompt was masked with the wrong value, so the loss trains the model "
                       f"to emit id {fill} there (the `{text or fill}`-only output symptom)")
            return [Finding(
                id=id, severity="warn", level=level, message=message, evidence=evidence,
                fix=(f"mask with -100 (the loss's ignore_index), not {fill}: labels[:prompt_len] = -100 and pad the "
                     "labels with -100 (DataCollatorForSeq2Seq(label_pad_token_id=-100))"),
            )]
    elif method == "response marker" and marker is None and bool(fully_supervised[has_sup].all()):
        evidence.update({
            "rows_fully_supervised": int(fully_supervised.sum()),
            "share_of_rows": round(int(fully_supervised.sum()) / int(has_sup.sum()), 4),
            "rows": rows_of(fully_supervised),
        })
        message = ("every real token of every row is supervised (labels copy input_ids): no completion-only masking; "
                   "if these rows have a prompt it is trained on")
    else:
        return []
    on_purpose = bool(ctx.hints.prompt_supervised_on_purpose)
    return [Finding(
        id=id, severity="info" if on_purpose else "warn", level=level,
        message=message + (" (on purpose, per the recipe)" if on_purpose else ""),
        evidence=evidence,
        fix=("set labels to -100 on the prompt: keep the prompt length per example and mask labels[:prompt_len], or "
             "use TRL SFTConfig(completion_only_loss=True) / assistant_only_loss=True for chat data"),
    )]

"""`diagnose(path)`: the post-mortem of a saved model, from the checkpoint alone.

It answers which family a broken checkpoint belongs to: numerical (weights or logits not
finite, or finite in fp32 but overflowing in the dtype it is served in) or learned (finite
logits that genuinely prefer the pad / id-0 token). Steps: a streamed weight scan, forward
passes of a few prompts in fp32 and in the served dtype with per-module max |activation|,
greedy generation, tokenizer/generation_config checks; with `base`, the same on the base model
under identical settings plus the per-tensor weight change.
"""
from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import torch

from .checkpoint import DTYPE_LIMITS, FP16_MAX, CheckpointRecord, read_generation_config, scan_weights, weight_change
from .context import ModelInfo, ProbeContext, TokenizerInfo
from .engine import Registry
from .errors import UserError
from .probes import REGISTRY
from .report import Report
from .session import Session

# GSM8K-style questions (written for sftdoctor, not taken from the GSM8K test set).
DEFAULT_QUESTIONS = [
    "A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 30 of them. How many muffins are left?",
    "Tom has 3 boxes of pencils with 12 pencils in each box. He gives 7 pencils to his sister. How many pencils does Tom have now?",
    "A train travels 60 miles per hour for 3 hours and then 40 miles per hour for 2 hours. How many miles does it travel in total?",
    "Maria earns $15 per hour and works 8 hours a day for 5 days. How much money does she earn?",
    "A garden has 4 rows of tomato plants with 9 plants in each row. If 6 plants die, how many plants are left?",
    "Jake reads 25 pages of a book every day. The book has 300 pages. How many days will it take him to finish it?",
    "A shop sells apples for $2 each and oranges for $3 each. Lisa buys 5 apples and 4 oranges. How much does she spend?",
    "There are 120 students in a school. One third of them play soccer and 25 others play basketball. How many play neither?",
]
PROMPT_FORMAT = "Question: {question}\nAnswer:"
DTYPES = ("float32", "float16", "bfloat16")
TOP_K = 10  # tokens kept in argmax histograms and top-k lists


# ---- prompts -------------------------------------------------------------------------------------


def read_questions(path: str | Path) -> list[str]:
    """Questions from a jsonl file (field `question`, or `prompt`) or a text file (one per line)."""
    from .paths import require_regular_file

    hint = "pass a GSM8K-style .jsonl (question field) or a text file"
    p = require_regular_file(path, "prompts file", hint)  # never opens a FIFO or a device
    raw = p.read_bytes()
    if b"\x00" in raw[:8192]:
        raise UserError(f"prompts file {path} is binary, not text; {hint}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompts file {path} is not UTF-8 text (byte {e.start}); {hint}") from None
    questions = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {n} is not JSON; pass a .jsonl with a question field per line") from None
            q = row.get("question") or row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(q, str):
                raise UserError(f"{path} line {n} has no 'question' (or 'prompt') string field")
            questions.append(q)
        else:
            questions.append(line)
    if not questions:
        raise UserError(f"prompts file {path} holds no prompts")
    return questions


def prompt_ids(questions: Iterable[str], tokenizer: Any, prompt_format: str | None = None) -> list[list[int]]:
    fmt = prompt_format or PROMPT_FORMAT
    out = []
    for q in questions:
        if fmt == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise UserError("--prompt-format chat needs a tokenizer with a chat template; pass a format like "
                                "'Question: {question}\\nAnswer:' instead")
            text = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            if "{question}" not in fmt:
                raise UserError("the prompt format must contain {question} (or be the word 'chat')")
            out.append(tokenizer(fmt.replace("{question}", q), add_special_tokens=True)["input_ids"])
    return out


# ---- forward statistics --------------------------------------------------------------------------


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


@torch.no_grad()
def forward_stats(model, prompts: list[list[int]], tok: TokenizerInfo) -> dict[str, Any]:
    """Logits and per-module activation statistics of the prompts in the model's current dtype.

    Activations: max |output| per module over all prompts (aminmax, one pass), whether it stayed
    finite, the first module (in completion order: children before parents) whose output went
    non-finite, and the first whose max exceeds the fp16 limit (where an fp16 overflow starts).
    """
    device = next(model.parameters()).device
    acts: dict[str, dict[str, Any]] = {}
    first_nonfinite: list[str] = []
    first_over_fp16: list[str] = []
    seen_nonfinite = [False]

    def make_hook(name: str):
        def hook(_mod, _inp, out):
            t = _first_tensor(out)
            if t is None or not t.is_floating_point() or t.numel() == 0:
                return
            lo, hi = torch.aminmax(t.detach())
            lo, hi = float(lo), float(hi)
            finite = math.isfinite(lo) and math.isfinite(hi)
            m = max(-lo, hi) if finite else (float("nan") if (lo != lo or hi != hi) else float("inf"))
            rec = acts.setdefault(name, {"max_abs": m, "finite": finite})
            if finite and rec["finite"]:
                rec["max_abs"] = max(rec["max_abs"], m)
            elif not finite:
                rec["finite"], rec["max_abs"] = False, m
            if not finite and not seen_nonfinite[0]:
                seen_nonfinite[0] = True
                first_nonfinite.append(name)
            if (not finite or m > FP16_MAX) and not first_over_fp16:
                first_over_fp16.append(name)
        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in model.named_modules() if name]
    positions = nonfinite_positions = 0
    argmax: Counter[int] = Counter()
    max_logit = 0.0
    p_pad, p_id0, last_top = [], [], Counter()
    try:
        for ids in prompts:
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
            finite_rows = torch.isfinite(logits).all(-1)
            positions += int(logits.shape[0])
            nonfinite_positions += int((~finite_rows).sum())
            # argmax on the raw logits: an all-NaN row gives id 0, as a greedy decoder would
            argmax.update(logits.argmax(-1).tolist())
            finite_vals = logits[torch.isfinite(logits)]
            if finite_vals.numel():
                max_logit = max(max_logit, float(finite_vals.abs().max()))
            probs = torch.softmax(logits[-1].float(), -1)  # next-token distribution after the prompt
            p_id0.append(float(probs[0]))
            if tok.pad_id is not None and tok.pad_id < probs.numel():
                p_pad.append(float(probs[tok.pad_id]))
            last_top[int(logits[-1].argmax())] += 1
    finally:
        for h in handles:
            h.remove()

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    total = sum(argmax.values()) or 1
    return {
        "logits_finite": nonfinite_positions == 0,
        "nonfinite_share": round(nonfinite_positions / max(positions, 1), 4),
        "positions": positions,
        "max_abs_logit": max_logit,
        "p_id0": mean(p_id0),
        "p_pad": mean(p_pad),
        "argmax_top": [{"token_id": i, "text": tok.token_text(i), "share": round(c / total, 4)} for i, c in argmax.most_common(TOP_K)],
        "next_token_top": [{"token_id": i, "text": tok.token_text(i), "prompts": c} for i, c in last_top.most_common(3)],
        "activations_finite": all(r["finite"] for r in acts.values()),
        "first_nonfinite_module": first_nonfinite[0] if first_nonfinite else None,
        "first_over_fp16_module": first_over_fp16[0] if first_over_fp16 else None,
        "activations": [{"module": name, **rec} for name, rec in acts.items()],
    }


@torch.no_grad()
def greedy(model, ids: list[int], stop_ids: set[int], max_new_tokens: int) -> dict[str, Any]:
    """Greedy decoding with a KV cache (full recompute when the model returns none). The output
    keeps the stop token when one is reached."""
    device = next(model.parameters()).device
    seq = torch.tensor([ids], device=device)
    out: list[int] = []
    nonfinite_steps = 0
    past, use_cache = None, True
    # transformers 5.x renamed past_key_values to cache; pass whichever this model's forward takes
    import inspect

    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for _ in range(max_new_tokens):
        if use_cache:
            o = model(input_ids=seq if past is None else seq[:, -1:], use_cache=True, **{cache_arg: past})
            past = getattr(o, "cache", None)
            if past is None:
                past = getattr(o, "past_key_values", None)
            use_cache = past is not None
        else:
            o = model(input_ids=seq)
        logits = o.logits[0, -1]
        if not bool(torch.isfinite(logits).all()):
            nonfinite_steps += 1
        nxt = int(logits.argmax())  # NaN rows give the first NaN index (id 0 for all-NaN)
        out.append(nxt)
        if nxt in stop_ids:
            return {"output_ids": out, "stopped": True, "nonfinite_steps": nonfinite_steps}
        seq = torch.cat([seq, torch.tensor([[nxt]], device=device)], dim=1)
    return {"output_ids": out, "stopped": False, "nonfinite_steps": nonfinite_steps}


# ---- one checkpoint -------------------------------------------------------------------------------


def _dtype_name(requested: str | None, stored: dict[str, int], config: Any) -> str:
    if requested and requested != "auto":
        if requested not in DTYPES:
            raise UserError(f"unknown dtype {requested!r}; choose auto, float32, float16 or bfloat16")
        return requested
    floats = {k: v for k, v in stored.items() if k in DTYPES}
    if floats:
        return max(floats, key=floats.get)  # what most stored values are: what from_pretrained(dtype='auto') gives
    cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(cfg).replace("torch.", "") if cfg is not None else "float32"
    return name if name in DTYPES else "float32"


def _special_tokens(tok: TokenizerInfo) -> dict[int, str]:
    """Special tokens whose embedding rows matter: eos / end-of-turn, pad, bos, and the specials
    the chat template writes."""
    ids = set(tok.eos_ids) | {i for i in (tok.pad_id, tok.bos_id) if i is not None}
    if tok.chat_template:
        for i in tok.special_ids:
            text = tok.token_text(i)
            if text and text in tok.chat_template:
                ids.add(i)
    return {i: tok.token_text(i) for i in sorted(ids)}


def _config_dict(config: Any) -> dict[str, Any]:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "architectures": list(getattr(config, "architectures", None) or []),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "tie_word_embeddings": getattr(config, "tie_word_embeddings", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "eos_token_id": getattr(config, "eos_token_id", None),
        "pad_token_id": getattr(config, "pad_token_id", None),
    }


def inspect_checkpoint(name: str, *, tokenizer: Any = None, questions: list[str] | None = None,
                       prompts: list[list[int]] | None = None, dtype: str | None = None,
                       extra_dtypes: Iterable[str] = ("float16",), max_new_tokens: int = 64,
                       trust_remote_code: bool = False, prompt_format: str | None = None,
                       stop_ids: set[int] | None = None, attn_implementation: str | None = None,
                       ) -> tuple[CheckpointRecord, TokenizerInfo, Any]:
    """Fill a CheckpointRecord for one saved model. Returns (record, tokenizer info, config)."""
    from .loading import load_checkpoint_tokenizer, load_config, load_model, load_tokenizer, resolve_checkpoint

    folder = resolve_checkpoint(name)
    config = load_config(str(folder), trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raw_tok = load_checkpoint_tokenizer(folder, shown_as=name, trust_remote_code=trust_remote_code)
    elif isinstance(tokenizer, str):
        raw_tok = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    else:
        raw_tok = tokenizer
    tok = TokenizerInfo.from_tokenizer(raw_tok)
    record = CheckpointRecord(path=str(folder), name=name, config=_config_dict(config),
                              generation_config=read_generation_config(folder), max_new_tokens=max_new_tokens)
    eos = getattr(raw_tok, "eos_token_id", None)
    record.config["tokenizer_eos_id"] = eos if isinstance(eos, int) else None

    scan = scan_weights(folder, tie_word_embeddings=getattr(config, "tie_word_embeddings", None),
                        special_tokens=_special_tokens(tok))
    record.format, record.files, record.total_bytes = scan.format, scan.files, scan.total_bytes
    record.weights, record.stored_dtypes, record.tied = scan.weights, scan.stored_dtypes, scan.tied
    record.special_rows, record.scan_seconds = scan.special_rows, scan.seconds
    record.serve_dtype = _dtype_name(dtype, scan.stored_dtypes, config)

    if prompts is None:
        prompts = prompt_ids(questions or DEFAULT_QUESTIONS, raw_tok, prompt_format)
    rows = getattr(config, "vocab_size", None)
    prompts = [p for p in prompts if p and (rows is None or max(p) < rows)]
    if not prompts:
        raise UserError(f"no prompt fits {name}: the tokenizer makes ids beyond the model's {rows} embedding rows")
    if stop_ids is None:
        stop_ids = set(tok.eos_ids) | set((record.generation_config or {}).get("eos_token_id") or [])

    device = "cuda" if torch.cuda.is_available() else "cpu"
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = load_model(str(folder), dtype=torch.float32, trust_remote_code=trust_remote_code, **attn).to(device).eval()
    record.config["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    # fp32 first (the reference), then the served dtype, fp16 (what V100/T4 serving falls back to) and
    # the dtype config.json names (what from_pretrained(dtype="auto") picks when it is set)
    dtypes = ["float32"] + [d for d in [record.serve_dtype, *extra_dtypes, record.config.get("dtype")]
                            if d in DTYPES and d != "float32"]
    for d in dict.fromkeys(dtypes):  # ordered, unique
        # each dtype is cast from the fp32 copy, which holds the stored values exactly
        m = model if d == "float32" else copy.deepcopy(model).to(getattr(torch, d))
        record.forward[d] = forward_stats(m, prompts, tok)
        record.forward[d]["served"] = d == record.serve_dtype
        if d == record.serve_dtype:
            record.generation_dtype = d
            for ids in prompts:
                g = greedy(m, ids, stop_ids, max_new_tokens)
                new = g["output_ids"][:-1] if g["stopped"] else g["output_ids"]
                g.update(prompt_ids=ids, text=tok.decode(new) if tok.decode else "")
                record.generations.append(g)
        if m is not model:
            del m
    del model
    return record, tok, config


# ---- the report -----------------------------------------------------------------------------------


def record_metrics(record: CheckpointRecord, tok: TokenizerInfo) -> dict[str, Any]:
    m: dict[str, Any] = {"checkpoint": record.summary()}
    m["weights"] = [{"name": w["name"], "dtype": w["dtype"], "shape": w["shape"], "max_abs": w["max_abs"],
                     "nonfinite": w["nan"] + w["inf"]} for w in record.weights]
    m["logits"] = {d: {k: v for k, v in f.items() if k != "activations"} for d, f in record.forward.items()}
    m["activations"] = [
        {"module": a["module"], "max_abs": a["max_abs"], "dtype": d, "limit": DTYPE_LIMITS.get(d),
         "finite": a["finite"], "phase": "forward", "step": 0}
        for d, f in record.forward.items() for a in f["activations"]
    ]
    served = record.forward.get(record.generation_dtype or record.serve_dtype) or {}
    m["argmax_histogram"] = served.get("argmax_top", [])
    m["generations"] = [
        {"prompt": tok.decode(g["prompt_ids"][-48:]) if tok.decode else "", "output": g["text"],
         "output_ids": g["output_ids"][:64], "tokens": len(g["output_ids"]), "stopped": g["stopped"],
         "nonfinite_steps": g["nonfinite_steps"], "dtype": record.generation_dtype}
        for g in record.generations
    ]
    m["tied"] = record.tied
    m["special_rows"] = record.special_rows
    m["generation_config"] = record.generation_config
    m["tokenizer"] = {"class": tok.class_name, "pad_id": tok.pad_id, "pad_token": tok.pad_token,
                      "eos_ids": sorted(tok.eos_ids), "eos_token": tok.eos_token, "bos_id": tok.bos_id, "len": tok.vocab_len}
    if record.weight_change:
        changes = [c for c in record.weight_change if c.get("relative_change") is not None]
        m["weight_change"] = sorted(record.weight_change, key=lambda c: -(c.get("relative_change") or 0))
        vals = sorted(c["relative_change"] for c in changes)
        m["weight_change_summary"] = {
            "tensors": len(record.weight_change), "median": vals[len(vals) // 2] if vals else None,
            "max": vals[-1] if vals else None, "unchanged": sum(1 for v in vals if v == 0.0),
        }
    if record.base is not None:
        b = record.base
        m["base"] = {"checkpoint": b.summary(),
                     "logits": {d: {k: v for k, v in f.items() if k != "activations"} for d, f in b.forward.items()},
                     "generations": [{"output": g["text"], "stopped": g["stopped"], "nonfinite_steps": g["nonfinite_steps"]}
                                     for g in b.generations[:4]]}
    return m


def diagnose(path: str, *, base: str | None = None, prompts: str | list[str] | None = None, dtype: str | None = None,
             max_new_tokens: int = 64, num_prompts: int = 8, trust_remote_code: bool = False,
             tokenizer: Any = None, prompt_format: str | None = None, attn_implementation: str | None = None,
             ignore: Iterable[str] = (), registry: Registry = REGISTRY) -> Report:
    """Diagnose a saved model (folder or Hub id) and return the Report.

    prompts: a .jsonl (question field) or text file, or a list of questions (default: built-in
    GSM8K-style questions). dtype: the dtype it is served in (default: the stored dtype).
    base: the model it was fine-tuned from, checked the same way for comparison.
    attn_implementation: eager / sdpa as the serving stack runs it (fp16 overflow in Q.K^T shows
    under eager; default: what transformers picks).
    """
    from . import trainmeta
    from .loading import resolve_checkpoint

    if max_new_tokens < 1 or num_prompts < 1:
        raise UserError("--max-new-tokens and --num-prompts must be at least 1")
    questions = read_questions(prompts) if isinstance(prompts, (str, Path)) else (list(prompts) if prompts else None)
    # a model saved by `sftdoctor train` says how it was trained: its questions, prompt format and end
    # tokens are used unless the user gives their own (asking it questions in a format it never saw
    # would blame the model for our prompt)
    meta = trainmeta.read(resolve_checkpoint(path)) if Path(path).expanduser().is_dir() else None
    stop_ids = None
    if meta is not None:
        questions = questions or meta.get("eval_questions") or None
        prompt_format = prompt_format or meta.get("prompt_format")
        if meta.get("end_tokens"):
            stop_ids = {int(t) for t in meta["end_tokens"]}
    questions = (questions or DEFAULT_QUESTIONS)[:num_prompts]
    record, tok, config = inspect_checkpoint(path, tokenizer=tokenizer, questions=questions, dtype=dtype,
                                             max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code,
                                             prompt_format=prompt_format, attn_implementation=attn_implementation,
                                             stop_ids=None if stop_ids is None else stop_ids | _default_stops(path, tokenizer))
    if base is not None:
        # identical settings: the same prompt ids, stop ids, served dtype and extra dtypes
        same_prompts = [g["prompt_ids"] for g in record.generations]
        stop = set(tok.eos_ids) | set((record.generation_config or {}).get("eos_token_id") or [])
        base_tok = tokenizer if tokenizer is not None else (None if _has_tokenizer(base) else _reuse(path))
        record.base, _, _ = inspect_checkpoint(base, tokenizer=base_tok, prompts=same_prompts, dtype=record.serve_dtype,
                                               extra_dtypes=list(record.forward), max_new_tokens=max_new_tokens,
                                               trust_remote_code=trust_remote_code, stop_ids=stop,
                                               attn_implementation=attn_implementation)
        record.weight_change = weight_change(record.path, record.base.path)

    hints = {}
    if meta is not None:
        hints["training"] = {**meta.get("training", {}), "source": trainmeta.FILE}
    ctx = ProbeContext(tokenizer=tok, model=ModelInfo.from_config(config), checkpoint=record, hints=hints)
    session = Session("diagnose", registry, ignore=ignore)
    session.check(ctx, "checkpoint")
    report = session.report
    report.metrics.update(record_metrics(record, tok))
    if meta is not None:
        report.metrics["trained_by_sftdoctor"] = {"prompt_format": prompt_format, "end_tokens": meta.get("end_tokens"),
                                                  "training": meta.get("training")}
    return session.finish()


def _default_stops(path: str, tokenizer: Any) -> set[int]:
    """The tokenizer's and generation_config's eos ids (what inspect_checkpoint stops on by default)."""
    from .loading import load_checkpoint_tokenizer, resolve_checkpoint

    folder = resolve_checkpoint(path)
    out = set((read_generation_config(folder) or {}).get("eos_token_id") or [])
    try:
        raw = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else load_checkpoint_tokenizer(folder, shown_as=path)
        out |= set(TokenizerInfo.from_tokenizer(raw).eos_ids)
    except Exception:  # the tokenizer is loaded (and its errors reported) by inspect_checkpoint
        pass
    return out


def _has_tokenizer(name: str) -> bool:
    from .loading import TOKENIZER_FILES

    p = Path(name).expanduser()
    return not p.exists() or any((p / f).is_file() for f in TOKENIZER_FILES)


def _reuse(path: str) -> Any:
    """The fine-tune's tokenizer, for a base folder saved without one."""
    from .loading import load_checkpoint_tokenizer, resolve_checkpoint

    return load_checkpoint_tokenizer(resolve_checkpoint(path), shown_as=path)

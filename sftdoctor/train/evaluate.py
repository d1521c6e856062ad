"""GSM8K-style evaluation: greedy batched generation, exact match of the number after `####`.

Generation pads on the LEFT: every prompt then ends at the last column, so the first generated
token of every row follows its own prompt directly (right padding would put pad tokens between
a short prompt and its answer).
"""
from __future__ import annotations

from typing import Any

import torch

from .collate import prompt_ids
from .data import final_answer


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, questions: list[str], *, prompt_format: str, stop: list[int],
                     max_new_tokens: int, batch_size: int, progress: Any = None) -> list[dict[str, Any]]:
    """For each question: the decoded answer (up to the stop token), whether it stopped, its length,
    and its token ids (prompt_ids; output_ids: the new tokens, the stop token included)."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    out: list[dict[str, Any]] = []
    task = progress.add_task("evaluating", total=len(questions)) if progress is not None else None
    for start in range(0, len(questions), batch_size):
        prompts = [prompt_ids(tokenizer, q, prompt_format) for q in questions[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: the prompt ends at the last column
            input_ids[r, width - len(p):] = torch.tensor(p)
            attention_mask[r, width - len(p):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                   pad_token_id=pad, use_cache=True)
        for p, row in zip(prompts, generated[:, width:].tolist()):
            stopped = next((i for i, t in enumerate(row) if t in stop), None)
            tokens = row if stopped is None else row[:stopped]
            # prompt_ids / output_ids (new tokens up to and with the stop token): what the checkpoint probes read
            out.append({"text": tokenizer.decode(tokens, skip_special_tokens=True), "stopped": stopped is not None,
                        "new_tokens": len(tokens) + (stopped is not None), "prompt_ids": p,
                        "output_ids": row if stopped is None else row[:stopped + 1]})
        if task is not None:
            progress.advance(task, len(prompts))
    if task is not None:
        progress.remove_task(task)
    return out


def well_formed(text: str) -> bool:
    """The answer's last line is `#### N` (GSM8K's format)."""
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return last.startswith("####") and final_answer(last) is not None


def evaluate(model: Any, tokenizer: Any, rows: list[dict], *, prompt_format: str, stop: list[int], max_new_tokens: int,
             batch_size: int, progress: Any = None, keep_samples: int = 8) -> dict[str, Any]:
    """accuracy (exact match), format rate (`#### N` then a stop token), stop rate, and samples."""
    answers = generate_answers(model, tokenizer, [r["question"] for r in rows], prompt_format=prompt_format, stop=stop,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    correct = formatted = stopped = 0
    samples = []
    for row, ans in zip(rows, answers):
        gold = final_answer(row["answer"])
        pred = final_answer(ans["text"])
        ok = pred is not None and pred == gold
        fmt = ans["stopped"] and well_formed(ans["text"])
        correct += ok
        formatted += fmt
        stopped += ans["stopped"]
        if len(samples) < keep_samples:
            samples.append({"id": row["id"], "question": row["question"], "output": ans["text"], "gold": gold,
                            "predicted": pred, "correct": ok, "stopped": ans["stopped"]})
    n = max(len(rows), 1)
    return {
        "examples": len(rows),
        "accuracy": correct / n,
        "format_rate": formatted / n,
        "stop_rate": stopped / n,
        "mean_new_tokens": sum(a["new_tokens"] for a in answers) / n,
        "max_new_tokens": max_new_tokens,
        "samples": samples,
    }

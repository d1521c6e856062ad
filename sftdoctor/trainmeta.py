"""What `sftdoctor train` saves next to a model for `sftdoctor diagnose` (file sftdoctor-train.json).

diagnose asks a saved model the questions it was trained on, in the prompt format it was trained
with, and stops on the end tokens it was trained to emit; the training evidence (first and last
loss, steps, whether EOS was supervised, the eval score) lets it tell an undertrained model from a
broken one. Plain JSON, small, never required: a folder without it is diagnosed as before.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from .atomic import write_atomic

FILE = "sftdoctor-train.json"
SCHEMA = "sftdoctor.train-meta/1"
PLAIN_FORMAT = "Question: {question}\nAnswer:"
MAX_QUESTIONS = 8


def write(folder: str | Path, *, prompt_format: str, questions: Iterable[str], end_tokens: Iterable[int],
          eos_supervised: bool | None, training: Mapping[str, Any]) -> Path:
    """prompt_format: 'chat' or a format with {question}; end_tokens: the ids the model was trained
    to end an answer with; training: first_loss, last_loss, steps, vocab_size (what is known)."""
    data = {
        "schema": SCHEMA,
        "written_by": "sftdoctor train",
        "prompt_format": prompt_format,
        "eval_questions": [q for q in questions][:MAX_QUESTIONS],
        "end_tokens": sorted({int(t) for t in end_tokens}),
        "training": {**{k: v for k, v in training.items() if v is not None}, "eos_supervised": eos_supervised},
    }
    return write_atomic(Path(folder) / FILE, json.dumps(data, indent=1) + "\n")


def update(folder: str | Path, **training: Any) -> None:
    """Add training facts known later (the eval score) to an existing file."""
    data = read(folder)
    if data is None:
        return
    data["training"].update({k: v for k, v in training.items() if v is not None})
    write_atomic(Path(folder) / FILE, json.dumps(data, indent=1) + "\n")


def read(folder: str | Path) -> dict[str, Any] | None:
    """The metadata, or None when the folder has none (or it is not ours / unreadable)."""
    p = Path(folder) / FILE
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return None
    data.setdefault("training", {})
    if not isinstance(data["training"], dict):
        data["training"] = {}
    return data


def from_train_run(folder: str | Path, pipe: Any, report: Any) -> Path | None:
    """Write the file for a model `sftdoctor train` just saved (pipe: train.pipeline.Pipeline)."""
    from .train.pipeline import stop_ids

    recipe = pipe.recipe
    fmt = "chat" if recipe.prompt_format == "chat" else PLAIN_FORMAT
    t = report.metrics.get("train") or {}
    status = {c.id: c.status for c in report.checks}
    # EOS supervised: the recipe appends it and preflight's labels-eos-missing / pad-is-eos-masked ran and passed
    eos_ok = [status.get(i) for i in ("labels-eos-missing", "pad-is-eos-masked")]
    eos_supervised = (False if "fail" in eos_ok else
                      True if getattr(recipe, "append_eos", True) and "pass" in eos_ok else None)
    vocab = getattr(getattr(pipe.model, "config", None), "vocab_size", None)
    try:
        return write(folder, prompt_format=fmt, questions=[r["question"] for r in pipe.eval_rows[:MAX_QUESTIONS]],
                     end_tokens=stop_ids(pipe.tokenizer, recipe.prompt_format), eos_supervised=eos_supervised,
                     training={"first_loss": t.get("first_loss"), "last_loss": t.get("final_loss"),
                               "steps": t.get("steps"), "vocab_size": vocab, "model": getattr(recipe, "model", None),
                               "checks_passed": sorted(i for i, s in status.items() if s == "pass")[:40]})
    except OSError:
        return None

"""Question/answer rows for training and evaluation: GSM8K from the Hub, a local copy
(folder or .jsonl), or built-in synthetic word problems in GSM8K's format.

A row is {"id": int, "question": str, "answer": str}; every answer ends with `#### N`.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..errors import UserError

HUB_GSM8K = "openai/gsm8k"

# ---- answers ----------------------------------------------------------------------------------

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def final_answer(text: str) -> str | None:
    """The number after the last `####`, commas removed (GSM8K's own normalisation:
    openai/grade-school-math grade_school_math/dataset.py `extract_answer`)."""
    found = _FINAL.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    if "." in number:  # 12.0 and 12 are the same answer
        number = number.rstrip("0").rstrip(".")
    return number


# ---- synthetic problems -----------------------------------------------------------------------

NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eli", "Amy", "Ben", "Kim", "Raj", "Ana", "Noah", "Lily"]
THINGS = ["apples", "pens", "cards", "stickers", "books", "shells", "coins", "marbles", "cookies", "stamps", "toys", "eggs"]


def _level1(rng: random.Random) -> tuple[str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    q = f"{name} has {a} {thing}. {name} gets {b} more {thing}. How many {thing} does {name} have now?"
    s = f"{name} has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} {thing}.\n#### {a + b}"
    return q, s


def _level2(rng: random.Random) -> tuple[str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 20), rng.randint(1, 20)
    if rng.random() < 0.5 and a > b:
        q = f"{name} has {a} {thing}. {name} gives away {b} {thing}. How many {thing} are left?"
        s = f"{name} has {a}-{b} = <<{a}-{b}={a - b}>>{a - b} {thing} left.\n#### {a - b}"
    else:
        q = f"{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have?"
        s = f"{name} has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} {thing}.\n#### {a + b}"
    return q, s


def _level3(rng: random.Random) -> tuple[str, str]:
    name, other, thing = rng.choice(NAMES), rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randint(2, 15), rng.randint(1, 10), rng.randint(1, 9)
    q = (f"{name} has {a} {thing}. {other} gives {name} {b} more. Then {name} uses {c} of them. "
         f"How many {thing} does {name} have left?")
    t = a + b
    s = (f"After the gift {name} has {a}+{b} = <<{a}+{b}={t}>>{t} {thing}.\n"
         f"Then {name} has {t}-{c} = <<{t}-{c}={t - c}>>{t - c} {thing} left.\n#### {t - c}")
    return q, s


def _level4(rng: random.Random) -> tuple[str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    q = f"{name} buys {a} boxes of {thing}. Each box holds {b} {thing}. How many {thing} does {name} buy?"
    s = f"{name} buys {a}*{b} = <<{a}*{b}={a * b}>>{a * b} {thing}.\n#### {a * b:,}"
    return q, s


LEVELS = {1: _level1, 2: _level2, 3: _level3, 4: _level4}
SYNTHETIC_TRAIN_ROWS = 2000  # with the tiny model: format, stop and level-1 sums learned in ~375 steps


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or any(lv not in LEVELS for lv in levels):
        raise UserError(f"levels {text!r}: give comma-separated synthetic difficulty levels from {sorted(LEVELS)}")
    return levels


def synthetic_rows(n: int, levels: list[int], seed: int, *, start_id: int = 0) -> list[dict]:
    """n deterministic word problems, levels taken in turn; same (n, levels, seed) -> same rows."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q, a = LEVELS[levels[i % len(levels)]](rng)
        rows.append({"id": start_id + i, "question": q, "answer": a})
    return rows


def synthetic_splits(n_train: int, n_test: int, levels: list[int], seed: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out test problems; a test problem never has the exact text of a train one."""
    train = synthetic_rows(n_train, levels, seed)
    seen = {r["question"] for r in train}
    pool = synthetic_rows(n_test * 4 + 100, levels, seed + 10_007, start_id=n_train)
    test = [r for r in pool if r["question"] not in seen][:n_test]
    return train, test


# ---- GSM8K (Hub or local) ---------------------------------------------------------------------

def _check_rows(rows: list, where: str) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            keys = sorted(r) if isinstance(r, dict) else type(r).__name__
            raise UserError(f"{where}: row {i} has no string question/answer fields (found {keys}); "
                            "each row needs {\"question\": ..., \"answer\": \"... #### N\"}")
        out.append({"id": i, "question": r["question"], "answer": r["answer"]})
    return out


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n} is not valid JSON ({e.msg}); each line must be one JSON object") from None
    if not rows:
        raise UserError(f"{path} holds no rows")
    return _check_rows(rows, str(path))


def load_local(path: str) -> tuple[list[dict], list[dict] | None]:
    """A .jsonl file (train only: the test split is carved from it) or a folder with
    train.jsonl and optionally test.jsonl."""
    p = Path(path).expanduser()
    if p.is_file():
        return read_jsonl(p), None
    if p.is_dir():
        train = p / "train.jsonl"
        if not train.is_file():
            raise UserError(f"data folder {path} has no train.jsonl; pass a folder with train.jsonl (and test.jsonl) or one .jsonl file")
        test = p / "test.jsonl"
        return read_jsonl(train), read_jsonl(test) if test.is_file() else None
    if p.exists():  # a FIFO or a device: never read (it would block)
        from ..paths import describe_kind

        raise UserError(f"data path {path} is {describe_kind(p)}, not a .jsonl file or a folder")
    raise UserError(f"data file or folder {path} does not exist")


def load_hub(name: str, config: str) -> tuple[list[dict], list[dict]]:
    """Real Hub loading via datasets.load_dataset, with one clear line when it cannot be reached."""
    from ..loading import hub_reachable

    try:
        import datasets
    except ImportError:
        raise UserError("loading a Hub dataset needs the `datasets` package; pip install datasets") from None
    kw = {}
    if not hub_reachable():
        kw["download_mode"] = "reuse_dataset_if_exists"
        import os

        os.environ["HF_DATASETS_OFFLINE"] = "1"  # use the local cache only; fail fast when absent
    try:
        ds = datasets.load_dataset(name, config, **kw)
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        if "offline" in text.lower() or "connect" in text.lower() or "resolve" in text.lower() or "cache" in text.lower() or not hub_reachable():
            raise UserError(f"cannot load dataset {name!r}: the Hugging Face Hub is unreachable and it is not in the local cache; "
                            "pass a local folder or .jsonl with question/answer rows (--data DIR)") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load dataset {name!r} ({config}): {first[:200]}") from None
    if "train" not in ds:
        raise UserError(f"dataset {name!r} has no train split")
    train = _check_rows(list(ds["train"]), name)
    test = _check_rows(list(ds["test"]), name) if "test" in ds else None
    return train, test


def load_rows(data: str, *, data_config: str, levels: str, train_examples: int, eval_limit: int, seed: int) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out rows, a one-line description of the source)."""
    if data == "synthetic":
        lv = parse_levels(levels)
        n_test = eval_limit or 500
        train, test = synthetic_splits(train_examples or SYNTHETIC_TRAIN_ROWS, n_test, lv, seed)
        return train, test, f"synthetic GSM8K-format problems, levels {','.join(map(str, lv))}"
    p = Path(data).expanduser()
    if p.exists() or data.endswith(".jsonl") or data.startswith((".", "/", "~")):
        train, test = load_local(data)
        source = f"local {data}"
    elif re.match(r"^[\w.-]+/[\w.-]+$", data):
        train, test = load_hub(data, data_config)
        source = f"Hub {data} ({data_config})"
    else:
        raise UserError(f"data {data!r}: pass `synthetic`, a Hub dataset id like openai/gsm8k, or a local folder/.jsonl")
    if test is None:  # carve a held-out set from the end of the training rows
        n_hold = max(1, min(len(train) // 10, eval_limit or 200))
        train, test = train[:-n_hold], train[-n_hold:]
        source += f" (last {n_hold} rows held out for evaluation)"
    if train_examples:
        train = train[:train_examples]
    if eval_limit:
        test = test[:eval_limit]
    # ids: train rows 0..n-1, test rows after them, so a row id names one example in the run
    train = [{**r, "id": i} for i, r in enumerate(train)]
    test = [{**r, "id": len(train) + i} for i, r in enumerate(test)]
    return train, test, source

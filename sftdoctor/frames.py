"""Finding the user's objects (tokenizer, optimizer, Trainer) from inside a hook: the calling
frames' locals nearest first, then the script's globals. Read-only: nothing here changes them."""
from __future__ import annotations

from types import FrameType
from typing import Any, Mapping

from .runner import is_our_file


def tokenizer_in(value: Any, depth: int = 0) -> Any:
    """The tokenizer held by value: itself, a Trainer's processing_class, a collator's tokenizer,
    a DataLoader's collate_fn, a functools.partial's keywords."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(value, PreTrainedTokenizerBase):
        return value
    if depth >= 2 or value is None or isinstance(value, (str, bytes, int, float, bool, list, tuple, dict)):
        return None
    own = getattr(value, "__dict__", None)
    if not isinstance(own, dict):
        return None
    for name in ("processing_class", "tokenizer", "_tokenizer", "processor", "data_collator", "collate_fn", "keywords"):
        sub = own.get(name)
        if isinstance(sub, dict):  # functools.partial(collate, tokenizer=tok).keywords
            for v in sub.values():
                found = tokenizer_in(v, depth + 1)
                if found is not None:
                    return found
        elif sub is not None:
            found = tokenizer_in(sub, depth + 1)
            if found is not None:
                return found
    return None


def trainer_tokenizer(trainer: Any, script_globals: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The tokenizer a Trainer's batches were made with, and where it was found: processing_class,
    else the data collator's, else the train dataset's, else the script's globals. (None, "") when
    there is none: the EOS checks then say they did not run."""
    for where, value in (("processing_class", getattr(trainer, "processing_class", None)),
                         ("data_collator", getattr(trainer, "data_collator", None)),
                         ("train_dataset", getattr(trainer, "train_dataset", None))):
        try:
            found = tokenizer_in(value)
        except Exception:
            found = None
        if found is not None:
            return found, where
    for value in list((script_globals or {}).values()):
        found = tokenizer_in(value)
        if found is not None:
            return found, "the script's globals"
    return None, ""


def find_tokenizer(frame: FrameType | None, script_globals: Mapping[str, Any] | None = None) -> Any:
    """The tokenizer the script uses: the calling frames' locals first (nearest first), then the
    script's globals, then (last resort) any tokenizer alive in the process."""
    depth = 0
    while frame is not None and depth < 40:
        if not is_our_file(frame.f_code.co_filename):
            for value in list(frame.f_locals.values()):
                found = tokenizer_in(value)
                if found is not None:
                    return found
        frame, depth = frame.f_back, depth + 1
    for value in list((script_globals or {}).values()):
        found = tokenizer_in(value)
        if found is not None:
            return found
    import gc

    from transformers import PreTrainedTokenizerBase

    for obj in gc.get_objects():
        if isinstance(obj, PreTrainedTokenizerBase):
            return obj
    return None


def find_in_frames(frame: FrameType | None, kind: type, script_globals: Mapping[str, Any] | None = None) -> Any:
    """The nearest instance of `kind` among the calling frames' locals (and their `self`'s
    attributes one level down), then the script's globals."""
    depth = 0
    while frame is not None and depth < 40:
        for value in list(frame.f_locals.values()):
            if isinstance(value, kind):
                return value
        frame, depth = frame.f_back, depth + 1
    for value in list((script_globals or {}).values()):
        if isinstance(value, kind):
            return value
    return None

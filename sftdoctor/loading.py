"""Loading tokenizers, configs and models from a local folder or the Hugging Face Hub, with one
clear line when that is not possible (missing folder, no network, gated repo)."""
from __future__ import annotations

import contextvars
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError

# Invariant: nothing sftdoctor loads runs a model folder's own Python (transformers' auto_map) unless
# the user passed --trust-remote-code; with trust_remote_code unset, transformers would instead ask
# [y/N] on stdin, and a `y` runs that code. Every loader below passes an explicit value.
_TRUST_REMOTE_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("sftdoctor_trust_remote_code", default=False)


@contextmanager
def remote_code(allowed: bool) -> Iterator[None]:
    """Inside: loaders that are not given trust_remote_code use `allowed` (the --trust-remote-code flag)."""
    token = _TRUST_REMOTE_CODE.set(bool(allowed))
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)


def remote_code_allowed() -> bool:
    return _TRUST_REMOTE_CODE.get()


def _trust(kw: dict[str, Any]) -> dict[str, Any]:
    return {**kw, "trust_remote_code": bool(kw.get("trust_remote_code", _TRUST_REMOTE_CODE.get()))}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.rstrip("/").split("/", 1)[-1] or Path(name).exists()


def _hub_error(what: str, name: str, e: Exception) -> UserError:
    text = f"{type(e).__name__}: {e}"
    if kw_local_only(e) or any(k in text for k in ("offline", "Connection", "resolve", "Max retries", "Network", "timed out", "couldn't connect", "LocalEntryNotFound", "ConnectError")):
        return UserError(
            f"cannot load {what} {name!r}: the Hugging Face Hub is unreachable and it is not in the local cache; "
            "pass a local folder, or download it on a machine with network (huggingface-cli download)"
        )
    if "gated" in text or "401" in text or "403" in text:
        return UserError(f"cannot load {what} {name!r}: the repository is gated or private; run `huggingface-cli login`")
    if "404" in text or "not a valid model identifier" in text or "Repository Not Found" in text or "RepositoryNotFound" in text:
        return UserError(f"cannot load {what} {name!r}: no such local folder or Hub repository; check the name")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"cannot load {what} {name!r}: {first}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick DNS + TCP check, so an offline machine gets one clear line instead of
    huggingface_hub's minute of retries. HF_HUB_OFFLINE=1 means "do not try"."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_kwargs(name: str, kw: dict[str, Any]) -> dict[str, Any]:
    """For a Hub id on an offline machine: use the local cache only (a clear error if absent)."""
    if not Path(name).expanduser().exists() and not hub_reachable():
        kw = {**kw, "local_files_only": True}
    return kw


def kw_local_only(e: Exception) -> bool:
    return "local_files_only" in str(e) or "cannot find the requested files in the local cache" in str(e)


def _check_name(what: str, name: str) -> None:
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{what} path {name} is a file; pass the folder that holds it")
        return
    if _looks_local(name) or not _HUB_ID.match(name):
        raise UserError(f"{what} folder {name} does not exist; pass a local folder or a Hub id like Qwen/Qwen2.5-0.5B")


def load_tokenizer(name: str, **kw: Any):
    _check_name("tokenizer", name)
    kw = _trust(kw)
    p = Path(name).expanduser()
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        # AutoTokenizer would quietly build an empty tokenizer from config.json alone (false findings)
        raise UserError(f"tokenizer folder {name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                        "pass the folder tokenizer.save_pretrained wrote, or a Hub id")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if Path(name).expanduser().exists() else name, **_hub_kwargs(name, kw))
    except Exception as e:  # transformers raises OSError/ValueError/HTTP errors here
        raise _hub_error("tokenizer", name, e) from None


def load_config(name: str, **kw: Any):
    _check_name("model", name)
    kw = _trust(kw)
    p = Path(name).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError(f"model folder {name} has no config.json; pass the folder of a saved model (save_pretrained)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(p) if p.exists() else name, **_hub_kwargs(name, kw))
    except Exception as e:
        raise _hub_error("model config", name, e) from None


def has_weights(folder: str | os.PathLike) -> bool:
    p = Path(folder)
    return p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")))


def load_model(name: str, **kw: Any):
    kw = _trust(kw)
    load_config(name, trust_remote_code=kw["trust_remote_code"])  # clear errors first
    from .checkpoint import weight_files

    if Path(name).expanduser().is_dir():
        weight_files(Path(name).expanduser())  # a model.safetensors that is a folder, a LoRA adapter only: one line
    from transformers import AutoModelForCausalLM

    p = Path(name).expanduser()
    try:
        return AutoModelForCausalLM.from_pretrained(str(p) if p.exists() else name, **_hub_kwargs(name, kw))
    except Exception as e:
        raise _hub_error("model", name, e) from None


# ---- a saved checkpoint as one local folder (diagnose) -------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
_SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.model", "*.txt", "*.py", "*.tiktoken"]


def resolve_checkpoint(name: str) -> Path:
    """The local folder of a saved model: the folder itself, or the Hub snapshot of a repo id
    (downloaded to the HF cache; offline: the cache only). Raises UserError with one line."""
    _check_name("model", name)
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"model folder {name} has no config.json; pass the folder of a saved model (save_pretrained)")
        return p
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, allow_patterns=_SNAPSHOT_PATTERNS, **_hub_kwargs(name, {})))
    except Exception as e:
        raise _hub_error("model", name, e) from None
    if not (folder / "config.json").is_file():
        raise UserError(f"Hub repository {name} has no config.json; pass a repository of a transformers model")
    return folder


def load_checkpoint_tokenizer(folder: str | os.PathLike, *, shown_as: str | None = None, **kw: Any):
    """The tokenizer saved beside a model. A folder without tokenizer files is an error here
    (AutoTokenizer would quietly build an empty tokenizer from config.json alone)."""
    p = Path(folder)
    shown = shown_as or str(folder)
    kw = _trust(kw)
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{shown} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the tokenizer "
                        "beside the model (tokenizer.save_pretrained) or pass --tokenizer DIR_OR_ID")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p) if p.exists() else str(folder), **_hub_kwargs(str(folder), kw))
    except UserError:
        raise
    except Exception as e:
        raise _hub_error("tokenizer", shown, e) from None


def load_batch_file(path: str) -> dict:
    """A torch.save'd batch, loaded with weights_only=True: tensors and plain containers only, so a
    file can never run code here (never retried with weights_only=False)."""
    import torch

    from .paths import require_regular_file

    p = require_regular_file(path, "batch file", f"save one with torch.save(dict(batch), '{Path(path).name}') in your loop")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours its refusal text
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found or "Unsupported global" in text or "Unsupported class" in text:
            what = f" ({found.group(1)})" if found else ""
            raise UserError(f"{path} holds non-tensor objects{what}; sftdoctor loads only tensors and plain containers "
                            f"(it never runs a file's code): save the batch as a plain dict, torch.save(dict(batch), '{p.name}')") from None
        raise UserError(f"cannot read {path} as a torch.save'd batch: it is not a torch.save file, or it is truncated; "
                        f"save one with torch.save(dict(batch), '{p.name}')") from None
    return obj

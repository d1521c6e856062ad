"""Untrusted text on the terminal: dataset text, token strings, a model's generations, a script's
error messages. A terminal obeys control sequences in what it prints (OSC 52 writes the
clipboard, OSC 0 sets the window title, CSI 2J clears the screen) and logs (`| tee`, CI) keep
them, so every such string passes through terminal_safe() before it is printed.
"""
from __future__ import annotations

import re
from typing import Any

# C0 controls except tab and newline, DEL, and the C1 block (U+0080-U+009F: U+009B is a one-character
# CSI, U+009D an OSC). Carriage return is included: it lets a line overwrite what was printed before it.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_NAMES = {"\x1b": "\\e", "\r": "\\r", "\x00": "\\0"}


def _visible(m: re.Match) -> str:
    c = m.group()
    return _NAMES.get(c) or f"\\x{ord(c):02x}"


def terminal_safe(text: Any) -> str:
    """`text` as a str whose control characters are shown as escapes (ESC -> \\e, CR -> \\r,
    others \\xNN): printable and inert. Tabs and newlines stay."""
    s = text if isinstance(text, str) else str(text)
    return _CONTROL.sub(_visible, s)


def terminal_safe_data(value: Any) -> Any:
    """terminal_safe() on every string inside dicts/lists (keys included); other values as they are."""
    if isinstance(value, str):
        return terminal_safe(value)
    if isinstance(value, dict):
        return {terminal_safe_data(k): terminal_safe_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [terminal_safe_data(v) for v in value]
    return value

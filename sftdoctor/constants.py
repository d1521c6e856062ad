"""Constants that several layers read, defined once. No torch import: renderers use them."""
from __future__ import annotations

IGNORE_INDEX = -100  # HF / PyTorch cross-entropy ignore_index: labels equal to it carry no loss

# Token classes, in the order of sftdoctor.tokens.TokenClass codes (its values index this tuple).
CLASS_NAMES = ("prompt", "response", "eos", "pad", "special")

"""Test fixture: the incident collator shipped in examples/incident_collator.py, importable as
`incident_collator:collate` from this folder (tests/test_train.py puts it on sys.path)."""
import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parents[1] / "examples" / "incident_collator.py"
_spec = importlib.util.spec_from_file_location("_examples_incident_collator", _path)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
collate = _module.collate
PAD = _module.PAD

#!/usr/bin/env bash
# Set up a fresh machine: a .venv with the CPU build of torch, sftdoctor (editable) and its
# test dependencies, and headless Chromium for the HTML report tests. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch==2.13.0 is the CPU build on this disk; an unpinned torch would pull a 5 GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch, transformers, sftdoctor; print('sftdoctor', sftdoctor.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "bootstrap: could not install chromium; browser tests will be skipped" >&2
fi

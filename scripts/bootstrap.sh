#!/usr/bin/env bash
# Set up a fresh machine: a .venv with the CPU build of torch, sftdoctor (editable) and its
# test dependencies, and headless Chromium for the HTML report tests.
#
# Quiet and idempotent: a stamp in .venv records what was installed (the hash of pyproject.toml,
# the Python version, the torch pin, this folder); a second run with the same stamp installs
# nothing. Edit pyproject.toml (or pass BOOTSTRAP_FORCE=1) and the next run reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH="torch==2.13.0"  # the CPU build on this disk; an unpinned torch would pull a 5 GB CUDA build
STAMP=.venv/.sftdoctor-bootstrap
say() { echo "bootstrap: $*"; }

[ -x .venv/bin/python ] || { say "creating .venv"; "$PY" -m venv .venv; }
want="$(.venv/bin/python - "$TORCH" <<'PYEOF'
import hashlib, os, sys
h = hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest()
print(f"pyproject={h} python={sys.version.split()[0]} {sys.argv[1]} repo={os.getcwd()}")
PYEOF
)"

# pip's own noise (setuptools build warnings, "Requirement already satisfied") is kept in a log
# and shown only when a step fails.
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
pip_quiet() {
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$LOG" 2>&1; then
    cat "$LOG" >&2
    say "pip install $* failed (full output above)" >&2
    exit 1
  fi
}

if [ "${BOOTSTRAP_FORCE:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('sftdoctor') is None)" >/dev/null 2>&1; then
  say ".venv is up to date (pyproject.toml unchanged since the last run); nothing installed"
else
  rm -f "$STAMP"
  say "installing $TORCH and sftdoctor[test] (editable) into .venv"
  pip_quiet "$TORCH"
  pip_quiet -e ".[test]"
  echo "$want" > "$STAMP"
  .venv/bin/python -c "import torch, transformers, sftdoctor; print('bootstrap: sftdoctor', sftdoctor.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
fi

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium (apt) for the HTML report tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
      || say "could not install chromium; the browser tests will be skipped" >&2
  else
    say "no chromium on PATH; the browser tests will be skipped (install it with your package manager)" >&2
  fi
fi
say "done: run sftdoctor as .venv/bin/sftdoctor, or 'source .venv/bin/activate' first"

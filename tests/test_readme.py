"""Every command of README.md works as written.

Each fenced ```bash block of the README runs, command by command and in order, in a fresh copy of
the repository (the files a clone has, with `../shared` beside it as in CI), with the virtualenv's
bin on PATH and the Hugging Face Hub switched off. A command is skipped only when it needs a GPU
or the Hub (or is the test suite itself, which this file is part of), and the skip says which.

A command "works" when it exits with the code the README promises: 1 where it finds the incident's
defects, 0 for the correct examples and the set-up, 0 or 1 otherwise (a fail finding is a result),
never 2 (a usage error: the README is wrong) and never with a traceback.

    python -m pytest -q tests/test_readme.py            # the fast checks and every block
    python -m pytest -q tests/test_readme.py -m "not slow"
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV = Path(sys.prefix)
IN_VENV = sys.prefix != sys.base_prefix
TIMEOUT = 900  # seconds per command: the full default `train --fix` on a busy 2-core machine

# exit codes the README promises, by a piece of the command; the first match wins
EXPECTED = [
    ("python examples/incident_loop.py", {0}),          # the loop itself runs fine: that is the incident
    ("examples/incident_loop.py", {1}),                  # sftdoctor finds its defects
    ("diagnose saved-model", {1}),                       # NaN weights
    ("--batch batch.pt", {1}),                           # the incident's batch
    ("good_loop", {0}), ("good_trainer", {0}),           # correct scripts: never a fail
    ("train --collator examples.incident_collator:collate --fix", {0}),
    ("bootstrap.sh", {0}), ("source ", {0}), ("--help", {0}), ("probes", {0}),
]
# `train --max-steps N` leaves an undertrained model whose checkpoint checks may fail: 0 or 1.
DEFAULT_EXPECTED = {0, 1}
HUB_ID = re.compile(r"[A-Za-z0-9][\w-]*/[\w.-]+")


# ---- reading the README -------------------------------------------------------------------------

def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the fence, commands) for every ```bash block; comments and blank lines
    dropped, `\\` continuations joined."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start, cmds, cont = i + 1, [], ""
            i += 1
            while lines[i].strip() != "```":
                line = lines[i].rstrip()
                if line.endswith("\\"):
                    cont += line[:-1] + " "
                else:
                    cmd = (cont + line).strip()
                    cont = ""
                    if cmd and not cmd.startswith("#"):
                        cmds.append(cmd)
                i += 1
            blocks.append((start, cmds))
        i += 1
    return blocks


def words(cmd: str) -> list[str]:
    """The command's words; `.venv/bin/X` (the README's opening lines, before activation) reads as X."""
    w = shlex.split(cmd, comments=True)
    return [x[len(".venv/bin/"):] if x.startswith(".venv/bin/") else x for x in w]


def parts(cmd: str) -> list[str]:
    """`a && b` runs as a, then b (the README opens with `bash scripts/bootstrap.sh && ...`)."""
    return [p.strip() for p in cmd.split(" && ")]


def hub_ids(cmd: str, cwd: Path) -> list[str]:
    """owner/name arguments that are not paths in cwd (nor under a folder that exists there)."""
    out = []
    for w in words(cmd):
        if HUB_ID.fullmatch(w) and not (cwd / w).exists() and not (cwd / w.split("/")[0]).exists():
            out.append(w)
    return out


def skip_reason(cmd: str, cwd: Path) -> str | None:
    w = words(cmd)
    if w[:3] == ["python", "-m", "pytest"]:
        return "the test suite itself (this test is part of it)"
    reasons = []
    if "torchrun" in w:
        n = int(w[w.index("--nproc_per_node") + 1]) if "--nproc_per_node" in w else 1
        if n > 2:
            reasons.append(f"needs {n} GPUs (torchrun --nproc_per_node {n})")
    if "--config" in w:
        cfg = cwd / w[w.index("--config") + 1]
        if cfg.is_file() and re.search(r'^model\s*=\s*"[\w-]+/', cfg.read_text(), re.M):
            reasons.append(f"needs the Hugging Face Hub and a GPU ({cfg.name} names a Hub model)")
    hub = hub_ids(cmd, cwd)
    if hub:
        what = "needs the Hugging Face Hub (offline here)"
        if "train" in w and "--model" in w:
            what += " and a GPU (a 0.5B fine-tune)"
        reasons.append(f"{what}: {', '.join(hub)}")
    return "; ".join(reasons) or None


def expected_codes(cmd: str) -> set[int]:
    if " ".join(words(cmd)) == "sftdoctor train --fix":  # the main job on its defaults: trains, no fail
        return {0}
    for piece, codes in EXPECTED:
        if piece in cmd:
            return codes
    return DEFAULT_EXPECTED


# ---- running it -------------------------------------------------------------------------------

def fresh_copy(tmp: Path) -> Path:
    """The files a clone would have (tracked and not ignored), ../shared beside it, .venv linked."""
    root = tmp / "clone"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # a file deleted but not yet committed is listed too
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (tmp / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    if IN_VENV:
        (root / ".venv").symlink_to(VENV, target_is_directory=True)
    return root


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("SFTDOCTOR_SHARED", None)  # the README's commands find ../shared as a user's clone does
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def bootstrap_is_noop() -> str | None:
    """scripts/bootstrap.sh is run only where it installs nothing (its stamp is current):
    this test must never install packages. Returns why not, or None."""
    stamp = VENV / ".sftdoctor-bootstrap"
    if not IN_VENV or not stamp.is_file():
        return "scripts/bootstrap.sh has not set up this virtualenv (no stamp): it would install packages"
    import hashlib

    h = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    if f"pyproject={h}" not in stamp.read_text() or f"repo={REPO}" not in stamp.read_text():
        return "pyproject.toml changed since scripts/bootstrap.sh last ran: it would reinstall"
    return None


def run_command(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    if "bootstrap.sh" in cmd:
        cwd = REPO  # the clone's .venv is this one: run it where its stamp was written
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def block_id(text: str, start: int) -> str:
    """The section a block sits in, as a test id: `-k inspect-batch` selects its block."""
    heading = next((ln for ln in reversed(text.splitlines()[:start]) if ln.startswith("#")), "top")
    named = re.search(r"`sftdoctor ([\w-]+)", heading)
    return named.group(1) if named else re.sub(r"[^a-z0-9]+", "-", heading.lstrip("#").strip().lower()).strip("-")


TEXT = README.read_text(encoding="utf-8")
BLOCKS = bash_blocks(TEXT)


@pytest.mark.slow
@pytest.mark.parametrize("start,cmds", BLOCKS, ids=[block_id(TEXT, s) for s, _ in BLOCKS])
def test_readme_block_runs_as_written(start, cmds, tmp_path):
    cwd = fresh_copy(tmp_path)
    skipped, ran = [], 0
    for cmd in [p for c in cmds for p in parts(c)]:
        why = skip_reason(cmd, cwd)
        if why is None and "bootstrap.sh" in cmd:
            why = bootstrap_is_noop()
        if why is None and cmd.startswith("source ") and not IN_VENV:
            why = "not running inside a virtualenv"
        if why:
            skipped.append(f"{cmd!r}: {why}")
            continue
        result = run_command(cmd, cwd)
        out = result.stdout + result.stderr
        want = expected_codes(cmd)
        assert result.returncode in want, f"README line ~{start}: `{cmd}` exited {result.returncode}, expected {sorted(want)}\n{out[-4000:]}"
        assert "Traceback (most recent call last)" not in out, f"`{cmd}` printed a traceback\n{out[-4000:]}"
        check_promises(cmd, cwd, result)
        ran += 1
    if skipped:
        # the commands that ran passed; say which could not run here and why
        if not ran:
            pytest.skip("; ".join(skipped))
        print("skipped: " + "; ".join(skipped))


def check_promises(cmd: str, cwd: Path, result: subprocess.CompletedProcess) -> None:
    """What the README says a command leaves behind or prints."""
    w = words(cmd)
    if "bootstrap.sh" in cmd:
        assert "nothing installed" in result.stdout, result.stdout  # idempotent: the second run installs nothing
        assert len((result.stdout + result.stderr).splitlines()) <= 5, "bootstrap is not quiet"
    if w[:2] == ["sftdoctor", "watch"] and "--json" not in w:
        assert (cwd / "sftdoctor-report.json").is_file()
        assert "report: sftdoctor-report.json" in result.stdout
    if w[:2] == ["sftdoctor", "train"] and "--help" not in w and result.returncode == 0:
        assert "what next:" in result.stdout and "sftdoctor diagnose" in result.stdout, result.stdout[-2000:]
    if "--output-dir" in w and "saved-model" in w:
        assert (cwd / "saved-model" / "config.json").is_file()
    if "--html" in w:
        assert (cwd / w[w.index("--html") + 1]).is_file()
    if w[:2] == ["sftdoctor", "train"] and "--data" in w and "--model" not in w:
        assert "cannot solve GSM8K" in result.stderr  # the tiny model on real GSM8K: said plainly


# ---- fast checks: the README names what exists ---------------------------------------------------

def test_readme_has_command_blocks_and_every_skip_is_for_a_gpu_or_the_hub(tmp_path):
    assert len(BLOCKS) >= 7
    cmds = [c for _, block in BLOCKS for c in block]
    opener = BLOCKS[0][1]
    assert len(opener) == 2 and all(c.startswith("bash scripts/bootstrap.sh && ") for c in opener), opener
    assert words(parts(opener[0])[1]) == ["sftdoctor", "train", "--fix"]  # the main job on embedded defaults
    assert words(parts(opener[1])[1])[:3] == ["python", "-m", "pytest"]  # the tests
    for c in (c for _, block in BLOCKS[1:] for c in block):
        assert not c.startswith(".venv/bin/"), "after the opening lines the README activates .venv once; commands are written bare"
        why = skip_reason(c, REPO)
        assert why is None or any(k in why for k in ("GPU", "Hub", "test suite")), (c, why)
    # each verb and the set-up are shown runnable here, not only as GPU/Hub lines
    runnable = [c for c in cmds if skip_reason(c, REPO) is None]
    for verb in ("inspect-batch", "watch", "diagnose", "train", "report", "probes"):
        assert any(f"sftdoctor {verb}" in c for c in runnable), verb


def test_every_path_the_readme_commands_name_exists_in_a_clone():
    """examples/..., scripts/..., ../shared/... arguments exist (files a command creates do not count)."""
    created = set()
    for _, block in BLOCKS:
        for c in block:
            w = words(c)
            for flag in ("--output-dir", "--json", "--html", "--save-batch"):
                if flag in w:
                    created.add(w[w.index(flag) + 1].split("/")[0])
            for arg in w:
                if arg.startswith(("examples/", "scripts/", "../shared/", "docs/")):
                    assert (REPO / arg).exists() or arg.split("/")[0] in created, f"{c}: {arg} does not exist"
                mod = re.fullmatch(r"(examples(?:\.\w+)+)(?::(\w+))?", arg)
                if mod:
                    assert (REPO / (mod.group(1).replace(".", "/") + ".py")).is_file(), f"{c}: no module {mod.group(1)}"


def test_the_file_tree_lists_what_a_clone_has():
    text = README.read_text(encoding="utf-8")
    tree = text[text.index("## Files"):text.index("## The verbs")]
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    tops = {p.split("/")[0] + ("/" if "/" in p else "") for p in listed if (REPO / p).exists()} - {".gitignore"}
    for top in tops:  # a top-level folder shows as `name/` or through a file in it (`.ci/run`)
        assert re.search(rf"^{re.escape(top)}", tree, re.M), f"{top} is in the repository but not in the README's file tree"
    # every sftdoctor module is named in the tree
    for p in listed:
        if p.startswith("sftdoctor/") and p.count("/") == 1 and p.endswith(".py") and not p.endswith("__init__.py"):
            stem = Path(p).name
            if stem in ("__main__.py",):
                continue
            assert stem in tree, f"{p} is not in the README's file tree"
    # and every file the tree names exists
    for m in re.finditer(r"^\s*([\w./-]+\.(?:py|toml|sh|md|png))\s", tree, re.M):
        name = m.group(1)
        hits = [p for p in listed if p == name or p.endswith("/" + name)]
        assert hits, f"the README's file tree names {name}, which a clone does not have"

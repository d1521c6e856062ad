"""The package's shape, checked from its source: no import cycle (lazy imports count), no guard
around an import of our own modules, the registry handed to Sessions instead of imported inside
functions, and only a Session runs probes."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"sftdoctor": REPO / "sftdoctor", "sftdoctor.probes": REPO / "probes", "sftdoctor.reports": REPO / "reports"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, ast.AST]]:
    """(module imported, node) for every import of one of our modules, at any depth (lazy ones
    inside functions too); imports only for type annotations are left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target in known:
                found.append((target, node))
            found += [(f"{target}.{a.name}", node) for a in node.names if f"{target}.{a.name}" in known]
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    out = {}
    for name, path in known.items():
        # importing a submodule runs its parent package first: that edge is Python's, not a dependency
        out[name] = {t for t, _ in imports(name, path, known) if t != name and not name.startswith(t + ".")}
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(g.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop(); on.discard(x); comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    assert cycles(graph()) == []


def test_no_import_of_our_own_modules_is_guarded():
    """`try: from .x import y / except ImportError` hides a broken module of ours as a missing feature."""
    known = modules()
    bad = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Try):
                continue
            guards = [h for h in node.handlers if h.type is not None and "ImportError" in ast.unparse(h.type)]
            if not guards:
                continue
            ours = [n for stmt in node.body for n in ast.walk(stmt)
                    if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("sftdoctor"))]
            if ours:
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert bad == []


def test_the_registry_is_handed_over_not_imported_inside_functions():
    known = modules()
    bad = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("probes") and not name.startswith("sftdoctor.probes"):
                        bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert bad == []


def test_only_a_session_runs_probes():
    known = modules()
    callers = set()
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "run_probes":
                callers.add(name)
    assert callers == {"sftdoctor.session"}


# ---- typed contracts: a misspelt name fails loudly, never skips a probe -----------------------------------

def test_every_probe_file_is_in_the_registry_and_nothing_else():
    """A new probe is its file: the registry is exactly the probe modules in probes/ (helpers start with _)."""
    from sftdoctor.probes import REGISTRY

    files = {p.stem for p in (REPO / "probes").glob("*.py") if not p.stem.startswith("_")}
    assert {p.check.__module__.rsplit(".", 1)[-1] for p in REGISTRY.probes} == files


def test_a_misspelt_need_fails_when_the_registry_loads():
    import types

    import pytest

    from sftdoctor.engine import Probe

    mod = types.ModuleType("probe_with_a_typo")
    mod.id, mod.level, mod.summary, mod.needs, mod.check = "x", "batch", "x", ("labelz",), lambda ctx: []
    with pytest.raises(ValueError, match="labelz"):
        Probe.from_module(mod)
    mod.needs = ("labels",)
    assert Probe.from_module(mod).needs == ("labels",)


def test_hints_and_context_parts_are_typed():
    import pytest

    from sftdoctor.context import Hints, ProbeContext
    from sftdoctor.errors import UserError

    assert ProbeContext(hints={"max_length": 512}).hints.max_length == 512
    with pytest.raises(UserError, match="max_lenght"):
        ProbeContext(hints={"max_lenght": 512})
    with pytest.raises(ValueError, match="logit_grad"):
        ProbeContext(observed=frozenset({"logit_grad"}))
    with pytest.raises(ValueError, match="backwards"):
        ProbeContext(why_missing={"backwards": "no"})
    with pytest.raises(AttributeError):
        Hints().max_lenght  # noqa: B018 (a probe reading a renamed hint raises: the engine records a probe error)
    assert ProbeContext(observed=frozenset({"backward"})).has("backward")
    assert not ProbeContext().has("backward") and not ProbeContext().has("examples")


def test_observers_measure_and_never_judge():
    """The step observer and the checkpoint reader know no probe, no Session and no Report."""
    g = graph()
    judging = {"sftdoctor.session", "sftdoctor.report", "sftdoctor.probes", "sftdoctor.engine", "sftdoctor.findings"}
    for observer in ("sftdoctor.observer", "sftdoctor.checkpoint"):
        assert not {d for d in g[observer] if d in judging or d.startswith("sftdoctor.probes.")}, observer

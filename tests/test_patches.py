"""sftdoctor.patches: every monkeypatch is a named entry, restored exactly, and the only one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from sftdoctor import patches
from sftdoctor.patches import ENTRIES, STEP, STEP_EVENTS, Patches

PACKAGE = Path(patches.__file__).resolve().parent
_MISSING = object()


def state(entry: str):
    """(the owner's own attribute or _MISSING, what the owner resolves the name to)."""
    e = ENTRIES[entry]
    owner = e.resolve()
    return vars(owner).get(e.attr, _MISSING), getattr(owner, e.attr)


def all_states() -> dict:
    from torch.optim import optimizer as optim

    out = {name: state(name) for name in ENTRIES}
    out["optimizer_hooks"] = (len(optim._global_optimizer_pre_hooks), len(optim._global_optimizer_post_hooks))
    return out


def same(a: dict, b: dict) -> bool:
    """Identity, not equality: a restored attribute must be the very object that was there."""
    return (all(a[k][0] is b[k][0] and a[k][1] is b[k][1] for k in ENTRIES)
            and a["optimizer_hooks"] == b["optimizer_hooks"])


def marker(original):
    def patched(*args, **kwargs):
        return original(*args, **kwargs)

    patched.original = original
    return patched


def test_every_entry_install_and_restore_puts_back_the_identical_attribute():
    before = all_states()
    p = Patches()
    for name, e in ENTRIES.items():
        original = e.original(e.resolve())
        value = p.wrap(name, marker)
        assert getattr(e.resolve(), e.attr) is value and value.original is original  # installed, wrapping it
    p.optimizer_hook("pre", lambda o, a, k: None)
    p.optimizer_hook("post", lambda o, a, k: None)
    assert not same(all_states(), before)
    p.restore()
    assert same(all_states(), before)
    p.restore()  # idempotent
    assert same(all_states(), before)


def test_inherited_attribute_is_restored_as_inherited_not_set_on_the_subclass():
    from transformers import PreTrainedModel

    assert "__call__" not in vars(PreTrainedModel)  # inherited from nn.Module
    with Patches() as p:
        value = p.wrap("model-call", marker)
        assert vars(PreTrainedModel)["__call__"] is value
        assert value.original is torch.nn.Module.__call__
    assert "__call__" not in vars(PreTrainedModel)
    assert PreTrainedModel.__call__ is torch.nn.Module.__call__


def test_own_attribute_of_a_module_is_restored():
    original = torch.save
    with Patches() as p:
        p.wrap("torch-save", marker)
        assert torch.save is not original and torch.save.original is original
    assert torch.save is original and "save" in vars(torch)


def test_nested_installs_restore_in_order_and_once():
    from torch.utils.data import DataLoader

    original = vars(DataLoader)["__iter__"]
    outer, inner = Patches(), Patches()
    first = outer.wrap("dataloader-iter", marker)
    second = inner.wrap("dataloader-iter", marker)
    assert second.original is first  # an ordinary entry wraps what is there
    inner.restore()
    assert vars(DataLoader)["__iter__"] is first
    inner.restore()  # a second restore of the inner one does not undo the outer one
    assert vars(DataLoader)["__iter__"] is first
    outer.restore()
    assert vars(DataLoader)["__iter__"] is original


def test_from_bases_entry_replaces_an_earlier_patch_instead_of_wrapping_it():
    from transformers import PreTrainedModel

    with Patches() as outer:
        outer.wrap("model-call", marker)
        with Patches() as inner:
            second = inner.wrap("model-call", marker)
            assert second.original is torch.nn.Module.__call__
        assert vars(PreTrainedModel)["__call__"] is not second
    assert "__call__" not in vars(PreTrainedModel)


def test_restore_after_an_exception_inside_the_patched_region():
    before = all_states()
    with pytest.raises(RuntimeError, match="inside"):
        with Patches() as p:
            for name in ENTRIES:
                p.wrap(name, marker)
            p.optimizer_hook("post", lambda o, a, k: None)
            raise RuntimeError("inside")
    assert same(all_states(), before)


def test_run_patched_restores_when_install_or_the_script_raises(tmp_path):
    from sftdoctor.runner import run_patched

    before = all_states()
    script = tmp_path / "boom.py"
    script.write_text("import torch\nassert torch.save.original is not None\nraise ValueError('from the script')\n")

    def install(p):
        p.wrap("torch-save", marker)
        p.wrap("model-call", marker)

    outcome = run_patched(install, str(script), [])
    assert outcome.status == "crashed" and outcome.error["type"] == "ValueError"  # the patch was live in the script
    assert same(all_states(), before)

    def broken(p):
        p.wrap("torch-save", marker)
        raise KeyError("install failed")

    with pytest.raises(KeyError):
        run_patched(broken, str(script), [])
    assert same(all_states(), before)


class _User:
    def __init__(self):
        self.events: list[str] = []

    def __getattr__(self, name):
        if name not in STEP_EVENTS:
            raise AttributeError(name)
        return lambda *args: self.events.append(name)


def test_shared_patch_is_reference_counted_and_idempotent():
    before = all_states()
    a, b = _User(), _User()
    STEP.acquire(a)
    installed = all_states()
    assert not same(installed, before)
    STEP.acquire(a)  # a second acquire by the same user: nothing changes
    STEP.acquire(b)
    assert same(all_states(), installed) and STEP.users() == [a, b]
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()
    opt = torch.optim.SGD([x], lr=0.1)
    opt.step()
    for u in (a, b):
        assert u.events == ["before_backward", "after_backward", "optimizer_step_begin", "optimizer_step_end"]
    STEP.release(a)
    assert same(all_states(), installed)  # b still holds it
    STEP.release(a)  # releasing twice: nothing
    assert same(all_states(), installed)
    STEP.release(b)
    assert same(all_states(), before) and STEP.users() == []
    (x * 2).sum().backward()
    assert a.events == b.events and len(a.events) == 4  # no user is called once restored


def test_shared_patch_install_failure_leaves_nothing_patched():
    before = all_states()

    def install(p, shared):
        p.wrap("tensor-backward", marker)
        raise RuntimeError("install failed")

    shared = patches.Shared("broken", install, "test")
    with pytest.raises(RuntimeError):
        shared.acquire(object())
    assert shared.users() == [] and same(all_states(), before)


def test_entries_are_documented_and_resolve():
    for name, e in ENTRIES.items():
        assert e.name == name and e.doc
        assert hasattr(e.resolve(), e.attr), name


# ---- no other module patches torch / transformers ------------------------------------------------

_PATCHED_PACKAGES = ("torch", "transformers")


def patch_sites(source: str) -> list[str]:
    """Where the source assigns to (or sets/deletes with setattr/delattr) an attribute of a torch or
    transformers module or of anything imported from them."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in _PATCHED_PACKAGES:
                    names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in _PATCHED_PACKAGES:
            names.update(a.asname or a.name for a in node.names)

    def root(expr) -> str | None:
        while isinstance(expr, (ast.Attribute, ast.Subscript)):
            expr = expr.value
        return expr.id if isinstance(expr, ast.Name) else None

    sites = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        while targets:
            t = targets.pop()
            if isinstance(t, (ast.Tuple, ast.List)):
                targets.extend(t.elts)
            elif isinstance(t, (ast.Attribute, ast.Subscript)) and root(t) in names:
                sites.append(f"line {node.lineno}: {ast.unparse(t)}")
        if isinstance(node, ast.Call) and node.args and root(node.args[0]) in names and (
                (isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"))
                or (isinstance(node.func, ast.Attribute) and node.func.attr in ("set", "_set"))):  # a Patches-like setter
            sites.append(f"line {node.lineno}: {ast.unparse(node)}")
    return sites


def test_patch_sites_finds_assignments_to_torch_and_transformers():
    assert patch_sites("import torch\ntorch.save = f\n")
    assert patch_sites("import torch\ntorch.Tensor.backward = f\n")
    assert patch_sites("def f():\n    from transformers import Trainer\n    setattr(Trainer, 'train', g)\n")
    assert patch_sites("import torch.utils.data as tud\ntud.DataLoader.__iter__ = f\n")
    assert patch_sites("from torch.amp import GradScaler as S\ndel S.scale\n")
    assert patch_sites("import torch\na, torch.save = 1, f\n")
    assert patch_sites("import torch.utils.data as tud\npatches.set(tud.DataLoader, '__iter__', f)\n")
    assert not patch_sites("import torch\nx = torch.zeros(3)\nx[torch.arange(2)] = 1\nobj.save = torch.save\n"
                           "setattr(cb, 'bar', None)\n")


def test_no_module_but_patches_assigns_to_torch_or_transformers_attributes():
    roots = [PACKAGE, PACKAGE.parent / "probes", PACKAGE.parent / "reports"]
    files = [f for r in roots if r.is_dir() for f in sorted(r.rglob("*.py"))]
    assert len(files) > 20
    found = {}
    for f in files:
        if f == PACKAGE / "patches.py":
            continue
        sites = patch_sites(f.read_text())
        if sites:
            found[str(f.relative_to(PACKAGE.parent))] = sites
    assert found == {}, "patch torch/transformers only through sftdoctor/patches.py"

"""The probe registry, docs/findings.md, the shared spec and the tests stay in step, and every
finding is built inside a probe (sftdoctor.probes), never by the code around it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from sftdoctor.engine import Probe
from sftdoctor.probes import ALL, FAMILIES, REGISTRY
from sftdoctor.train.preflight import REMEDIES

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO.parent / "shared" / "spec" / "findings.md"
PROBE_IDS = {i for p in ALL for i in p.ids}


def table_ids(path: Path) -> set[str]:
    """The ids in the first column of every `| id | ...` table of a findings document."""
    ids, in_table = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("| id |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table:
            m = re.match(r"\| `([a-z0-9-]+)` \|", line)
            if m:
                ids.add(m.group(1))
    return ids


def test_table_ids_reads_the_id_tables_only():
    doc = table_ids(REPO / "docs" / "findings.md")
    assert {"labels-pad-not-ignored", "weights-nonfinite", "rows-duplicated"} <= doc
    assert not {"fail", "pass", "warn", "inconclusive"} & doc  # the verdict table is not an id table


def test_every_probe_is_documented_and_every_documented_id_has_a_probe():
    doc = table_ids(REPO / "docs" / "findings.md")
    assert PROBE_IDS - doc == set(), "probe ids missing from docs/findings.md"
    assert doc - PROBE_IDS == set(), "ids in docs/findings.md that no probe emits"


@pytest.mark.skipif(not SPEC.is_file(), reason="the shared spec is not checked out next to the repository")
def test_every_spec_id_the_code_emits_is_in_the_registry():
    sources = "\n".join(p.read_text(encoding="utf-8") for d in ("sftdoctor", "probes", "reports")
                        for p in (REPO / d).rglob("*.py"))
    emitted = {i for i in table_ids(SPEC) if f'"{i}"' in sources}
    assert emitted, "no spec id found in the sources: the spec parser is broken"
    assert emitted - PROBE_IDS == set()


def test_every_probe_id_is_named_by_a_test():
    tests = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "tests").glob("*.py")
                      if p.name != Path(__file__).name)
    assert {i for i in PROBE_IDS if i not in tests} == set()


@pytest.mark.parametrize("probe", ALL, ids=lambda p: f"{p.id}@{p.level}")
def test_declarations_are_valid(probe: Probe):
    assert probe.family in FAMILIES
    assert isinstance(probe.priority, int) and 0 <= probe.priority < 100
    assert isinstance(probe.cause, str) and isinstance(probe.fix_on_warn, bool)
    assert probe.remedy is None or callable(REMEDIES.get(probe.remedy)), f"unknown remedy {probe.remedy!r}"
    assert not probe.fix_on_warn or probe.remedy is not None  # fix_on_warn names a remedy to apply
    assert not probe.cause or probe.family != "other"  # a ranked cause says which family it is


def test_probes_of_one_id_declare_the_same_facts():
    by_id: dict[str, tuple] = {}
    for p in ALL:
        facts = (p.family, p.priority, p.cause, p.remedy, p.fix_on_warn)
        assert by_id.setdefault(p.id, facts) == facts, p.id


def test_every_remedy_is_declared_by_some_probe():
    assert set(REMEDIES) == {p.remedy for p in ALL if p.remedy is not None}


def test_no_finding_is_built_outside_the_probes():
    """`Finding(` appears only in probes/ and in sftdoctor/findings.py (the class itself)."""
    pattern = re.compile(r"\bFinding\(")
    found = []
    for d in ("sftdoctor", "reports"):
        for p in (REPO / d).rglob("*.py"):
            if p == REPO / "sftdoctor" / "findings.py":
                continue
            found += [f"{p.relative_to(REPO)}:{n}" for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                      if pattern.search(line)]
    assert found == []


def test_the_tables_are_read_from_the_registry():
    """Root causes and families come from the probes' declarations, through the registry a Session is given."""
    from dataclasses import replace

    from sftdoctor.engine import Registry
    from sftdoctor.findings import Finding
    from sftdoctor.report import Report
    from sftdoctor.session import Session, root_causes
    from sftdoctor.train import preflight

    report = Report(command="test", findings=[
        Finding("labels-pad-not-ignored", "fail", "batch", "pad supervised"),
        Finding("loss-nonfinite", "fail", "step", "nan loss")])
    ranked = root_causes(report, REGISTRY)
    pad = next(p for p in ALL if p.id == "labels-pad-not-ignored")
    assert ranked[0]["id"] == "labels-pad-not-ignored" and ranked[0]["what"] == pad.cause and ranked[0]["family"] == "learned"
    assert next(r for r in ranked if r["id"] == "loss-nonfinite")["family"] == "numerical"
    # a registry whose declaration differs ranks differently: nothing is read from a table elsewhere
    changed = Registry(tuple(replace(p, priority=99) if p.id == "labels-pad-not-ignored" else p for p in ALL))
    assert root_causes(report, changed)[0]["id"] == "loss-nonfinite"
    session = Session("test", REGISTRY)
    assert session.family(report.findings[1]) == "numerical" and session.family(report.findings[0]) == "learned"
    assert preflight.remedy("labels-eos-missing") is REMEDIES["eos"] and preflight.remedy("bos-duplicated") is None

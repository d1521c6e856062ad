"""Whole-dataset inspection: `inspect-batch --batches N|all`, `--batch FOLDER`, and each aggregated
check with a broken and a healthy twin (real GPT-2 tokenizer, GSM8K rows)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import REPO, gsm8k_rows, pad_right, prompt_text, with_pad
from sftdoctor.cli import main
from sftdoctor.dataset import inspect_dataset

SCRIPTS = REPO / "tests" / "dataset_scripts"
EXAMPLES = REPO / "examples"
IGNORE = -100


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli_report(tmp_path, *argv):
    out = tmp_path / "out.json"
    code = run_cli("inspect-batch", "--no-progress", "--json", out, "-q", *argv)
    return code, json.loads(out.read_text())


def by_id(report):
    return {f["id"]: f for f in report["findings"]}


# ---- the done-when test: a clean first batch, 3% truncated answers and 1% unsupervised rows later ----

def test_script_batches_all_names_both_with_exact_counts(tmp_path):
    out = tmp_path / "out.json"
    # the spelling: sftdoctor's options after the script once --batches is there
    code = run_cli("inspect-batch", SCRIPTS / "raw_loop.py", "--batches", "all", "--json", out, "--no-progress", "-q")
    report = json.loads(out.read_text())
    f = by_id(report)
    trunc, empty = f["truncation-answer-lost"], f["labels-no-supervised-tokens"]
    assert (trunc["level"], trunc["evidence"]["rows_affected"], trunc["evidence"]["rows_total"]) == ("dataset", 12, 400)
    assert (empty["level"], empty["evidence"]["rows_affected"]) == ("dataset", 4)
    assert {e["row"] for e in trunc["evidence"]["examples"]} <= {r + h for h in range(0, 400, 100) for r in (20, 50, 80)}
    assert [e["row"] for e in empty["evidence"]["examples"]] and all(e["row"] % 100 == 60 for e in empty["evidence"]["examples"])
    assert trunc["severity"] == "fail" and "12 of 400 rows (3.0%)" in trunc["message"]
    assert report["run"]["rows_checked"] == 400 and not report["run"]["partial"]
    assert code == 1
    assert report["metrics"]["dataset"]["rows_no_supervised"] == 4
    assert report["samples"] and report["samples"][0]["finding"] == "truncation-answer-lost"


def test_first_batch_alone_misses_them(tmp_path):
    code, report = cli_report(tmp_path, "--batches", "1", SCRIPTS / "raw_loop.py")
    assert report["findings"] == [] and report["run"]["rows_checked"] == 8


def test_healthy_twin_script_is_clean(tmp_path):
    code, report = cli_report(tmp_path, "--batches", "all", SCRIPTS / "raw_loop.py", "--healthy")
    assert code == 0 and report["findings"] == [] and report["run"]["rows_checked"] == 400


# ---- bad input ---------------------------------------------------------------------------------------

def test_collator_raising_on_row_k_names_it(tmp_path, capsys):
    code, report = cli_report(tmp_path, "--batches", "all", SCRIPTS / "raw_loop.py", "--raise-on-row", "83")
    err = capsys.readouterr().err
    assert code == 2 and "row 83" in err and "Traceback" not in err
    assert report["run"]["partial"] and report["run"]["error"]["row"] == 83 and report["run"]["rows_checked"] == 80


def test_infinite_iterable_with_all_stops_at_the_cap(tmp_path, capsys):
    from sftdoctor.draw import inspect_script_dataset

    report = inspect_script_dataset(str(SCRIPTS / "raw_loop.py"), ["--infinite"], batches=None, progress=False, all_cap=6)
    assert report.run["rows_checked"] == 48 and report.run["partial"] and "no length" in report.run["cap"]


def test_script_without_a_dataloader_is_one_line(tmp_path, capsys):
    script = tmp_path / "no_loader.py"
    script.write_text(
        "import torch\nfrom sftdoctor.tiny import tiny_model\nm = tiny_model('gpt2', 64)\n"
        "m(input_ids=torch.ones(1, 4, dtype=torch.long))\n")
    assert run_cli("inspect-batch", "--batches", "all", script) == 2
    err = capsys.readouterr().err
    assert "DataLoader" in err and "Traceback" not in err


def test_malformed_batches_are_counted_not_a_traceback():
    tok = with_pad("gpt2")
    good = healthy_batches(tok, 8)
    bad = dict(good[0], labels=good[0]["labels"][:, :-1])  # labels narrower than input_ids
    report = inspect_dataset([good[0], bad, good[1]], tok)
    assert report.metrics["dataset"]["bad_batches"] == 1 and report.metrics["dataset"]["rows"] == 8
    assert "labels" in report.metrics["dataset"]["bad_batch_reasons"][0]


# ---- each aggregated check: broken and healthy twins (API) ----------------------------------------------

def feats(tok, n, *, truncate=(), empty=(), no_eos=(), max_length=None):
    out = []
    for i, r in enumerate(gsm8k_rows("train", n)):
        p = tok(prompt_text(r["question"]))["input_ids"]
        a = tok(" " + r["answer"])["input_ids"] + ([] if i in no_eos else [tok.eos_token_id])
        ids, lab = p + a, [IGNORE] * len(p) + a
        if i in truncate:
            ids, lab = ids[:len(p) + 5], lab[:len(p) + 5]
        if i in empty:
            lab = [IGNORE] * len(ids)
        out.append((ids, lab))
    return out


def batches_of(tok, fs, size=4):
    return [pad_right(tok.pad_token_id, fs[i:i + size]) for i in range(0, len(fs), size)]


def healthy_batches(tok, n=16):
    return batches_of(tok, feats(tok, n))


@pytest.fixture(scope="module")
def tok():
    return with_pad("gpt2")


def test_truncation_twins(tok):
    fs = feats(tok, 32, truncate={9, 22})
    limit = max(len(i) for i, _ in fs)
    for k in (9, 22):  # cut rows fill the max_length exactly
        ids, lab = fs[k]
        fs[k] = (ids + [ids[-1]] * (limit - len(ids)), lab + lab[-1:] * (limit - len(lab)))
    broken = inspect_dataset(batches_of(tok, fs), tok, hints={"max_length": limit}).get("truncation-answer-lost")
    assert broken.level == "dataset" and broken.evidence["rows_affected"] == 2 and broken.evidence["rows_total"] == 32
    assert broken.severity == "fail" and f"at max_length {limit}" in broken.message
    healthy = inspect_dataset(healthy_batches(tok, 32), tok, hints={"max_length": 4096})
    assert healthy.get("truncation-answer-lost") is None


def test_no_supervised_twins(tok):
    report = inspect_dataset(batches_of(tok, feats(tok, 40, empty={5, 17, 33})), tok)
    f = report.get("labels-no-supervised-tokens")
    assert f.evidence["rows_affected"] == 3 and f.severity == "fail"  # 7.5% >= 5%
    assert sorted(e["row"] for e in f.evidence["examples"]) == [5, 17, 33]
    assert inspect_dataset(healthy_batches(tok, 40), tok).get("labels-no-supervised-tokens") is None


def test_eos_missing_rate_decides_severity(tok):
    hints = {"max_length": 4096}  # no row reaches it: a missing EOS is not truncation
    many = inspect_dataset(batches_of(tok, feats(tok, 40, no_eos={3, 30})), tok, hints=hints).get("labels-eos-missing")
    assert many.evidence["rows_affected"] == 2 and many.severity == "fail"
    assert inspect_dataset(healthy_batches(tok, 40), tok).get("labels-eos-missing") is None


def test_token_id_out_of_range_one_row_fails(tok):
    bs = healthy_batches(tok, 16)
    bs[3] = dict(bs[3], input_ids=bs[3]["input_ids"].clone())
    bs[3]["input_ids"][2, 1] = 10 ** 6
    f = inspect_dataset(bs, tok, model=_config(len(tok))).get("token-id-out-of-range")
    assert f.severity == "fail" and f.evidence["rows_affected"] == 1 and f.evidence["examples"][0]["row"] == 14
    assert inspect_dataset(healthy_batches(tok, 16), tok, model=_config(len(tok))).get("token-id-out-of-range") is None


def test_pad_not_ignored_twins(tok):
    bs = healthy_batches(tok, 16)
    b = bs[2]
    labels = b["labels"].clone()
    labels[b["attention_mask"] == 0] = 0
    bs[2] = dict(b, labels=labels)
    f = inspect_dataset(bs, tok).get("labels-pad-not-ignored")
    assert f.severity == "fail" and f.level == "dataset" and f.evidence["rows_affected"] >= 1
    assert inspect_dataset(healthy_batches(tok, 16), tok).get("labels-pad-not-ignored") is None


def test_duplicate_rows_twins(tok):
    fs = feats(tok, 24)
    fs[20] = fs[3]  # the same row twice, in another batch (and padded to another width)
    fs[21] = fs[3]
    f = inspect_dataset(batches_of(tok, fs), tok).get("rows-duplicated")
    assert f.evidence["rows_affected"] == 2 and f.evidence["examples"][0]["rows"] == [3, 20, 21]
    assert f.severity == "warn"
    assert inspect_dataset(healthy_batches(tok, 24), tok).get("rows-duplicated") is None


def test_row_statistics(tok):
    report = inspect_dataset(healthy_batches(tok, 16), tok)
    d = report.metrics["dataset"]
    fs = feats(tok, 16)
    assert d["rows"] == 16 and d["length"]["max"] == max(len(i) for i, _ in fs)
    assert d["rows_with_supervised_eos"] == 16 and 0 < d["pad_share"]["mean"] < 1
    assert sum(d["length_histogram"]["counts"]) == 16


def _config(vocab):
    from sftdoctor.tiny import tiny_config

    return tiny_config("gpt2", vocab)


# ---- a folder of saved batches, Trainer and TRL scripts ---------------------------------------------------

def test_folder_of_saved_batches(tmp_path, tok):
    folder = tmp_path / "batches"
    folder.mkdir()
    for i, b in enumerate(batches_of(tok, feats(tok, 24, empty={13}))):
        torch.save(b, folder / f"batch_{i}.pt")
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    code, report = cli_report(tmp_path, "--batch", folder, "--tokenizer", tok_dir)
    f = by_id(report)["labels-no-supervised-tokens"]
    assert f["evidence"]["rows_affected"] == 1 and f["evidence"]["examples"][0]["row"] == 13
    assert report["run"]["rows_checked"] == 24


@pytest.mark.slow
def test_hf_trainer_script_is_clean(tmp_path):
    code, report = cli_report(tmp_path, "--batches", "all", EXAMPLES / "good_trainer.py")
    assert report["run"]["rows_checked"] == 64 and "Trainer" in report["run"]["source"]
    assert not [f for f in report["findings"] if f["severity"] == "fail"]


@pytest.mark.slow
def test_trl_sft_trainer_script_every_row_unsupervised(tmp_path):
    code, report = cli_report(tmp_path, "--batches", "all", EXAMPLES / "trl_template_mismatch.py")
    f = by_id(report)["labels-no-supervised-tokens"]
    assert f["evidence"]["rows_affected"] == f["evidence"]["rows_total"] == 64 and f["severity"] == "fail"
    assert code == 1 and "SFTTrainer" in report["run"]["source"]
    assert "train" not in sys.modules.get("__main__").__dict__.get("__file__", "")  # the script was unwound


def test_vectorised_pad_mask_matches_the_row_by_row_rules():
    import random

    from sftdoctor.context import Batch, TokenizerInfo
    from sftdoctor.tokens import _pad_mask_rows, pad_mask

    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(600):
        B, T = rng.randint(1, 4), rng.randint(1, 8)
        ids = torch.randint(0, 4, (B, T), generator=g)
        am = torch.randint(0, 2, (B, T), generator=g) if rng.random() < 0.5 else None
        if am is None and rng.random() < 0.6:  # realistic masks: zeros at the edges
            am = torch.ones(B, T, dtype=torch.long)
            for b in range(B):
                am[b, T - rng.randint(0, T):] = 0
                if rng.random() < 0.3:
                    am[b, :rng.randint(0, T)] = 0
        tok = TokenizerInfo(pad_id=rng.choice([None, 0, 1]), eos_ids=frozenset(rng.choice([(), (0,), (1,), (2,)])))
        batch = Batch(input_ids=ids, attention_mask=am)
        for t in (tok, None):
            assert torch.equal(pad_mask(batch, t), _pad_mask_rows(batch, t)), (ids, am, t)


# ---- watch: the cheap checks on every batch ------------------------------------------------------------

@pytest.mark.parametrize("healthy", [False, True])
def test_watch_names_a_bug_in_a_later_batch(tmp_path, healthy):
    out = tmp_path / "w.json"
    args = ["--healthy"] if healthy else []
    code = run_cli("watch", "--json", out, SCRIPTS / "late_bug_loop.py", *args)
    report = json.loads(out.read_text())
    f = by_id(report).get("labels-pad-not-ignored")
    assert report["metrics"]["dataset"]["batches"] == 6 and not report["run"].get("internal_errors")
    if healthy:
        assert f is None and code == 0
    else:
        assert f["level"] == "dataset" and f["evidence"]["first_batch"]["batch"] == 4 and code == 1
        assert {e["row"] for e in f["evidence"]["examples"]} <= {16, 17, 18, 19}


# ---- renderers: console summary and the HTML section, from the JSON round trip ----------------------------

def test_console_and_html_from_saved_json(tmp_path, tok):
    from rich.console import Console

    from sftdoctor.report import Report
    from sftdoctor.reports.console import render
    from sftdoctor.reports.html import render_html

    report = inspect_dataset(batches_of(tok, feats(tok, 24, empty={13})), tok)
    path = tmp_path / "r.json"
    report.save(path)
    again = Report.load(path)
    console = Console(record=True, width=120)
    render(again, console)
    text = console.export_text()
    assert "24 rows checked in 6 batches" in text
    assert "supervised tokens per row" in text and "findings by rate" in text and "worst row of labels-no-supervised-tokens" in text
    page = render_html(again)
    assert 'id="dataset"' in page and page.count("data:image/png;base64,") >= 2
    assert 'href="#sample-13"' in page and "1 of 24" in page


def test_partial_report_says_so(tok):
    from sftdoctor.dataset import DatasetInspector
    from sftdoctor.draw import Source, check_source

    rows = feats(tok, 40)

    class Interrupting(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            if i == 17:
                raise KeyboardInterrupt  # what Ctrl-C raises in the middle of drawing
            return rows[i]

    inspector = DatasetInspector(tok)
    check_source(Source("test", Interrupting(), lambda items: pad_right(tok.pad_token_id, items), 4), None, inspector,
                 progress=False)
    report = inspector.report()
    assert report.run["partial"] and report.run["coverage"] == "interrupted" and report.run["rows_checked"] == 16
    from sftdoctor.reports.dataset_view import coverage_line

    assert coverage_line(report).startswith("PARTIAL: 16 of 40 rows checked")


def test_speed_line_says_only_what_the_rows_measure():
    """inspect-batch draws rows as fast as it can (rows/s overall means something); under watch the
    rows come at training speed, so only the checks' own speed is shown."""
    from sftdoctor.report import Report
    from sftdoctor.reports.dataset_view import summary_rows

    dataset = {"rows": 400, "batches": 50, "rows_per_s": 0.4, "check_rows_per_s": 9000.0}
    speed = {cmd: dict(summary_rows(Report(command=cmd, metrics={"dataset": dict(dataset)}))).get("speed")
             for cmd in ("watch", "inspect-batch")}
    assert speed["watch"] == "checks alone 9,000 rows/s"
    assert speed["inspect-batch"].startswith("0 rows/s overall") and "9,000" in speed["inspect-batch"]

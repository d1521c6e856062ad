"""The self-contained HTML report: content, safety (escaping, CSP, no network), size, structure.

Browser tests drive Debian's chromium through playwright (never a downloaded browser). They skip
when chromium or playwright is missing, unless SFTDOCTOR_REQUIRE_BROWSER=1 (CI), where they fail.

Gold outlines (tests/gold/*.outline) hold the page structure: section ids, headings, finding ids,
table headers. After an intended change of the page's structure, refresh them with
    SFTDOCTOR_UPDATE_GOLD=1 pytest tests/test_html.py -k gold
and review the diff.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

import html_fixtures as fx
from sftdoctor.cli import main
from sftdoctor.report import Report
from sftdoctor.reports.html import MAX_ROW_TOKENS, render_html, write_html

GOLD = Path(__file__).parent / "gold"
SIZE_LIMIT = 5 * 1024 * 1024


# ---- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def incident():
    return fx.incident_report()


@pytest.fixture(scope="module")
def incident_page(incident, tmp_path_factory):
    path = tmp_path_factory.mktemp("html") / "incident.html"
    write_html(incident, path)
    return path


@pytest.fixture(scope="module")
def browser():
    reason = None
    if fx.chromium_path() is None:
        reason = "chromium is not installed (apt-get install chromium; scripts/bootstrap.sh does it)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright is not installed (pip install -e '.[test]')"
    if reason:
        if os.environ.get("SFTDOCTOR_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SFTDOCTOR_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = fx.launch(pw)
        yield b
        b.close()


def assert_quiet(page, events, url):
    """The page loaded nothing but itself and logged no error, CSP violations included."""
    violations = page.evaluate("window.__cspViolations || []")
    assert set(events.requests) == {url}, events.requests
    assert events.console_errors == [], events.console_errors
    assert events.page_errors == [], events.page_errors
    assert violations == [] and events.csp_violations == [], violations


# ---- browser: the incident batch ----------------------------------------------------------
@pytest.mark.browser
def test_incident_report_renders_and_shows_supervised_pad(browser, incident, incident_page):
    page, events = fx.load(browser, incident_page)
    try:
        assert "FAIL" in page.inner_text("#verdict")
        cause = page.locator("#causes [data-finding='labels-pad-not-ignored']")
        assert cause.count() == 1 and "learned" in cause.inner_text()
        assert page.locator("#findings article[data-finding='labels-pad-not-ignored'] .evidence table").count() >= 1

        # every supervised pad token of the samples is in the DOM (folded ones included)
        expected = sum(1 for row in incident.samples[:8] for c, lab in zip(row["classes"], row["labels"])
                       if c == 3 and lab != -100)
        assert expected > 0
        assert page.locator("#tokens .tokens .t.c3.sup").count() == expected
        assert page.locator("#tokens .tokens .t.c3.sup.odd").count() == expected  # label 0 != pad id
        visible = page.locator("#tokens .tokens .t.c3.sup:visible")
        assert 0 < visible.count() < expected  # the long runs are folded

        # unfolding a run shows its tokens
        fold = page.locator("#tokens label.run").first
        hidden_tokens = page.locator("#tokens .folded").first.locator(".t")
        assert not hidden_tokens.first.is_visible()
        fold.click()
        assert hidden_tokens.first.is_visible()

        # hovering a supervised pad token shows its id and label
        visible.first.hover()
        tip = page.locator("#tip")
        assert tip.is_visible()
        text = tip.inner_text()
        assert f"token id: {incident.samples[0]['ids'][-1]}" in text and "label: 0" in text
        assert "class: pad" in text
        assert_quiet(page, events, Path(incident_page).resolve().as_uri())
    finally:
        page.close()


@pytest.mark.browser
def test_hostile_row_runs_nothing_and_shows_the_text(browser, tmp_path):
    path = tmp_path / "hostile.html"
    write_html(fx.hostile_report(), path)
    page, events = fx.load(browser, path)
    try:
        page.locator(".t[data-id]").first.hover()  # the inspector script runs on hostile tokens too
        assert page.evaluate("typeof window.pwned") == "undefined"
        body = page.inner_text("body")
        assert fx.HOSTILE_SCRIPT in body and fx.HOSTILE_IMG in body
        assert page.evaluate("document.querySelectorAll('img:not([src^=\"data:\"])').length") == 0
        assert page.evaluate("document.scripts.length") == 1
        assert_quiet(page, events, path.resolve().as_uri())
    finally:
        page.close()


@pytest.mark.browser
def test_full_report_plots_load_without_errors(browser, tmp_path):
    path = tmp_path / "full.html"
    write_html(fx.synthetic_report(steps=300, layers=24), path)
    page, events = fx.load(browser, path)
    try:
        widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == 3 and all(w > 300 for w in widths), widths
        for section in ("causes", "run", "findings", "tokens", "classes", "steps", "activations", "predictions",
                        "checks", "environment"):
            assert page.locator(f"section#{section}").count() == 1, section
        # ranked: the learned and numerical causes come before the symptom
        ranked = page.eval_on_selector_all("#causes li", "els => els.map(e => e.dataset.finding)")
        assert ranked[-1] == "prediction-collapse" and set(ranked[:2]) == {"labels-pad-not-ignored", "precision-overflow"}
        assert_quiet(page, events, path.resolve().as_uri())
    finally:
        page.close()


@pytest.mark.browser
def test_screenshot_is_not_blank(browser, incident_page):
    from PIL import Image, ImageStat

    page, _ = fx.load(browser, incident_page, width=1200, height=900)
    try:
        png = page.screenshot()
    finally:
        page.close()
    img = Image.open(io.BytesIO(png)).convert("L")
    pixels = list(img.getdata())
    non_white = sum(1 for p in pixels if p < 235) / len(pixels)
    assert non_white > 0.08, non_white  # the red verdict banner alone is ~10% of the view
    assert ImageStat.Stat(img).stddev[0] > 20


@pytest.mark.browser
def test_harness_sees_requests_and_csp_violations(browser, tmp_path):
    """The quiet-page assertions can fail: a page that breaks the rules is caught."""
    path = tmp_path / "bad.html"
    path.write_text("<!DOCTYPE html><html><head><meta http-equiv='Content-Security-Policy' "
                    "content=\"default-src 'none'\"></head><body><p style='color:red'>x</p>"
                    "<img src='https://example.invalid/x.png'></body></html>")
    page, events = fx.load(browser, path)
    try:
        with pytest.raises(AssertionError):
            assert_quiet(page, events, path.resolve().as_uri())
        assert events.console_errors  # the refused inline style
    finally:
        page.close()


# ---- static: escaping, CSP, size ------------------------------------------------------------
def _csp(page: str) -> dict[str, list[str]]:
    m = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert m, "no CSP meta tag"
    out = {}
    for part in html.unescape(m.group(1)).split(";"):
        name, *values = part.split()
        out[name] = values
    return out


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_csp_allows_only_the_hashed_style_and_script(incident):
    page = render_html(incident)
    csp = _csp(page)
    assert csp["default-src"] == ["'none'"] and csp["img-src"] == ["data:"]
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(styles) == 1 and len(scripts) == 1
    assert csp["style-src"] == [_sha(styles[0])] and csp["script-src"] == [_sha(scripts[0])]
    assert " style=" not in page  # inline style attributes would be refused by the CSP
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing to fetch
    assert "http://" not in page and "https://" not in page


def test_hostile_text_is_escaped_everywhere():
    page = render_html(fx.hostile_report())
    assert fx.HOSTILE_SCRIPT not in page and "<img src=x" not in page
    assert page.count("<script") == 1
    assert html.escape(fx.HOSTILE_SCRIPT, quote=False) in page
    assert "onerror=" not in page.replace("onerror=&#34;", "").replace('onerror=&quot;', "")


def test_size_of_2000_steps_24_layers_under_5mb(tmp_path):
    report = fx.synthetic_report(steps=2000, layers=24)
    assert len(report.metrics["steps"]) == 2000 and len(report.metrics["activations"]) >= 24 * 7
    path = tmp_path / "big.html"
    write_html(report, path)
    size = path.stat().st_size
    assert size < SIZE_LIMIT, f"{size / 1e6:.1f} MB"
    assert len(report.to_json()) > size / 4  # the page is not tiny because data went missing


def test_token_view_keeps_every_token_of_a_long_row(incident):
    page = render_html(incident)
    row = incident.samples[0]
    section = page.split('id="sample-0"', 1)[1].split('class="sample"', 1)[0]
    assert section.count('<span class="t ') == min(len(row["ids"]), MAX_ROW_TOKENS)
    assert 'class="unfold"' in section  # the pad run is folded, not dropped


def test_renders_whatever_keys_exist():
    """Every key is optional and other producers fill them: odd shapes must not break the page."""
    empty = render_html(Report(command="inspect-batch"))
    assert "INCONCLUSIVE" in empty and 'id="findings"' in empty and 'id="tokens"' not in empty  # nothing checked
    odd = Report(command="watch", metrics={
        "steps": [{"step": 0}, {"step": 1, "loss": "nan", "grad_norm": None, "by_class": None},
                  {"step": "x", "loss": 1.0, "grad_norm": "inf", "by_class": {"pad": {"grad_norm": "nan"}}}],
        "activations": [{"module": "m", "max_abs": "inf", "finite": False}, "junk", {"max_abs": 3}],
        "argmax_histogram": [{"token_id": 0, "share": "0.5"}, 7],
        "token_classes": {"pad": {"tokens": 0}},
        "fp16_forecast": [1, 2],
    }, samples=[{"ids": [1, 2, 3], "texts": ["a"], "classes": [9]}, {"ids": []}],
        run={"status": "interrupted", "error": "KeyboardInterrupt"}, environment={"argv": "python t.py"})
    page = render_html(odd)
    assert "interrupted" in page and "KeyboardInterrupt" in page and "python t.py" in page


def test_rerender_from_json_matches(tmp_path):
    report = fx.synthetic_report(steps=120, layers=4)
    report.save(tmp_path / "run.json")
    again = Report.load(tmp_path / "run.json")
    assert render_html(again) == render_html(report)  # everything shown comes from the JSON


# ---- CLI ----------------------------------------------------------------------------------
def test_cli_report_writes_html(tmp_path, capsys, incident):
    incident.save(tmp_path / "run.json")
    out = tmp_path / "out.html"
    rc = main(["report", str(tmp_path / "run.json"), "--html", str(out), "--quiet"])
    assert rc == 1  # the incident has a fail finding
    page = out.read_text(encoding="utf-8")
    assert 'data-finding="labels-pad-not-ignored"' in page and "<title>sftdoctor inspect-batch: fail</title>" in page
    assert not list(tmp_path.glob(".out.html.*"))  # no temporary file left behind


@pytest.mark.parametrize("case", ["missing", "not-json", "not-a-report", "bad-html-folder"])
def test_cli_report_bad_input_is_one_line_exit_2(tmp_path, capsys, case, incident):
    good = tmp_path / "run.json"
    incident.save(good)
    args = {
        "missing": [str(tmp_path / "nope.json"), "--html", str(tmp_path / "o.html")],
        "not-json": [str(_write(tmp_path / "bad.json", "{not json")), "--html", str(tmp_path / "o.html")],
        "not-a-report": [str(_write(tmp_path / "other.json", json.dumps({"a": 1}))), "--html", str(tmp_path / "o.html")],
        "bad-html-folder": [str(good), "--html", str(tmp_path / "no" / "such" / "o.html"), "--quiet"],
    }[case]
    capsys.readouterr()
    rc = main(["report", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("sftdoctor: error: "), err
    assert not (tmp_path / "o.html").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- gold outlines ------------------------------------------------------------------------
class _Outline(HTMLParser):
    """Section ids, headings, finding/check ids and table headers, in page order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.capture: str | None = None
        self.buf = ""
        self.thead = False
        self.row: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.lines.append(f"section#{a.get('id', '')}")
        if tag == "article" and "data-finding" in a:
            self.lines.append(f"  finding {a['data-finding']} {a.get('class', '')}")
        if tag == "li" and "data-finding" in a:
            self.lines.append(f"  cause {a['data-finding']} {a.get('class', '')}")
        if tag == "tr" and "data-check" in a:
            self.lines.append(f"  check {a['data-check']}")
        if tag == "img":
            self.lines.append(f"  img {a.get('alt', '')}")
        if tag == "thead":
            self.thead, self.row = True, []
        if tag in ("h1", "h2", "h3", "h4") or (tag == "th" and self.thead):
            self.capture, self.buf = tag, ""

    def handle_endtag(self, tag):
        if tag == self.capture:
            text = re.sub(r"\d+", "#", " ".join(self.buf.split()))
            if tag == "th":
                self.row.append(text)
            else:
                self.lines.append(f"  {tag} {text}")
            self.capture = None
        if tag == "thead":
            self.lines.append("  table: " + " | ".join(self.row))
            self.thead = False

    def handle_data(self, data):
        if self.capture:
            self.buf += data


def outline(page: str) -> str:
    p = _Outline()
    p.feed(page)
    return "\n".join(p.lines) + "\n"


def _text(page: str) -> str:
    body = re.sub(r"<(style|script)>.*?</\1>", "", page, flags=re.S)
    body = re.sub(r'src="data:[^"]*"', "", body)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


@pytest.mark.parametrize("name", ["full", "empty"])
def test_gold_outline(name):
    report = {
        "full": lambda: fx.synthetic_report(steps=60, layers=4),
        "empty": lambda: Report(command="inspect-batch"),
    }[name]()
    got = outline(render_html(report))
    gold = GOLD / f"{name}.outline"
    if os.environ.get("SFTDOCTOR_UPDATE_GOLD") == "1":
        gold.parent.mkdir(exist_ok=True)
        gold.write_text(got, encoding="utf-8")
    assert gold.exists(), f"{gold} missing: run SFTDOCTOR_UPDATE_GOLD=1 pytest tests/test_html.py -k gold"
    assert got == gold.read_text(encoding="utf-8"), f"page structure changed; if intended, refresh {gold}"

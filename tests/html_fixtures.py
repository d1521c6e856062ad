"""Reports for the HTML tests: the incident batch (real qwen2.5 tokenizer, real GSM8K rows, real
probes), a hostile one, and a synthetic "everything" report shaped like what watch/train write
(2,000 steps, a 24-layer model) for the size and structure tests.

Also a small command line to refresh docs/report-screenshot.png:
    python tests/html_fixtures.py --screenshot docs/report-screenshot.png
"""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import gsm8k_rows, prompt_text, tokenizer  # noqa: E402

import sftdoctor  # noqa: E402
from sftdoctor.findings import CheckResult, Finding  # noqa: E402
from sftdoctor.report import Report  # noqa: E402

HOSTILE_SCRIPT = "<script>window.pwned=1</script>"
HOSTILE_IMG = '<img src=x onerror="window.pwned=1">'
HOSTILE = f"{HOSTILE_SCRIPT} and {HOSTILE_IMG} </style></textarea>\" ' & {{{{7*7}}}}"
FIXED_ENV = {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.24.0", "sftdoctor": "0.1.0",
             "device": "cpu", "dtype": "float16", "argv": ["train.py", "--fp16", "--out", "runs/a b"]}
SEQ_LEN = 640  # padded length of the incident batch: long pad runs that the view must fold


def incident_batch(rows=None, seq_len: int = SEQ_LEN):
    """The motivating hand-written loop: answers + EOS supervised, prompt -100, but labels padded
    with 0 (not -100) and the loss mask passed as attention_mask."""
    tok = tokenizer("qwen2.5")
    rows = rows if rows is not None else gsm8k_rows("train", 4)
    B = len(rows)
    input_ids = torch.full((B, seq_len), tok.pad_token_id, dtype=torch.long)
    labels = torch.zeros((B, seq_len), dtype=torch.long)  # the bug: pad labels are 0 (`!`)
    loss_mask = torch.zeros((B, seq_len), dtype=torch.long)
    for b, r in enumerate(rows):
        p = tok(prompt_text(r["question"]))["input_ids"]
        a = tok(" " + r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p + a)[:seq_len]
        n_prompt = min(len(p), len(ids))
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, :n_prompt] = -100
        labels[b, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
        loss_mask[b, n_prompt: len(ids)] = 1
    # the second bug: the loss mask is given as the attention mask
    return {"input_ids": input_ids, "attention_mask": loss_mask, "labels": labels}, tok


def incident_report(with_steps: bool = False) -> Report:
    batch, tok = incident_batch()
    report = sftdoctor.inspect_batch(batch, tok)
    report.environment = dict(FIXED_ENV)
    if with_steps:
        report.metrics.update(synthetic_metrics(steps=300, layers=24, vocab_text={0: "!"}))
    return report


def hostile_report() -> Report:
    """A report whose dataset row, messages, paths and token texts all carry markup."""
    row = {"question": f"What does {HOSTILE} print?", "answer": f"It prints {HOSTILE_SCRIPT}.\n#### 0"}
    batch, tok = incident_batch([row, gsm8k_rows("train", 1)[0]], seq_len=96)
    report = sftdoctor.inspect_batch(batch, tok)
    report.add([Finding("template-mismatch", "warn", "batch", f"row 0 starts with {HOSTILE}",
                        {"first_text": HOSTILE, "rows": [{"text": HOSTILE, HOSTILE: 1}]}, fix=f"see {HOSTILE}")])
    report.record_checks([CheckResult(HOSTILE, "skipped", reason=HOSTILE)])
    # a token whose whole text is markup, as a tokenizer with odd added tokens would give
    report.samples[0]["texts"][1] = HOSTILE_SCRIPT
    report.samples[0]["texts"][2] = HOSTILE_IMG
    report.metrics["argmax_histogram"] = [{"token_id": 0, "text": HOSTILE_SCRIPT, "share": 0.9}]
    report.metrics[HOSTILE] = {HOSTILE: HOSTILE}
    report.run = {"status": "crashed", "exit_code": 1,
                  "error": {"type": "ValueError", "message": HOSTILE, "where": f"/data/{HOSTILE}.py:3"}}
    report.environment = dict(FIXED_ENV, argv=["train.py", HOSTILE])
    return finished(report)  # a finding was added after inspect_batch: rank the causes again


def synthetic_metrics(steps: int = 2000, layers: int = 24, vocab_text: dict | None = None, seed: int = 0) -> dict:
    """Per-step records, per-module activations and the rest, shaped like watch/train write them:
    an fp16 run whose loss looks fine while activations in the last layers creep to the limit."""
    rng = random.Random(seed)
    step_records = []
    scale = 65536.0
    for s in range(steps):
        loss = 2.4 * math.exp(-s / 400) + 0.35 + rng.gauss(0, 0.04)
        grad = 1.2 * math.exp(-s / 800) + 0.2 + abs(rng.gauss(0, 0.08))
        if s > steps * 0.8 and s % 97 == 0:
            grad, scale = float("inf"), scale / 2  # overflowing steps: skipped, scale halves
        by_class = {c: {"tokens": n, "logit_norm": 40 + rng.random(), "entropy": 3 * rng.random(),
                        "loss": loss * f, "grad_norm": g * (1 + 0.2 * rng.random())}
                    for c, n, f, g in (("prompt", 180, 1.3, 1e-9), ("response", 120, 1.0, 0.4),
                                       ("eos", 4, 0.8, 0.05), ("pad", 336, 0.2, 0.25))}
        step_records.append({"step": s, "optimizer_step": s // 4, "loss": loss, "grad_norm": grad,
                             "loss_scale": scale, "lr": 2e-5 * min(1.0, s / 100), "supervised_tokens": 460,
                             "by_class": by_class})
    step_records[steps // 2]["loss"] = float("nan")
    activations = []
    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for probe_step in range(0, steps, max(1, steps // 4)):
        for layer in range(layers):
            for m in modules:
                grow = 10 ** (1 + 3.6 * layer / max(1, layers - 1)) * (1.6 if m == "mlp.down_proj" else 0.4)
                value = grow * (1 + 0.1 * rng.random())
                finite = not (layer == layers - 1 and m == "mlp.down_proj" and probe_step > 0)
                activations.append({"module": f"model.layers.{layer}.{m}", "max_abs": value if finite else float("inf"),
                                    "dtype": "float16", "limit": 65504.0, "finite": finite, "phase": "forward",
                                    "step": probe_step})
    text = vocab_text or {}
    return {
        "steps": step_records,
        "activations": activations,
        "fp16_forecast": {"first_overflow_module": f"model.layers.{layers - 1}.mlp.down_proj",
                          "headroom": 1.3, "safe": False},
        "argmax_histogram": [{"token_id": 0, "text": text.get(0, "!"), "share": 0.62},
                             {"token_id": 13, "text": ".", "share": 0.08},
                             {"token_id": 220, "text": " ", "share": 0.05}],
    }


def synthetic_report(steps: int = 2000, layers: int = 24, hostile: bool = False) -> Report:
    """Every section of the page filled, deterministically (the gold and size tests)."""
    r = Report(command="watch")
    r.add([
        Finding("labels-pad-not-ignored", "fail", "batch", "412 of 430 padding positions are supervised",
                {"supervised_pad_positions": 412, "pad_positions": 430, "share_of_supervised": 0.47,
                 "label_values": [{"id": 0, "text": "!", "count": 412}], "rows": [0, 1, 2, 3]},
                fix="set labels to -100 wherever attention_mask == 0", step=0),
        Finding("prediction-collapse", "fail", "step", "62% of positions predict id 0 '!'",
                {"token_id": 0, "text": "!", "share": 0.62, "logits_finite": True}, fix="fix the labels", step=1200),
        Finding("precision-overflow", "fail", "step", "model.layers.23.mlp.down_proj overflowed float16 in forward",
                {"module": "model.layers.23.mlp.down_proj", "max_abs": float("inf"), "dtype": "float16", "limit": 65504.0,
                 "phase": "forward"}, fix="train in bf16 or fp32", step=500),
        Finding("loss-scale-skipped-steps", "warn", "run", "5 optimizer steps skipped; scale fell to 2048",
                {"skipped": 5, "scale_trajectory": [65536.0, 32768.0, 16384.0, 4096.0, 2048.0]}, step=1700),
        Finding("labels-prompt-supervised", "info", "batch", "prompt tokens are not supervised", {"share": 0.0}),
    ])
    r.repeats = {"precision-overflow": 3}
    r.record_checks([CheckResult("labels-pad-not-ignored", "fail", level="batch"),
                     CheckResult("bos-duplicated", "pass", level="batch"),
                     CheckResult("precision-overflow", "fail", level="step"),
                     CheckResult("generation-degenerate", "skipped", "needs a checkpoint", level="checkpoint")])
    r.metrics = synthetic_metrics(steps, layers)
    r.metrics["token_classes"] = {"prompt": {"tokens": 720, "supervised": 0}, "response": {"tokens": 480, "supervised": 480},
                                  "eos": {"tokens": 4, "supervised": 4}, "pad": {"tokens": 1344, "supervised": 1344},
                                  "special": {"tokens": 0, "supervised": 0}}
    r.metrics["batch"] = {"rows": 4, "seq_len": 640, "labels_source": "labels"}
    r.samples = [_synthetic_row(i, hostile) for i in range(4)]
    r.run = {"status": "crashed", "exit_code": 1, "steps_seen": steps,
             "error": {"type": "RuntimeError", "message": "CUDA error: an illegal memory access", "where": "train.py:88"}}
    r.environment = dict(FIXED_ENV)
    return finished(r)


def finished(report: Report) -> Report:
    """What a Session does at the end of every run: rank the root causes into the report."""
    from sftdoctor.probes import REGISTRY
    from sftdoctor.session import Session

    return Session.reopen(report, REGISTRY).finish()


def _synthetic_row(i: int, hostile: bool) -> dict:
    """640 tokens: 40 prompt, 60 response, EOS, the rest supervised padding (label 0)."""
    n_prompt, n_resp, T = 40, 60, 640
    ids = [1000 + k for k in range(n_prompt + n_resp)] + [151645] + [151643] * (T - n_prompt - n_resp - 1)
    texts = [f" w{k}" for k in range(n_prompt + n_resp)] + ["<|im_end|>"] + ["<|endoftext|>"] * (T - n_prompt - n_resp - 1)
    texts[5] = "\n"
    if hostile:
        texts[3], texts[4] = HOSTILE_SCRIPT, HOSTILE_IMG
    classes = [0] * n_prompt + [1] * n_resp + [2] + [3] * (T - n_prompt - n_resp - 1)
    labels = [-100] * n_prompt + ids[n_prompt:n_prompt + n_resp + 1] + [0] * (T - n_prompt - n_resp - 1)
    attention = [0] * n_prompt + [1] * (n_resp + 1) + [0] * (T - n_prompt - n_resp - 1)
    return {"row": i, "ids": ids, "texts": texts, "classes": classes, "labels": labels, "attention": attention,
            "length": T, "effective_target": labels[1:] + [-100], "token_loss": [round(0.5 + (k % 7) / 10, 3) for k in range(T)]}


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions"]


def chromium_path() -> str | None:
    """Debian's chromium (scripts/bootstrap.sh installs it); never a downloaded browser."""
    import os
    import shutil

    env = os.environ.get("SFTDOCTOR_CHROMIUM")  # an explicit path (or a missing one, to test the skip)
    if env:
        return env if os.path.exists(env) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class PageEvents:
    """What a page did: every request it tried, console errors, page errors, CSP violations."""

    def __init__(self):
        self.requests: list[str] = []
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.csp_violations: list[str] = []


from contextlib import contextmanager  # noqa: E402


VIOLATIONS_JS = """document.addEventListener('securitypolicyviolation', function (e) {
  (window.__cspViolations = window.__cspViolations || []).push(e.violatedDirective + ' ' + e.blockedURI);
});"""


def launch(pw):
    """Headless Debian chromium, no network side channels (no updates, sync, first-run)."""
    return pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)


def load(browser, path, width: int = 1280, height: int = 900):
    """Open a local HTML file in a fresh page of `browser`, recording what it tries to do.
    Every request other than the page itself is aborted (and recorded)."""
    url = Path(path).resolve().as_uri()
    events = PageEvents()
    page = browser.new_page(viewport={"width": width, "height": height})

    def route(r):
        if r.request.url == url:
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)
    page.on("request", lambda r: events.requests.append(r.url))
    page.on("console", lambda m: events.console_errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: events.page_errors.append(str(e)))
    page.add_init_script(VIOLATIONS_JS)
    page.goto(url, wait_until="load")
    events.csp_violations = page.evaluate("window.__cspViolations || []")
    return page, events


@contextmanager
def open_page(path, width: int = 1280, height: int = 900):
    """One-off: launch chromium, open the page, close everything afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            yield load(browser, path, width, height)
        finally:
            browser.close()


def screenshot(path: str) -> None:
    """The README picture: the real incident report (batch-level: verdict, ranked causes) stitched
    above its token view, scaled and palette-quantised to stay small."""
    import io
    import tempfile

    from PIL import Image

    from sftdoctor.reports.html import write_html

    report = incident_report()
    with tempfile.TemporaryDirectory() as d:
        page_path = Path(d) / "report.html"
        write_html(report, page_path)
        with open_page(page_path, width=1200, height=1000) as (page, _events):
            top = page.locator("#causes").bounding_box()
            head = page.screenshot(clip={"x": 0, "y": 0, "width": 1200, "height": top["y"] + top["height"] + 12})
            tokens = page.locator("#tokens").bounding_box()
            body = page.screenshot(full_page=True, clip={"x": 0, "y": tokens["y"] - 12, "width": 1200,
                                                         "height": min(tokens["height"] + 24, 620)})
    parts = [Image.open(io.BytesIO(png)).convert("RGB") for png in (head, body)]
    img = Image.new("RGB", (1200, sum(p.height for p in parts)), "white")
    y = 0
    for p in parts:
        img.paste(p, (0, y))
        y += p.height
    img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.LANCZOS)
    img = img.quantize(colors=96, method=Image.Quantize.MEDIANCUT)
    img.save(path, optimize=True)
    print(f"wrote {path} ({Path(path).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--screenshot":
        screenshot(sys.argv[2])
    else:
        print(__doc__)

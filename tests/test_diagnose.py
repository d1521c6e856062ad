"""`sftdoctor diagnose`: each broken checkpoint (trained for real on the CPU, see ckpt_fixtures)
is named by its finding and cause family; a healthy one passes; broken files are one-line errors."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import ckpt_fixtures as F
from conftest import GSM8K
from sftdoctor.checkpoint import scan_weights
from sftdoctor.outputs import check_generation_outputs, check_state_dict
from sftdoctor.cli import main
from sftdoctor.context import TokenizerInfo
from sftdoctor.diagnose import diagnose
from sftdoctor.errors import UserError
from sftdoctor.report import Report

CHECKPOINT_IDS = {"weights-nonfinite", "precision-inference-overflow", "generation-degenerate", "generation-never-stops",
                  "generation-config-eos", "embeddings-untrained-special", "tied-weights-mismatch"}
NEW_TOKENS = 24


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Every checkpoint, built once per session (about 20 s of CPU training in all)."""
    root = tmp_path_factory.mktemp("ckpts")
    d = {"root": root}
    d["healthy"] = F.healthy(root / "healthy")
    d["pad_zero"] = F.pad_zero(root / "pad_zero")
    d["eos_masked"] = F.eos_masked(root / "eos_masked")
    d["nan"], d["nan_reproduced"] = F.fp16_adam_nan(root / "nan")
    d["overflow"] = F.fp16_overflow(root / "overflow", d["healthy"])
    tok = F.make_tokenizer()
    d["base"] = F.save(F.new_model(tok), tok, root / "base")  # the untrained init the healthy run started from
    d["prompts"] = F.write_prompts(root / "prompts.jsonl")
    return d


@pytest.fixture(scope="session")
def reports(ckpts):
    """diagnose() of each checkpoint on its training questions, computed once."""
    cache = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = diagnose(str(ckpts[name]), prompts=str(ckpts["prompts"]), max_new_tokens=NEW_TOKENS, **kw)
        return cache[key]
    return get


def ids(report, severity=None):
    return report.ids(severity)


# ---- the two families of `!!!!` ------------------------------------------------------------------


def test_supervised_padding_is_degenerate_learned(reports):
    r = reports("pad_zero")
    f = r.get("generation-degenerate")
    assert f is not None and f.severity == "fail"
    ev = f.evidence
    assert ev["family"] == "learned"
    assert ev["token_id"] == 0 and ev["token_text"] == "!" and ev["token_is_id0"]
    assert ev["logits_finite"] is True and ev["fp32_logits_finite"] is True
    assert ev["p_id0"] > 0.5  # finite logits that genuinely prefer id 0 after the prompt
    assert ev["samples"] and set(ev["samples"][0]["output"]) == {"!"}
    assert "weights-nonfinite" not in ids(r) and "precision-inference-overflow" not in ids(r)


def test_fp16_adam_nan_weights_are_numerical(reports, ckpts):
    if not ckpts["nan_reproduced"]:
        warnings.warn("fp16 + Adam(eps=1e-8) stayed finite here; NaN was injected into the weights instead")
    r = reports("nan")
    w = r.get("weights-nonfinite")
    assert w is not None and w.severity == "fail"
    assert w.evidence["nonfinite_tensors"] >= 1 and w.evidence["dtypes"] == ["float16"]
    assert "Adam" in w.fix  # fp16 tensors: the fix names the fp16-Adam cause
    g = r.get("generation-degenerate")
    assert g is not None and g.evidence["family"] == "numerical"
    assert g.evidence["cause"] == "weights-nonfinite" and g.evidence["logits_finite"] is False
    assert g.evidence["token_id"] == 0  # argmax of NaN logits
    assert r.metrics["checkpoint"]["nonfinite_tensors"] == w.evidence["nonfinite_tensors"]


def test_fp16_overflow_finite_in_fp32(reports):
    r = reports("overflow")
    f = r.get("precision-inference-overflow")
    assert f is not None and f.severity == "fail"
    ev = f.evidence
    assert ev["dtype"] == "float16" and ev["served"] is True and ev["limit"] == 65504.0
    assert "layers.0.mlp" in ev["fp32_module"]  # where the overflow starts: the scaled MLP
    assert ev["fp32_max_abs"] > 65504.0 and math.isfinite(ev["fp32_max_abs"])
    assert ev["weights_over_fp16_limit"] == []  # weights fit fp16; only activations overflow
    logits = r.metrics["logits"]
    assert logits["float32"]["logits_finite"] and not logits["float16"]["logits_finite"]
    g = r.get("generation-degenerate")
    assert g is not None and g.evidence["family"] == "numerical" and g.evidence["cause"] == "precision-inference-overflow"
    assert "weights-nonfinite" not in ids(r)


def test_overflow_served_in_fp32_is_only_a_warning(reports):
    r = reports("overflow", dtype="float32")
    f = r.get("precision-inference-overflow")
    assert f is not None and f.severity == "warn" and f.evidence["served"] is False
    assert "generation-degenerate" not in ids(r)  # fp32 generation is finite


def test_pad_eos_masked_never_stops(reports):
    r = reports("eos_masked")
    f = r.get("generation-never-stops")
    assert f is not None and f.severity == "fail"
    assert f.evidence["stop_rate"] < 0.5 and f.evidence["pad_is_eos"] is True
    assert f.evidence["max_new_tokens"] == NEW_TOKENS
    assert "generation-degenerate" not in ids(r)  # it answers, then runs on: not the !!!! symptom


def test_healthy_checkpoint_passes(reports):
    r = reports("healthy")
    assert r.verdict == "pass", [(f.id, f.message) for f in r.findings]
    ran = {c.id: c.status for c in r.checks}
    assert set(ran) == CHECKPOINT_IDS and set(ran.values()) == {"pass"}
    assert all(g["stopped"] for g in r.metrics["generations"])


# ---- report contents ------------------------------------------------------------------------------


def test_report_metrics_round_trip(reports, tmp_path):
    r = reports("overflow")
    acts = r.metrics["activations"]
    assert {a["dtype"] for a in acts} == {"float32", "float16"}
    a = acts[0]
    assert set(a) == {"module", "max_abs", "dtype", "limit", "finite", "phase", "step"} and a["phase"] == "forward"
    assert any(not a["finite"] for a in acts if a["dtype"] == "float16")
    hist = r.metrics["argmax_histogram"]
    assert hist[0]["token_id"] == 0 and hist[0]["text"] == "!" and hist[0]["share"] == 1.0
    weights = r.metrics["weights"]
    assert all({"name", "dtype", "max_abs", "nonfinite"} <= set(w) for w in weights)
    assert {w["dtype"] for w in weights} == {"float16"}  # read from the safetensors header
    assert len(r.metrics["generations"]) == F.ROWS
    path = tmp_path / "r.json"
    r.save(path)
    back = Report.load(path)
    assert back.ids() == r.ids() and back.metrics["activations"][0]["module"] == acts[0]["module"]
    json.loads(path.read_text())  # valid JSON (NaN written as strings)


def test_base_comparison(ckpts, reports):
    r = reports("healthy", base=str(ckpts["base"]))
    changes = r.metrics["weight_change"]
    assert changes and all(c["change"] > 0 for c in changes)  # every tensor was trained
    assert all(c["relative_change"] > 0 for c in changes if c["base_norm"] > 0)
    assert any(c["relative_change"] is None for c in changes)  # q/k/v biases start at 0: no relative change
    assert r.metrics["weight_change_summary"]["tensors"] == len(r.metrics["weights"])
    assert "base" in r.metrics and r.metrics["base"]["generations"]


def test_base_that_overflows_too(ckpts, tmp_path):
    """Fine-tune and base both overflow in fp16: the finding says the fine-tune did not cause it."""
    r = diagnose(str(ckpts["overflow"]), base=str(ckpts["overflow"]), prompts=str(ckpts["prompts"]),
                 max_new_tokens=4, num_prompts=2)
    f = r.get("precision-inference-overflow")
    assert f.evidence["base_overflows"] is True and "base model overflows too" in f.message
    assert r.metrics["weight_change_summary"]["max"] == 0.0


def test_base_that_does_not_overflow(ckpts):
    """The base is finite in fp16: the fine-tune broke it, and the changed module is named."""
    r = diagnose(str(ckpts["overflow"]), base=str(ckpts["healthy"]), prompts=str(ckpts["prompts"]),
                 max_new_tokens=4, num_prompts=2)
    f = r.get("precision-inference-overflow")
    assert f.evidence["base_overflows"] is False and "base model" not in f.message
    [change] = f.evidence["weight_change_at_module"]
    assert change["name"] == "model.layers.0.mlp.down_proj.weight" and change["relative_change"] > 1000


# ---- the smaller checkpoint checks ---------------------------------------------------------------


def test_tied_flag_without_lm_head(ckpts, tmp_path):
    d = F.copy_checkpoint(ckpts["healthy"], tmp_path / "untied")
    F.edit_json(d, "config.json", tie_word_embeddings=False)
    r = diagnose(str(d), prompts=str(ckpts["prompts"]), max_new_tokens=4, num_prompts=2)
    f = r.get("tied-weights-mismatch")
    assert f is not None and f.severity == "warn" and f.evidence["lm_head"] is None


def test_generation_config_without_trained_eos(ckpts, tmp_path):
    d = F.copy_checkpoint(ckpts["healthy"], tmp_path / "geneos")
    F.edit_json(d, "generation_config.json", eos_token_id=1026)  # <|im_start|>, not the trained <|endoftext|>
    r = diagnose(str(d), prompts=str(ckpts["prompts"]), max_new_tokens=NEW_TOKENS, num_prompts=3)
    f = r.get("generation-config-eos")
    assert f is not None and f.severity == "warn"
    assert [m["id"] for m in f.evidence["missing"]] == [1024] and 1024 in f.evidence["emitted_end_ids"]


def test_untrained_special_rows(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    d = F.copy_checkpoint(ckpts["healthy"], tmp_path / "rows")
    state = load_file(d / "model.safetensors")
    emb = state["model.embed_tokens.weight"]
    emb[1027] = 0.0  # <|im_end|>: zero row
    emb[1025] = emb[1024]  # <|pad|> a copy of <|endoftext|>
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    r = diagnose(str(d), prompts=str(ckpts["prompts"]), max_new_tokens=4, num_prompts=2)
    f = r.get("embeddings-untrained-special")
    assert f is not None and f.severity == "warn"
    problems = {row["token_id"]: row["problem"] for row in f.evidence["rows"]}
    assert problems == {1025: "duplicate", 1027: "zero"}


def test_bin_and_sharded_checkpoints(ckpts, tmp_path):
    from safetensors.torch import load_file

    bin_dir = F.copy_checkpoint(ckpts["pad_zero"], tmp_path / "bin")
    torch.save(load_file(bin_dir / "model.safetensors"), bin_dir / "pytorch_model.bin")
    (bin_dir / "model.safetensors").unlink()
    r = diagnose(str(bin_dir), prompts=str(ckpts["prompts"]), max_new_tokens=8, num_prompts=2)
    assert r.metrics["checkpoint"]["format"] == "bin"
    assert r.get("generation-degenerate").evidence["family"] == "learned"

    from transformers import AutoModelForCausalLM

    shard_dir = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(ckpts["nan"])
    model.save_pretrained(shard_dir, max_shard_size="100KB")
    F.make_tokenizer().save_pretrained(shard_dir)
    scan = scan_weights(shard_dir)
    assert len(scan.files) > 1
    assert sum(1 for w in scan.weights if w["nan"] or w["inf"]) >= 1


def test_scan_is_chunked_and_exact(tmp_path, monkeypatch):
    """Row chunks of a few values give the same per-tensor numbers as the whole tensor."""
    import sftdoctor.checkpoint as ck
    from safetensors.torch import save_file

    t = torch.randn(50, 7, dtype=torch.bfloat16)
    t[3, 1], t[40, 6], t[41, 0] = float("nan"), float("inf"), -200.0
    (tmp_path / "config.json").write_text("{}")
    save_file({"w": t, "b": torch.tensor(3.0)}, tmp_path / "model.safetensors")
    monkeypatch.setattr(ck, "CHUNK_ELEMENTS", 10)
    scan = scan_weights(tmp_path)
    w = next(x for x in scan.weights if x["name"] == "w")
    assert (w["nan"], w["inf"], w["max_abs"], w["dtype"]) == (1, 1, 200.0, "bfloat16")
    assert next(x for x in scan.weights if x["name"] == "b")["max_abs"] == 3.0


# ---- the functions `watch` calls -----------------------------------------------------------------


def test_check_state_dict():
    tok = F.make_tokenizer()
    model = F.new_model(tok)
    state = model.state_dict()
    assert check_state_dict(state, model.config) == []
    state = {k: v.clone() for k, v in state.items()}
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    state["lm_head.weight"] += 1.0  # tie_word_embeddings=True but the saved head differs
    got = {f.id: f for f in check_state_dict(state, model.config)}
    assert got["weights-nonfinite"].evidence["tensors"][0]["name"] == "model.layers.1.mlp.up_proj.weight"
    assert got["tied-weights-mismatch"].evidence["equal"] is False


def test_check_generation_outputs():
    tok = TokenizerInfo.from_tokenizer(F.make_tokenizer())
    prompts = [[5, 6, 7]] * 4
    bangs = [p + [0] * 10 for p in prompts]  # model.generate style: prompt + new tokens
    got = {f.id: f for f in check_generation_outputs(prompts, bangs, tok, max_new_tokens=10, logits_nonfinite=True)}
    assert got["generation-degenerate"].evidence["family"] == "numerical" and "generation-never-stops" not in got
    got = check_generation_outputs(prompts, bangs, tok, max_new_tokens=10)
    assert got[0].evidence["family"] == "unknown"
    running = [[30, 31, 32, 33, 34, 35, 36, 37]] * 4
    got = {f.id for f in check_generation_outputs(prompts, running, tok, max_new_tokens=8, logits_nonfinite=False)}
    assert got == {"generation-never-stops"}
    stopping = [[30, 31, 1024, 1025, 1025]] * 4  # eos then batch padding
    assert check_generation_outputs(prompts, stopping, tok, max_new_tokens=8) == []


# ---- the command line -----------------------------------------------------------------------------


def test_cli_exit_codes_and_json(ckpts, tmp_path, capsys):
    out = tmp_path / "d.json"
    assert main(["diagnose", str(ckpts["pad_zero"]), "--prompts", str(GSM8K / "test.jsonl"), "--num-prompts", "2",
                 "--max-new-tokens", "8", "--json", str(out), "-q"]) == 1
    data = json.loads(out.read_text())
    assert data["command"] == "diagnose" and data["verdict"] == "fail"
    assert "generation-degenerate" in [f["id"] for f in data["findings"]]
    assert "generation-degenerate" in capsys.readouterr().out
    assert main(["diagnose", str(ckpts["healthy"]), "--prompts", str(ckpts["prompts"]), "--max-new-tokens", "16", "-q"]) == 0


@pytest.mark.parametrize("case, message", [
    ("truncated", "truncated or corrupt"),
    ("truncated_bin", "truncated or corrupt"),
    ("no_config", "has no config.json"),
    ("no_tokenizer", "has no tokenizer files"),
    ("no_weights", "has no weights"),
    ("missing", "does not exist"),
    ("hub_offline", "Hub is unreachable"),
])
def test_cli_bad_checkpoints_are_one_line_errors(ckpts, tmp_path, capsys, case, message):
    src = ckpts["healthy"]
    path = {
        "truncated": lambda: F.truncated(src, tmp_path / "t"),
        "truncated_bin": lambda: F.truncated_bin(src, tmp_path / "tb"),
        "no_config": lambda: F.without(src, tmp_path / "c", "config.json"),
        "no_tokenizer": lambda: F.without(src, tmp_path / "k", "tokenizer.json", "tokenizer_config.json"),
        "no_weights": lambda: F.without(src, tmp_path / "w", "model.safetensors"),
        "missing": lambda: tmp_path / "nowhere",
        "hub_offline": lambda: "sftdoctor-test/no-such-model",
    }[case]()
    assert main(["diagnose", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sftdoctor: error:") and message in err


def test_api_rejects_bad_arguments(ckpts):
    with pytest.raises(UserError, match="unknown dtype"):
        diagnose(str(ckpts["healthy"]), dtype="int8")
    with pytest.raises(UserError, match="does not exist"):
        diagnose(str(ckpts["healthy"]), prompts=str(ckpts["root"] / "nope.jsonl"))
    with pytest.raises(UserError, match="chat template"):
        diagnose(str(ckpts["healthy"]), prompt_format="chat")  # the fixture tokenizer has none


def test_prompts_from_text_and_jsonl(tmp_path):
    from sftdoctor.diagnose import read_questions

    txt = tmp_path / "q.txt"
    txt.write_text("How many legs do 3 cats have?\n\nWhat is 2 + 2?\n", encoding="utf-8")
    assert read_questions(txt) == ["How many legs do 3 cats have?", "What is 2 + 2?"]
    assert len(read_questions(GSM8K / "test.jsonl")) == 1319
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no question field"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="no 'question'"):
        read_questions(bad)

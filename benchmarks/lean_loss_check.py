"""Equivalence of the lean loss backends with the plain lm_head + cross-entropy on this device.

    python benchmarks/lean_loss_check.py            # CPU: torch backend; CUDA: torch and liger (when installed)

A random-init Qwen2 with Qwen2.5's vocabulary (151,936), one 4 x 256 batch with the prompt masked:
prints the loss of each path, the relative loss difference and the largest relative gradient
difference (per parameter, as ||g_lean - g_plain|| / ||g_plain||), in fp32 and under bf16 autocast
(CUDA). The tests assert the CPU figures; this script is for the GPU kernels.
"""
from __future__ import annotations

import copy
import json
import sys

import torch


def main() -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sftdoctor.train.lean import lean_forward, liger_available

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=256, tie_word_embeddings=True, use_cache=False)
    model = Qwen2ForCausalLM(cfg).to(dev)
    ids = torch.randint(0, 151936, (4, 256), device=dev)
    labels = ids.clone()
    labels[:, :100] = -100
    backends = ["torch"] + (["liger"] if liger_available(dev) else [])
    dtypes = [torch.float32] + ([torch.bfloat16] if dev.type == "cuda" else [])
    results = []
    for dt in dtypes:
        def run(backend):
            m = copy.deepcopy(model)
            with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
                if backend == "plain":
                    loss = m(input_ids=ids, labels=labels).loss
                else:
                    loss = lean_forward(m, ids, None, None, labels, {}, backend).loss
            loss.backward()
            return float(loss), {n: p.grad.float() for n, p in m.named_parameters()}
        ref_loss, ref_g = run("plain")
        for b in backends:
            loss, g = run(b)
            worst = max(float((g[n] - ref_g[n]).norm() / ref_g[n].norm().clamp_min(1e-30)) for n in ref_g)
            row = {"dtype": str(dt).replace("torch.", ""), "backend": b, "plain_loss": ref_loss, "lean_loss": loss,
                   "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss), "grad_rel_diff_max": worst}
            results.append(row)
            print(json.dumps(row), flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

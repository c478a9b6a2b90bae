"""Memory that scoring and perplexity need, full model vs layer-wise: the README's formulas, the
table they give for Llama-2-7B / 70B at the recipe defaults, and a check of the two activation
terms on the real small model (SmolLM2-135M, fp32, CPU).

    python benchmarks/memory_formula.py --assets ../shared-cache --out benchmarks/results

What is held at once (read from compress/layerwise.py, importance/capture.py, evaluate/perplexity.py):
* full path: all weights on the device; per batch one layer's activations (capture hooks) or the
  logits (perplexity: model-dtype logits, a float32 copy, float32 log-softmax; no KV cache).
* layer-wise: ``layer_inputs`` runs the embeddings for *every* batch and keeps each batch's
  hidden states on the device until all are done, then moves them to the CPU (``offload``); the
  rotary (cos, sin) and position ids of every batch stay on the device for the whole pass. Then one layer at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

GIB = 2**30
CONFIGS = {  # from the models' config.json
    "Llama-2-7B": dict(params=6.74e9, layers=32, hidden=4096, mlp=11008, vocab=32000, heads=32, kv_heads=32, head_dim=128),
    "Llama-2-70B": dict(params=68.98e9, layers=80, hidden=8192, mlp=28672, vocab=32000, heads=64, kv_heads=8, head_dim=128),
}
DEFAULTS = dict(bytes=2, samples=128, seq_len=2048, batch=1, ppl_tokens=1_000_000, prompt=512, new=128)


def layer_params(c: dict) -> int:
    """One decoder layer: q, o (H x H), k, v (H x kv*d), gate/up/down (H x I), two norms."""
    kv = c["kv_heads"] * c["head_dim"]
    return 2 * c["hidden"] ** 2 + 2 * c["hidden"] * kv + 3 * c["hidden"] * c["mlp"] + 2 * c["hidden"]


def estimate(c: dict, s: dict = DEFAULTS) -> dict[str, float]:
    """GiB held at the peak, by path and job (B = batch, T = seq_len, H, I, V from the config)."""
    b, t, h = s["bytes"], s["seq_len"], c["hidden"]
    weights = c["params"] * b
    embed = c["vocab"] * h * b  # embeddings (the LM head is as large, untied)
    layer = layer_params(c) * b
    acts = s["batch"] * t * (3 * c["mlp"] + 6 * h) * b + 2 * s["batch"] * t * h * 4  # one layer + fp32 copies
    logits = s["batch"] * t * c["vocab"] * (b + 4 + 4)  # model-dtype logits, .float(), log_softmax
    rotary = 2 * t * c["head_dim"] * b + t * 8  # cos + sin (model dtype) and int64 position ids, one batch
    cal_batches = s["samples"] // s["batch"]
    ppl_batches = -(-s["ppl_tokens"] // t)
    cal_hidden = s["samples"] * t * h * b
    ppl_hidden = s["ppl_tokens"] * h * b
    kv = 2 * c["layers"] * c["kv_heads"] * c["head_dim"] * (s["prompt"] + s["new"]) * s["batch"] * b
    return {k: v / GIB for k, v in {
        "weights": weights, "embeddings": embed, "one_layer": layer, "layer_activations": acts,
        "logits": logits, "calibration_hidden": cal_hidden, "perplexity_hidden": ppl_hidden,
        "rotary_all_calibration": rotary * cal_batches, "rotary_all_perplexity": rotary * ppl_batches,
        "kv_cache": kv,
        "full_scoring_device": weights + acts,
        "full_perplexity_device": weights + max(acts, logits),
        "layerwise_scoring_device": embed + max(cal_hidden, layer + acts) + rotary * cal_batches,
        "layerwise_scoring_cpu": weights + cal_hidden,
        "layerwise_perplexity_device": max(embed + ppl_hidden + rotary * ppl_batches, embed + logits),  # then LM head + logits
        "layerwise_perplexity_cpu": weights + ppl_hidden,
        "latency_device": weights + kv,
    }.items()}


def measure(model_dir: Path, samples: int = 64, seq_len: int = 512, ppl_len: int = 1024) -> dict:
    """Bytes layer_inputs holds and the perplexity-window peak on the real small model (CPU)."""
    from compress.evaluate.memory import PeakMemory, proc_kib_field
    from compress.evaluate.perplexity import Window, window_nll
    from compress.layerwise import layer_inputs
    from compress.quiet import auto_model_class

    model = auto_model_class().from_pretrained(model_dir, dtype=torch.float32).eval()
    c = model.config
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, c.vocab_size, (1, seq_len), generator=gen),
                "attention_mask": torch.ones(1, seq_len, dtype=torch.long)} for _ in range(samples)]
    layer_inputs(model, batches[:1], cpu)  # page in the embeddings (mmap'd weights) first
    gc.collect()
    rss0 = proc_kib_field("/proc/self/status", "VmRSS")
    hidden, calls = layer_inputs(model, batches, cpu)
    gc.collect()
    rss1 = proc_kib_field("/proc/self/status", "VmRSS")
    tensors = {id(t): t for t in hidden}
    for kwargs in (kw for per_layer in calls for kw in per_layer):
        for v in kwargs.values():
            for t in v if isinstance(v, tuple) else (v,):
                if isinstance(t, torch.Tensor):
                    tensors[id(t)] = t
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    del hidden, calls, tensors
    gc.collect()
    tokens = torch.randint(0, c.vocab_size, (ppl_len,), generator=gen)
    window_nll(model, tokens, [Window(0, ppl_len, 1)], cpu)  # warm-up
    with PeakMemory(cpu) as pm:
        window_nll(model, tokens, [Window(0, ppl_len, 1)], cpu)
    after = proc_kib_field("/proc/self/status", "VmRSS")
    return {
        "model": f"{model_dir.name} fp32 (hidden {c.hidden_size}, head_dim {c.head_dim}, vocab {c.vocab_size})",
        "layer_inputs": {"samples": samples, "seq_len": seq_len, "tensor_bytes_held": held,
                         "formula N*T*H*4 + N*(2*T*d*4 + T*8)": samples * seq_len * c.hidden_size * 4
                         + samples * (2 * seq_len * c.head_dim * 4 + seq_len * 8),
                         "rss_increase_bytes": rss1 - rss0},
        "perplexity_window": {"seq_len": ppl_len, "peak_rss_above_after_bytes": pm.peak_bytes - after,
                              "formula T*V*(4+4) (fp32: .float() is a no-op)": ppl_len * c.vocab_size * 8},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, help="folder with models/smollm2-135m-instruct (for the check)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = {"settings": DEFAULTS, "gib": {name: estimate(c) for name, c in CONFIGS.items()}}
    if args.assets:
        torch.set_num_threads(2)
        result["check"] = measure(args.assets / "models" / "smollm2-135m-instruct")
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory_formula.json").write_text(text + "\n")


if __name__ == "__main__":
    main()

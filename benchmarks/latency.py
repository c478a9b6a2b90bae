"""Prefill and decode speed of a layer-pruned model vs the unpruned one, against the theoretical
L / (L - k) speedup (ShortGPT removes 9 of Llama-2-7B's 32 layers: 32/23 = 1.39x).

CPU, real small model (remove the 7 lowest-BI layers of 30: 30/23 = 1.30x):
    python benchmarks/latency.py --assets ../shared-cache --out benchmarks/results
GPU, Llama-2-7B shapes with random fp16 weights (speed does not depend on the values):
    python benchmarks/latency.py --random-7b --device cuda --out benchmarks/results
Dry run of that path on a CPU (tiny random shape, seconds):
    python benchmarks/latency.py --random-7b --shape tiny --device cpu --prompt-tokens 16 --new-tokens 4 --repeats 1 --out /tmp/dry

Both models are timed in the same process, alternating, with plain `generate` and with the
static-cache fast path; medians over --repeats after a warm-up (compress.evaluate.latency).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from compress.evaluate.latency import measure_latency
from compress.model_io import load_model
from compress.surgery import remove_layers
from random_llama import REMOVE, random_llama, require_cuda

# Our measured BI order on SmolLM2-135M (benchmarks/results); ShortGPT's for Llama-2-7B is REMOVE["7b"].
SMOLLM_BI_7 = [12, 13, 14, 15, 17, 25, 26]


def build(args):
    if args.random_7b:
        return random_llama(args.shape, torch.float16, args.device), REMOVE[args.shape]
    model, _ = load_model(str(args.assets / "models/smollm2-135m-instruct"), dtype=torch.float32,
                          device=torch.device(args.device))
    return model, SMOLLM_BI_7


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=Path("../shared-cache"))
    ap.add_argument("--random-7b", action="store_true")
    ap.add_argument("--shape", choices=["7b", "tiny"], default="7b", help="with --random-7b: tiny = CPU dry run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    require_cuda(args.device, "latency.py")
    full, remove = build(args)
    pruned = copy.deepcopy(full)
    remove_layers(pruned, remove)
    layers = full.config.num_hidden_layers
    kw = dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, batch_size=args.batch_size,
              repeats=args.repeats)
    rows = {}
    for fast in (False, True):
        for name, model in (("full", full), ("pruned", pruned)):
            try:
                rows[f"{name}/{'static' if fast else 'generate'}"] = asdict(measure_latency(model, fast=fast, **kw))
            except Exception as e:  # the fast path may be unsupported: say so
                rows[f"{name}/{'static' if fast else 'generate'}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    ratios = {}
    for path in ("generate", "static"):
        f, p = rows[f"full/{path}"], rows[f"pruned/{path}"]
        if "error" not in f and "error" not in p:
            ratios[path] = {"prefill_speedup": f["prefill_ms"] / p["prefill_ms"],
                            "decode_speedup": p["decode_tok_s"] / f["decode_tok_s"]}
    result = {
        "command": "python benchmarks/latency.py " + " ".join(sys.argv[1:]),
        "model": f"llama shape {args.shape}, random fp16" if args.random_7b else "SmolLM2-135M-Instruct fp32",
        "layers": f"{layers} -> {layers - len(remove)} (removed {remove})",
        "theoretical_speedup": layers / (layers - len(remove)),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "setting": kw, "rows": rows, "speedups": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    where = "gpu" if args.device.startswith("cuda") else "cpu"
    name = f"{where}_latency_random_{args.shape}" if args.random_7b else "latency_cpu"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""BI scoring cost: time vs one plain forward pass, and peak memory of layer-wise vs full-model.

CPU, real small model (assets from ../shared/assets/fetch.sh):
    python benchmarks/scoring.py --assets ../shared-cache --out benchmarks/results
GPU, Llama-2-7B shapes with random weights (memory and time do not depend on the values):
    python benchmarks/scoring.py --random-7b --device cuda --samples 32 --seq-len 2048 --out benchmarks/results
Dry run of that path on a CPU (tiny random shape, seconds):
    python benchmarks/scoring.py --random-7b --shape tiny --device cpu --samples 4 --seq-len 64 --out /tmp/dry

Times are medians of --repeats runs in one process, each path against the same calibration batches,
so the ratios compare like with like. Peak memory: each path runs in its own child process
(CPU: peak resident set, VmHWM; CUDA: torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from compress.data.local import load_local_texts
from compress.data.tokens import calibration_batches, tokenize_documents
from compress.evaluate.memory import PeakMemory
from compress.importance import score_layers
from compress.model_io import load_model
from random_llama import random_llama, require_cuda


def build(args):
    """(model on CPU, calibration batches)."""
    if args.random_7b:
        model = random_llama(args.shape, torch.float16, "cpu")
        ids = torch.randint(0, model.config.vocab_size, (args.samples * args.seq_len + 1,),
                            generator=torch.Generator().manual_seed(0))
        return model, calibration_batches(ids, args.samples, args.seq_len, 0, args.batch_size)
    model, tok = load_model(str(args.assets / "models/smollm2-135m-instruct"), dtype=torch.float32,
                            device=torch.device("cpu"))
    tokens = tokenize_documents(tok, load_local_texts(args.assets / "books/austen-emma.txt"), 200_000)
    return model, calibration_batches(tokens, args.samples, args.seq_len, 0, args.batch_size)


def timed(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def forward_all(model, batches, device, base_only: bool):
    net = model.base_model if base_only else model
    for b in batches:
        net(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False)


def time_paths(args) -> dict:
    device = torch.device(args.device)
    model, batches = build(args)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    out["layerwise_bi_s"] = timed(lambda: score_layers(model, "bi", batches, False, layerwise_on=device), args.repeats, sync)
    model.to(device)
    forward_all(model, batches[:1], device, True)  # warm-up
    out["forward_causal_lm_s"] = timed(lambda: forward_all(model, batches, device, False), args.repeats, sync)
    out["forward_base_model_s"] = timed(lambda: forward_all(model, batches, device, True), args.repeats, sync)
    out["full_bi_s"] = timed(lambda: score_layers(model, "bi", batches, False), args.repeats, sync)
    return out


def peak_child(args) -> None:
    """Child process: score once with one path and print its peak memory as JSON."""
    device = torch.device(args.device)
    model, batches = build(args)
    with PeakMemory(device) as peak:
        if args.child == "full":
            model.to(device)
            score_layers(model, "bi", batches, False)
        else:
            score_layers(model, "bi", batches, False, layerwise_on=device)
    print(json.dumps({"path": args.child, "peak_bytes": peak.peak_bytes, "kind": peak.kind}))


def peaks(argv: list[str]) -> dict:
    res = {}
    for path in ("full", "layerwise"):
        proc = subprocess.run([sys.executable, __file__, *argv, "--child", path], capture_output=True, text=True, check=True)
        res[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=Path("../shared-cache"))
    ap.add_argument("--random-7b", action="store_true")
    ap.add_argument("--shape", choices=["7b", "tiny"], default="7b", help="with --random-7b: tiny = CPU dry run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--child", choices=["full", "layerwise"])
    args = ap.parse_args()
    require_cuda(args.device, "scoring.py")
    if args.child:
        return peak_child(args)
    argv = [a for a in sys.argv[1:]]
    t = time_paths(args)
    p = peaks(argv)
    result = {
        "command": "python benchmarks/scoring.py " + " ".join(argv),
        "model": f"llama shape {args.shape}, random fp16" if args.random_7b else "SmolLM2-135M-Instruct fp32",
        "calibration": f"{args.samples} x {args.seq_len} tokens, batch {args.batch_size}",
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "times_s": t,
        "ratios": {"full_bi / forward_base_model": t["full_bi_s"] / t["forward_base_model_s"],
                   "full_bi / forward_causal_lm": t["full_bi_s"] / t["forward_causal_lm_s"],
                   "layerwise_bi / forward_base_model": t["layerwise_bi_s"] / t["forward_base_model_s"],
                   "layerwise_bi / forward_causal_lm": t["layerwise_bi_s"] / t["forward_causal_lm_s"],
                   "peak layerwise / full": p["layerwise"]["peak_bytes"] / p["full"]["peak_bytes"]},
        "peaks": p,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    where = "gpu" if args.device.startswith("cuda") else "cpu"
    name = f"{where}_scoring_random_{args.shape}" if args.random_7b else "scoring_cpu"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

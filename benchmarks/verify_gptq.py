"""Where `compress verify`'s thresholds for quantized checkpoints come from.

On one GPTQ checkpoint and the float model it was quantized from, with the default prompts, every
comparison teacher-forced on vLLM's greedy tokens (top-1 agreement, max and mean |Δ logprob|):

* noise floor of two correct bf16 computations of one function: vLLM vs transformers on the *float*
  model, both bf16;
* the GPTQ checkpoint, vLLM's weight-only W4A16 kernel (VLLM_CPU_INT4_W4A8=0) vs transformers running
  the checkpoint through GPTQModel (bf16), and vs an independent float32 model built here from the
  checkpoint's packed weights by hand (W = scale * (q - (z + 1)), GPTQ v1 layout);
* the same with vLLM's default on CPUs with AMX, W4A8 (activations quantized to int8 on the fly).

    python benchmarks/verify_gptq.py GPTQ_CHECKPOINT FLOAT_INPUT --python VLLM_PYTHON \
        [--tokens 32] [--out benchmarks/results/verify_gptq.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from compress.verify.engines import WORKER
from compress.verify.reference import load_reference, teacher_forced
from compress.verify.verify import DEFAULT_PROMPTS, stop_tokens


def engine(python: str, folder: Path, dtype: str, prompts, stops, tokens: int, env: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        req, res = Path(tmp) / "req.json", Path(tmp) / "res.json"
        req.write_text(json.dumps({"engine": "vllm", "tokens": tokens, "dtype": dtype, "checkpoints": [
            {"path": str(folder.resolve()), "prompts": prompts, "stop_token_ids": stops}]}))
        subprocess.run([python, str(WORKER), str(req), str(res)], env={**os.environ, **env, "PYTHONPATH": ""},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        (r,) = json.loads(res.read_text())["results"]
    if not r["ok"]:
        raise SystemExit(f"vLLM refused {folder}: {r['error']}")
    return r["outputs"]


def dequantized(checkpoint: Path, float_input: Path):
    """A float32 model of the checkpoint's weights, unpacked by hand (GPTQ v1: zeros stored minus one)."""
    from transformers import AutoModelForCausalLM

    qc = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    bits = qc["bits"]
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = 2 ** bits - 1

    def rows(x):  # packed along dim 0
        return ((x.unsqueeze(1) >> shifts[None, :, None]) & mask).reshape(-1, x.shape[1])

    def cols(x):  # packed along dim 1
        return ((x.unsqueeze(2) >> shifts[None, None, :]) & mask).reshape(x.shape[0], -1)

    sd = load_file(str(checkpoint / "model.safetensors"))
    weights = {}
    for key in sd:
        if key.endswith(".qweight"):
            p = key.removesuffix(".qweight")
            g = sd[p + ".g_idx"].long()
            w = (rows(sd[key]).float() - (cols(sd[p + ".qzeros"]).float() + 1)[g]) * sd[p + ".scales"].float()[g]
            weights[p + ".weight"] = w.t().contiguous()
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            weights[key] = sd[key].float()
    model = AutoModelForCausalLM.from_pretrained(float_input, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)  # tied head
    return model


def compare(model, prompts, outputs) -> dict:
    agree = total = 0
    deltas = []
    for ids, out in zip(prompts, outputs):
        argmax, logps, _ = teacher_forced(model, ids, out["tokens"])
        agree += sum(a == t for a, t in zip(argmax, out["tokens"]))
        total += len(argmax)
        deltas += [abs(a - b) for a, b in zip(logps, out["logprobs"])]
    return {"top1_agree": agree / total, "max_dlogp": max(deltas), "mean_dlogp": sum(deltas) / len(deltas),
            "positions": total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("float_input", type=Path)
    ap.add_argument("--python", required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/verify_gptq.json"))
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(a.checkpoint)
    prompts, stops = [tok(p).input_ids for p in DEFAULT_PROMPTS], stop_tokens(a.checkpoint, tok)
    base = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    float_bf16 = AutoModelForCausalLM.from_pretrained(a.float_input, dtype=torch.bfloat16).eval()
    gptqmodel = load_reference(a.checkpoint, torch.bfloat16, "gptq")
    hand = dequantized(a.checkpoint, a.float_input)
    results = {"float model, vLLM bf16 vs transformers bf16": compare(
        float_bf16, prompts, engine(a.python, a.float_input, "bfloat16", prompts, stops, a.tokens, base))}
    for label, flag in (("W4A16", "0"), ("W4A8", "1")):
        out = engine(a.python, a.checkpoint, "bfloat16", prompts, stops, a.tokens, {**base, "VLLM_CPU_INT4_W4A8": flag})
        results[f"GPTQ, vLLM {label} vs GPTQModel bf16"] = compare(gptqmodel, prompts, out)
        results[f"GPTQ, vLLM {label} vs hand-dequantized fp32"] = compare(hand, prompts, out)
    record = {
        "command": " ".join(["python", *sys.argv]), "checkpoint": str(a.checkpoint), "float_input": str(a.float_input),
        "prompts": list(DEFAULT_PROMPTS), "tokens": a.tokens, "results": results, "wall_s": time.time() - t0,
        "machine": {"platform": platform.platform(), "cpu": platform.processor() or "x86_64", "cores": os.cpu_count(),
                    "amx": bool(torch.cpu._is_amx_tile_supported())},
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "vllm_python": a.python},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2))
    for k, v in results.items():
        print(f"{k:50s} top-1 {v['top1_agree']:.3f}  max|Δ| {v['max_dlogp']:.3f}  mean|Δ| {v['mean_dlogp']:.4f}")


if __name__ == "__main__":
    main()

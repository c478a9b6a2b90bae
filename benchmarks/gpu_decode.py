"""Decode speed on a GPU: a random Llama-2-7B-shaped model in fp16 with HF eager attention vs sdpa,
and the same model quantized by GPTQModel to 4-bit (group 128, sym, no act-order) on a few random
calibration windows, decoded with each GPTQModel kernel that loads (Marlin, Machete, ExLlama v2,
Triton, Torch), saying which kernel class ran or why a backend did not load.

    python benchmarks/gpu_decode.py --device cuda --out benchmarks/results
Dry run of the same logic on a CPU (tiny random shape, CPU backends):
    python benchmarks/gpu_decode.py --device cpu --shape tiny --prompt-tokens 16 --new-tokens 4 --repeats 1 --out /tmp/dry

Decode tok/s = new tokens / (generate time - prefill time), medians over --repeats after a warm-up
(compress.evaluate.latency.measure_latency, CUDA events on GPU). Weight values do not change speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from compress.evaluate.latency import measure_latency
from random_llama import SHAPES, random_llama, require_cuda

GPU_BACKENDS = ["gptq_marlin", "gptq_machete", "gptq_exllama_v2", "gptq_triton", "gptq_torch"]
CPU_BACKENDS = ["gptq_torch_aten", "gptq_torch"]


def word_tokenizer(vocab: int):
    """A tokenizer with one word per id (GPTQModel loads a tokenizer from the model folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0",
                                                eos_token="t2", bos_token="t1")


def timed_row(model, args, **extra) -> dict:
    try:
        row = asdict(measure_latency(model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                     batch_size=args.batch_size, repeats=args.repeats))
    except Exception as e:  # a backend that loads but cannot generate: say so
        row = {"error": f"{type(e).__name__}: {e}"[:400]}
    if torch.cuda.is_available():
        row["max_memory_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps({**extra, **row}), flush=True)
    return {**extra, **row}


def float_rows(model, args) -> list[dict]:
    rows = []
    for attn in ("eager", "sdpa"):
        model.set_attn_implementation(attn)
        rows.append(timed_row(model, args, name=f"fp16 HF {attn}", attn=model.config._attn_implementation))
    return rows


def quantize(model, folder: Path, args) -> dict:
    from gptqmodel import GPTQModel, QuantizeConfig

    model.save_pretrained(folder / "float")
    word_tokenizer(model.config.vocab_size).save_pretrained(folder / "float")
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, model.config.vocab_size, (1, args.cal_seq_len), generator=gen),
             "attention_mask": torch.ones(1, args.cal_seq_len, dtype=torch.long)} for _ in range(args.cal_samples)]
    start = time.perf_counter()
    gm = GPTQModel.load(str(folder / "float"), QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False),
                        device=args.device)
    gm.quantize(rows, batch_size=1)
    gm.save(str(folder / "gptq"))
    seconds = time.perf_counter() - start
    del gm
    shutil.rmtree(folder / "float", ignore_errors=True)
    return {"quantize_s": seconds, "calibration": f"{args.cal_samples} x {args.cal_seq_len} random tokens"}


def gptq_rows(folder: Path, args) -> list[dict]:
    from gptqmodel import GPTQModel

    rows = []
    for backend in args.backends:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            gm = GPTQModel.load(str(folder / "gptq"), device=args.device, backend=backend)
        except Exception as e:  # kernel absent, not compiled, or not for this GPU: say which and why
            rows.append({"name": f"gptq 4-bit g128 {backend}", "backend": backend,
                         "error": f"load: {type(e).__name__}: {e}"[:400]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        kernel = type(gm.model.model.layers[0].self_attn.q_proj).__name__
        dtype = str(gm.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
        rows.append(timed_row(gm.model, args, name=f"gptq 4-bit g128 {backend}", backend=backend, kernel=kernel,
                              activations=dtype))
        del gm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cal-samples", type=int, default=8)
    ap.add_argument("--cal-seq-len", type=int, default=512)
    ap.add_argument("--backends", nargs="+", default=None, help="GPTQModel BACKEND values, in order")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    require_cuda(args.device, "gpu_decode.py")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    import gptqmodel

    cuda = args.device.startswith("cuda")
    args.backends = args.backends or (GPU_BACKENDS if cuda else CPU_BACKENDS)
    model = random_llama(args.shape, torch.float16, args.device)
    rows = float_rows(model, args)
    work = Path(tempfile.mkdtemp(prefix="gpu-decode-"))
    try:
        model.set_attn_implementation("sdpa")
        quant = quantize(model, work, args)
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        rows += gptq_rows(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = next((r["decode_tok_s"] for r in rows if r.get("name") == "fp16 HF sdpa" and "decode_tok_s" in r), None)
    for r in rows:
        if base and "decode_tok_s" in r:
            r["decode_vs_fp16_sdpa"] = r["decode_tok_s"] / base
    result = {
        "command": "python benchmarks/gpu_decode.py " + " ".join(sys.argv[1:]),
        "model": f"llama shape {args.shape} ({SHAPES[args.shape]}), random fp16",
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "transformers": transformers.__version__, "gptqmodel": gptqmodel.__version__},
        "setting": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                    "batch_size": args.batch_size, "repeats": args.repeats},
        "quantization": quant, "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{'gpu' if cuda else 'cpu'}_decode_random_{args.shape}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({r["name"]: r.get("decode_tok_s", r.get("error")) for r in rows}, indent=2))


if __name__ == "__main__":
    main()

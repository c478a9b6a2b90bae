"""Quantization on the real small model: perplexity and size of fp32 vs GPTQ 4-bit (group 64:
hidden size 576 is not a multiple of 128) vs bnb NF4,
alone and after removing the 7 lowest-BI layers.

    python benchmarks/quantization.py --assets ../shared-cache --out benchmarks/results

Caveat (../shared/assets/README.md): SmolLM2-135M's weights were dequantized from llama.cpp Q4_1
(4-bit, blocks of 32), so every linear weight already lies on a 4-bit grid and 4-bit quantization
costs less here than on a bf16 model. Use the numbers to compare methods, not as "4-bit costs X".
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import time
from pathlib import Path

import torch
import transformers

from compress.data.local import load_local_texts
from compress.data.tokens import calibration_batches, tokenize_documents
from compress.evaluate.perplexity import perplexity
from compress.evaluate.suite import size_metrics
from compress.model_io import load_model
from compress.stages.base import StageContext
from compress.stages.bnb4 import BnB4, BnB4Config
from compress.stages.gptq import GPTQ, GPTQConfig
from compress.surgery import remove_layers

BI_7 = [12, 13, 14, 15, 17, 25, 26]  # measured in benchmarks/results/bi_vs_sequential.md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=Path("../shared-cache"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--eval-tokens", type=int, default=8192)
    args = ap.parse_args()
    model, tok = load_model(str(args.assets / "models/smollm2-135m-instruct"), dtype=torch.float32,
                            device=torch.device("cpu"))
    cal = calibration_batches(tokenize_documents(tok, load_local_texts(args.assets / "books/austen-emma.txt"), 200_000),
                              32, 256, 0, 4)
    ev = tokenize_documents(tok, load_local_texts(args.assets / "books/austen-prideprejudice.txt"), args.eval_tokens)
    ctx = StageContext(cal, tok, torch.device("cpu"), list(range(30)), logging.getLogger("bench"), progress=False)
    rows = []

    def row(name, m, seconds=0.0):
        s = size_metrics(m)
        rows.append({"model": name, "layers": s["layers"], "bits": s["bits"], "weight_MiB": s["weight_bytes"] / 2**20,
                     "ppl": perplexity(m, ev, seq_len=1024, batch_size=4, progress=False).ppl, "quantize_s": seconds})
        print(rows[-1], flush=True)

    pruned = copy.deepcopy(model)
    remove_layers(pruned, BI_7)
    for prefix, base in (("", model), ("BI -7 layers + ", pruned)):
        row(f"{prefix}fp32", base)
        for name, stage in ((f"{prefix}GPTQ 4-bit g64", GPTQ(GPTQConfig(bits=4, group_size=64))),
                            (f"{prefix}bnb NF4", BnB4(BnB4Config(quant_type="nf4")))):
            start = time.perf_counter()
            q = stage.apply(copy.deepcopy(base), ctx).new_model
            row(name, q, time.perf_counter() - start)
    result = {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "command": "python benchmarks/quantization.py --assets ../shared-cache",
              "eval": f"first {ev.numel()} tokens of Pride and Prejudice, 1024-token windows", "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantization.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

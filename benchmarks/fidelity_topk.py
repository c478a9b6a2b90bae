"""How many baseline log-probs the fidelity store must keep: top-k KL vs the full-vocabulary KL.

On the real small model, the baseline vs the same model with layers removed (the quickstart's 7
lowest-BI layers, or --remove), on the first --tokens tokens of a book in 1,024-token windows:
mean / median / p99 of KL_k (top-k + rest bucket, compress.evaluate.fidelity) for several k, next
to the exact full-vocabulary KL computed from the same logits, and the store's bytes per position.

    python benchmarks/fidelity_topk.py --assets ../shared-cache
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.data.tokens import tokenize_documents
from compress.evaluate.fidelity import full_kl, topk_kl, topk_summary
from compress.surgery import remove_layers

KS = (1, 4, 16, 32, 64, 128, 256, 1024)


def log_probs(model, tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(positions, V) float32 log-probs of every predicted token of non-overlapping windows."""
    out = []
    with torch.no_grad():
        for begin in range(0, tokens.numel() - 1, seq_len):
            ids = tokens[begin : begin + seq_len][None]
            if ids.shape[1] < 2:
                break
            out.append(torch.log_softmax(model(ids).logits[0, :-1].float(), -1))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--assets", type=Path, default=Path("../shared-cache"))
    ap.add_argument("--book", default="austen-prideprejudice.txt")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 13, 14, 15, 17, 25, 26],
                    help="layers to remove (default: the quickstart's 7 lowest-BI layers)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fidelity_topk.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = args.assets / "models" / "smollm2-135m-instruct"
    tok = AutoTokenizer.from_pretrained(model_dir)
    tokens = tokenize_documents(tok, [(args.assets / "books" / args.book).read_text()], max_tokens=args.tokens)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    p = log_probs(model, tokens, 1024)
    remove_layers(model, args.layers)
    q = log_probs(model, tokens, 1024)
    exact = full_kl(p, q)
    rows = []
    for k in KS:
        ids, top, rest = topk_summary(p, k)
        kl = topk_kl(ids, top, rest, q)
        rows.append({"k": k, "kl_mean": float(kl.mean()), "kl_median": float(kl.median()),
                     "kl_p99": float(np.quantile(kl.numpy(), 0.99)),
                     "mean_rel_to_full": float(kl.mean() / exact.mean()),
                     "p_mass_outside_topk_mean": float(rest.exp().mean()),
                     "store_bytes_per_position": 8 * k + 16})
    result = {
        "model": "SmolLM2-135M-Instruct", "removed_layers": args.layers, "text": args.book,
        "positions": int(p.shape[0]), "vocab": int(p.shape[1]),
        "full_kl": {"mean": float(exact.mean()), "median": float(exact.median()),
                    "p99": float(np.quantile(exact.numpy(), 0.99))},
        "top1_agree": float((p.argmax(-1) == q.argmax(-1)).double().mean()),
        "rows": rows, "wall_s": time.perf_counter() - start,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "command": "python benchmarks/fidelity_topk.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k != "out"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"full KL mean {result['full_kl']['mean']:.4f}  top-1 agreement {result['top1_agree']:.3f}  "
          f"({result['positions']} positions)")
    print("| k | KL_k mean | ÷ full | p99 | mass outside top-k | bytes/position |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['kl_mean']:.4f} | {r['mean_rel_to_full']:.3f} | {r['kl_p99']:.3f} | "
              f"{r['p_mass_outside_topk_mean']:.3f} | {r['store_bytes_per_position']} |")


if __name__ == "__main__":
    main()

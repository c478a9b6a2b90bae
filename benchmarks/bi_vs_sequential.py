"""ShortGPT's central claim on the real small model: removing the k lowest-BI layers costs less
perplexity than removing the first k layers (sequential) or the last k (reverse).

    python benchmarks/bi_vs_sequential.py --assets ../shared-cache --k 4 7 9 --out benchmarks/results

Calibration: 32 x 256 tokens of Austen's Emma; evaluation: the first 16,384 tokens of Pride and
Prejudice in 1,024-token windows. Writes <out>/bi_vs_sequential.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
import transformers

from compress.data.local import load_local_texts
from compress.data.tokens import calibration_batches, tokenize_documents
from compress.evaluate.perplexity import perplexity
from compress.importance import lowest, score_layers
from compress.model_io import load_model
from compress.surgery import remove_layers

METRICS = ["bi", "angular", "relative_magnitude", "sequential", "reverse"]


def setup(assets: Path, eval_tokens: int):
    model, tok = load_model(str(assets / "models/smollm2-135m-instruct"), dtype=torch.float32,
                            device=torch.device("cpu"))
    cal = tokenize_documents(tok, load_local_texts(assets / "books/austen-emma.txt"), 200_000)
    batches = calibration_batches(cal, samples=32, seq_len=256, seed=0, batch_size=4)
    ev = tokenize_documents(tok, load_local_texts(assets / "books/austen-prideprejudice.txt"), eval_tokens)
    return model, batches, ev


def pruned_ppl(model, remove: list[int], tokens) -> float:
    pruned = copy.deepcopy(model)
    remove_layers(pruned, remove)
    return perplexity(pruned, tokens, seq_len=1024, batch_size=4, progress=False).ppl


def run(assets: Path, ks: list[int], metrics: list[str], eval_tokens: int) -> dict:
    model, batches, ev = setup(assets, eval_tokens)
    start = time.perf_counter()
    scores = {m: score_layers(model, m, batches, progress=False) for m in metrics}
    score_s = time.perf_counter() - start
    base = perplexity(model, ev, seq_len=1024, batch_size=4, progress=False).ppl
    rows = [{"metric": m, "k": k, "removed": sorted(lowest(scores[m], k)),
             "ppl": pruned_ppl(model, lowest(scores[m], k), ev)} for k in ks for m in metrics]
    return {"baseline_ppl": base, "rows": rows, "scores": scores, "bi_order": lowest(scores["bi"], 30),
            "eval_tokens": int(ev.numel()), "scoring_s_all_metrics": score_s,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU"}


def markdown(result: dict, command: str) -> str:
    lines = ["# BI vs baselines on SmolLM2-135M-Instruct (30 layers)", "",
             f"Command: `{command}`  ", f"Machine: {result['machine']}; torch {result['versions']['torch']}, "
             f"transformers {result['versions']['transformers']}  ",
             f"Perplexity on the first {result['eval_tokens']} tokens of Austen (PG): Pride and Prejudice, "
             f"1,024-token windows; calibration 32 x 256 tokens of Austen (PG): Emma.  ",
             f"Baseline (30 layers): **{result['baseline_ppl']:.2f}**", "",
             "| k removed | metric | ppl | removed layers |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['k']} | {r['metric']} | {r['ppl']:.2f} | {r['removed']} |")
    lines += ["", f"BI order (least important first): {result['bi_order']}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--assets", type=Path, default=Path("../shared-cache"))
    ap.add_argument("--k", type=int, nargs="+", default=[4, 7, 9])
    ap.add_argument("--metrics", nargs="+", default=METRICS)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    result = run(args.assets, args.k, args.metrics, args.eval_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bi_vs_sequential.json").write_text(json.dumps(result, indent=2))
    cmd = "python benchmarks/bi_vs_sequential.py " + " ".join(
        f"--k {' '.join(map(str, args.k))}".split()) + f" --eval-tokens {args.eval_tokens}"
    (args.out / "bi_vs_sequential.md").write_text(markdown(result, cmd))
    print(markdown(result, cmd))


if __name__ == "__main__":
    main()

"""ShortGPT's central claim on the real small model: removing the k lowest-BI layers costs less
perplexity than removing the first k layers (sequential) or the last k (reverse). Also compared:
the per-layer angular distance and relative magnitude, and Gromov et al.'s angular_block (the
block of k consecutive layers with the lowest last-token angular distance, arXiv 2403.17887).

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
from compress.importance.angular_block import best_block, block_angular_distances, last_token_hidden_states
from compress.model_io import load_model
from compress.surgery import remove_layers

METRICS = ["bi", "angular_layer", "angular_block", "relative_magnitude", "sequential", "reverse"]


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


def block_choices(model, batches, ks: list[int]) -> dict[int, dict]:
    """angular_block for every k: one pass for the last-token states, then the block math per k."""
    states = last_token_hidden_states(model, batches, progress=False)
    out = {}
    for k in ks:
        d = block_angular_distances(states, k)
        first = best_block(d)
        out[k] = {"block": [first, first + k], "distance": d[first], "block_distances": d}
    return out


def run(assets: Path, ks: list[int], metrics: list[str], eval_tokens: int) -> dict:
    model, batches, ev = setup(assets, eval_tokens)
    start = time.perf_counter()
    layer_metrics = [m for m in metrics if m != "angular_block"]
    scores = {m: score_layers(model, m, batches, progress=False) for m in layer_metrics}
    blocks = block_choices(model, batches, ks) if "angular_block" in metrics else {}
    score_s = time.perf_counter() - start
    base = perplexity(model, ev, seq_len=1024, batch_size=4, progress=False).ppl

    def removed(m: str, k: int) -> list[int]:
        return list(range(*blocks[k]["block"])) if m == "angular_block" else lowest(scores[m], k)
    rows = [{"metric": m, "k": k, "removed": sorted(removed(m, k)), "ppl": pruned_ppl(model, removed(m, k), ev)}
            for k in ks for m in metrics]
    return {"baseline_ppl": base, "rows": rows, "scores": scores, "angular_block": blocks,
            "bi_order": lowest(scores["bi"], 30) if "bi" in scores else None,
            "eval_tokens": int(ev.numel()), "scoring_s_all_metrics": score_s,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU"}


def markdown(result: dict, command: str) -> str:
    lines = ["# BI vs angular distance and baselines on SmolLM2-135M-Instruct (30 layers)", "",
             f"Command: `{command}`  ", f"Machine: {result['machine']}; torch {result['versions']['torch']}, "
             f"transformers {result['versions']['transformers']}  ",
             f"Perplexity on the first {result['eval_tokens']} tokens of Austen (PG): Pride and Prejudice, "
             f"1,024-token windows; calibration 32 x 256 tokens of Austen (PG): Emma.  ",
             f"Baseline (30 layers): **{result['baseline_ppl']:.2f}**", "",
             "| k removed | metric | ppl | removed layers |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['k']} | {r['metric']} | {r['ppl']:.2f} | {r['removed']} |")
    lines += ["", f"BI order (least important first): {result['bi_order']}", ""]
    for k, b in result["angular_block"].items():
        lines.append(f"angular_block, n = {k}: block [{b['block'][0]}, {b['block'][1]}), d = {b['distance']:.4f}; "
                     f"d per start l: {[round(d, 4) for d in b['block_distances']]}  ")
    lines.append("")
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

"""Depth pruning by merging (SLM) vs removal (BI), and width pruning, on the real small model.

    python benchmarks/width_and_merge.py --assets ../shared-cache --out benchmarks/results

Calibration: Austen's Emma, 32 x 256 tokens for BI, heads and width; 10 x 128 tokens for SLM (its
reference setting: the threshold search runs the merged model once per candidate window, so the
calibration size multiplies its cost). SLM runs: the released reference code's configuration
(sample_cosine, reference walk, top rule) at its threshold 0.72, then the same with the paper's
merge rule. The JSON is rewritten after every SLM row (``complete: false`` until the end).
Perplexity on the first 16,384 tokens of Pride and Prejudice, 1,024-token windows. ``sample_cosine``: the reference's
similarity of each shallower model's final hidden states to the original's on the SLM calibration.
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
from compress.evaluate.memory import parameter_count
from compress.evaluate.perplexity import perplexity
from compress.importance import lowest, score_layers
from compress.importance.similarity import final_hidden_states, sample_cosine
from compress.model_io import load_model
from compress.stages.base import StageContext
from compress.stages.head_pruning import HeadPruning, HeadPruningConfig
from compress.stages.layer_merge import LayerMerge, LayerMergeConfig
from compress.stages.width_pruning import WidthPruning, WidthPruningConfig
from compress.surgery import remove_layers


REFERENCE = {"similarity": "sample_cosine", "walk": "reference", "merge_rule": "top"}  # SLM.py as released
# At its own threshold 0.72 the reference configuration removes exactly 7 layers of this model (as
# BI below), so no threshold search is needed for a same-depth comparison; a search costs ~10 walks.
SLM_CONFIGS = [
    ("reference code: sample_cosine, reference walk, top rule, threshold 0.72", {**REFERENCE, "threshold": 0.72}),
    ("sample_cosine, reference walk, delta_sum (paper rule), threshold 0.72",
     {**REFERENCE, "merge_rule": "delta_sum", "threshold": 0.72}),
]


def save(out: Path, rows: list[dict], complete: bool) -> None:
    result = {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "command": "python benchmarks/width_and_merge.py --assets ../shared-cache", "complete": complete,
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "width_and_merge.json").write_text(json.dumps(result, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=Path("../shared-cache"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--eval-tokens", type=int, default=16384)
    args = ap.parse_args()
    model, tok = load_model(str(args.assets / "models/smollm2-135m-instruct"), dtype=torch.float32,
                            device=torch.device("cpu"))
    cal = calibration_batches(tokenize_documents(tok, load_local_texts(args.assets / "books/austen-emma.txt"), 200_000),
                              32, 256, 0, 4)
    ev = tokenize_documents(tok, load_local_texts(args.assets / "books/austen-prideprejudice.txt"), args.eval_tokens)
    ctx = StageContext(cal, tok, torch.device("cpu"), list(range(30)), logging.getLogger("bench"), progress=False)
    slm_cal = calibration_batches(tokenize_documents(tok, load_local_texts(args.assets / "books/austen-emma.txt"),
                                                     200_000), 10, 128, 0, 10)
    slm_ctx = StageContext(slm_cal, tok, torch.device("cpu"), list(range(30)), logging.getLogger("bench"), progress=False)

    def ppl(m) -> float:
        return perplexity(m, ev, seq_len=1024, batch_size=4, progress=False).ppl

    original = final_hidden_states(model, slm_cal)

    def similarity(m) -> float:
        return sample_cosine(original, final_hidden_states(m, slm_cal))

    rows = [{"method": "baseline", "params_M": parameter_count(model) / 1e6, "ppl": ppl(model), "detail": ""}]
    bi = copy.deepcopy(model)
    removed = sorted(lowest(score_layers(bi, "bi", cal, progress=False), 7))
    remove_layers(bi, removed)
    rows.append({"method": "BI removal, 7 layers", "params_M": parameter_count(bi) / 1e6, "ppl": ppl(bi),
                 "sample_cosine": similarity(bi), "detail": f"removed {removed}"})
    for label, cfg in SLM_CONFIGS:
        m = copy.deepcopy(model)
        start = time.perf_counter()
        rec = LayerMerge(LayerMergeConfig(**cfg)).apply(m, slm_ctx)
        rows.append({"method": f"SLM merge ({label})", "params_M": parameter_count(m) / 1e6,
                     "ppl": ppl(m), "sample_cosine": similarity(m), "detail": f"removed {30 - m.config.num_hidden_layers}, "
                     f"groups {rec.details['merged_groups_original']}, threshold {rec.details['threshold']:.4f}, "
                     f"{time.perf_counter() - start:.0f} s", "config": cfg})
        print(rows[-1], flush=True)
        save(args.out, rows, complete=False)
    for name, stage in (("heads: 1 per KV group (9 -> 6 query heads)", HeadPruning(HeadPruningConfig(remove=3))),
                        ("heads: 1 of 3 KV groups (9/3 -> 6/2)", HeadPruning(HeadPruningConfig(remove=1, kv_groups=True))),
                        ("MLP width -25% (1536 -> 1152)", WidthPruning(WidthPruningConfig(fraction=0.25)))):
        m = copy.deepcopy(model)
        stage.apply(m, ctx)
        rows.append({"method": name, "params_M": parameter_count(m) / 1e6, "ppl": ppl(m), "detail": ""})
    save(args.out, rows, complete=True)
    for r in rows:
        print(f"| {r['method']} | {r['params_M']:.1f} | {r['ppl']:.2f} | {r['detail']} |")


if __name__ == "__main__":
    main()

"""Does chat-formatted calibration (``calibration.chat_template: true``) change the Block-Influence
order of an instruct model? BI (ShortGPT) of every layer of SmolLM2-135M-Instruct on the same
calibration windows, once as plain text and once with each window wrapped as a user turn of the
tokenizer's chat template (system prompt + user header first, cut back to seq_len tokens).

    nice -n 5 python benchmarks/chat_calibration.py --assets ../shared-cache --out benchmarks/results

Calibration as recipes/quickstart.yaml: 32 x 256 tokens of Austen's Emma, random offsets, seed 0.
Writes <out>/chat_calibration.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from scipy.stats import kendalltau

from compress.data.calibration import calibration_data, calibration_description
from compress.data.sources import CalibrationConfig
from compress.importance import lowest, score_layers
from compress.model_io import load_model

REMOVE = 7  # the quickstart removes 7 of 30 layers


def bi_scores(model, tokenizer, cal: CalibrationConfig) -> dict:
    batches = calibration_data(tokenizer, cal)
    start = time.perf_counter()
    scores = score_layers(model, "bi", batches, progress=False)
    return {"calibration": calibration_description(cal), "scores": scores,
            "order": lowest(scores, len(scores)), f"lowest_{REMOVE}": lowest(scores, REMOVE),
            "first_window_head": tokenizer.decode(batches[0]["input_ids"][0, :32]),
            "scoring_s": time.perf_counter() - start}


def compare(plain: dict, chat: dict) -> dict:
    tau, p = kendalltau(plain["scores"], chat["scores"])
    a, b = set(plain[f"lowest_{REMOVE}"]), set(chat[f"lowest_{REMOVE}"])
    return {"kendall_tau_bi_scores": tau, "kendall_p": p, f"lowest_{REMOVE}_overlap": len(a & b),
            f"lowest_{REMOVE}_only_plain": sorted(a - b), f"lowest_{REMOVE}_only_chat": sorted(b - a),
            "same_lowest_set": a == b}


def run(assets: Path, samples: int, seq_len: int) -> dict:
    model, tokenizer = load_model(str(assets / "models/smollm2-135m-instruct"), dtype=torch.float32,
                                  device=torch.device("cpu"))
    base = dict(path=str(assets / "books/austen-emma.txt"), samples=samples, seq_len=seq_len, seed=0,
                batch_size=4)
    plain = bi_scores(model, tokenizer, CalibrationConfig(**base))
    chat = bi_scores(model, tokenizer, CalibrationConfig(**base, chat_template=True))
    return {"model": "SmolLM2-135M-Instruct (30 layers)", "plain": plain, "chat_template": chat,
            "comparison": compare(plain, chat),
            "command": "nice -n 5 python " + " ".join(sys.argv),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, default=Path("../shared-cache"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    result = run(args.assets, args.samples, args.seq_len)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chat_calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    c = result["comparison"]
    for name in ("plain", "chat_template"):
        print(f"{name:14s} lowest {REMOVE}: {result[name][f'lowest_{REMOVE}']}  order: {result[name]['order']}")
    print(f"Kendall tau {c['kendall_tau_bi_scores']:.3f}; lowest-{REMOVE} overlap {c[f'lowest_{REMOVE}_overlap']}/{REMOVE}")


if __name__ == "__main__":
    main()

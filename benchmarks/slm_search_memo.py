"""SLM ``remove: N`` search with and without the merge-state memo, on the real small model.

    PYTHONPATH=. nice -n 10 python benchmarks/slm_search_memo.py --assets ../shared-cache

SmolLM2-135M-Instruct (30 layers, float32), ``layer_merge: {remove: 7}`` (sample_cosine, paper
walk, delta_sum; ``--search-steps``, default 14), its calibration 2 x 32 tokens of *Emma* (seed 0,
as benchmarks/real_1p5b.py's ``slm`` part). One run of ``LayerMerge.search`` with the memo and the
``SuffixRunner`` (what the stage does on the full-model path). "Before" is counted, not run: the
search without a memo meets the same merge states in the same order and measures each one it meets
with a full forward, so its forwards are the memo's lookups and its decoder-layer runs 30 per
forward (the memo is exact: tests/stages/test_layer_merge.py checks the same choice and counts on
tiny models). "After": states measured (forwards), decoder layers run by the suffix runner, wall.
(A timed run of the memo-less search was started and stopped: 3 of its walks took ~37 min on the
loaded box, load average ~15.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
import transformers

import compress.stages.layer_merge as lm
from compress.data.calibration import calibration_data
from compress.data.sources import CalibrationConfig
from compress.importance.similarity import final_hidden_states
from compress.importance.suffix import SuffixRunner
from compress.model_io import load_model
from compress.stages.layer_merge import LayerMerge, LayerMergeConfig, removed_count
from compress.surgery import decoder_layers

REPO = Path(__file__).resolve().parents[1]


class CountingMemo(dict):
    """A memo that counts lookups: one per candidate window a walk meets, i.e. the forwards the
    search without a memo would run (it measures every state it meets, in the same order)."""

    lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, default=Path(os.environ.get("COMPRESS_ASSETS", REPO.parent / "shared-cache")))
    ap.add_argument("--remove", type=int, default=7)
    ap.add_argument("--search-steps", type=int, default=14)
    ap.add_argument("--tiny", action="store_true", help="a random 30-layer Llama instead of SmolLM2 (counts only)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/slm_search_memo.json")
    args = ap.parse_args()
    if args.tiny:  # a random 30-layer Llama (hidden 64): the counts only, in seconds
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
            vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
            num_key_value_heads=2), dtype=torch.float32).eval()
        ids = torch.randint(1, 320, (2, 32), generator=torch.Generator().manual_seed(0))
        cal = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    else:
        model, tok = load_model(str(args.assets / "models/smollm2-135m-instruct"), dtype=torch.float32,
                                device=torch.device("cpu"))
        cal_cfg = CalibrationConfig(path=str(args.assets / "books/austen-emma.txt"), samples=2, seq_len=32, seed=0)
        cal = calibration_data(tok, cal_cfg)
    reference = final_hidden_states(model, cal)
    layers = len(decoder_layers(model))
    config = LayerMergeConfig(remove=args.remove, search_steps=args.search_steps)
    calls = []
    original = lm.final_hidden_states

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    lm.final_hidden_states = counted
    load0 = os.getloadavg()
    memo = CountingMemo()
    t0 = time.perf_counter()
    suffix = SuffixRunner(model, cal)
    threshold, windows = LayerMerge(config).search(model, cal, reference, logging.getLogger("bench"), memo=memo,
                                                   suffix=suffix)
    wall = time.perf_counter() - t0
    lm.final_hidden_states = original
    before = {"forwards": memo.lookups, "decoder_layers_run": memo.lookups * layers}
    after = {"forwards": len(memo), "full_forwards": len(calls), "decoder_layers_run": suffix.layer_calls,
             "wall_s": round(wall, 1)}
    result = {
        "command": f"PYTHONPATH=. nice -n 10 python benchmarks/slm_search_memo.py --assets ../shared-cache "
                   f"--search-steps {args.search_steps}" + (" --tiny --out ..." if args.tiny else ""),
        "model": ("random Llama, 30 layers, hidden 64 (seed 0)" if args.tiny
                  else "SmolLM2-135M-Instruct (30 layers, float32)"), "config": config.model_dump(),
        "calibration": "random ids, 2 x 32, seed 0" if args.tiny else "Austen (PG): Emma, 2 x 32 tokens, seed 0",
        "threshold": threshold, "windows": windows, "removed": removed_count(windows),
        "before_counted": before, "after": after,
        "forward_ratio": round(before["forwards"] / after["forwards"], 2),
        "decoder_layer_ratio": round(before["decoder_layers_run"] / after["decoder_layers_run"], 2),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "load_average_at_start": load0,
                    "load_average_at_end": os.getloadavg(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "machine", "command")}))


if __name__ == "__main__":
    main()

"""Healing after pruning on the real small model, and the heal loop's speed vs a plain loop.

Quality (``--quality``): SmolLM2-135M-Instruct through the pipeline (compress.pipeline.run_recipe),
perplexity and KL vs the baseline on the first 16,384 tokens of Pride and Prejudice (1,024-token
windows, as recipes/quickstart.yaml measures), heal text from other Austen novels:

    BI -7 -> heal -> GPTQ 4-bit        (rows: baseline, BI -7, + heal, + GPTQ)
    width -25% -> heal -> GPTQ 4-bit

Speed (``--speed``): tokens/s of compress.heal.loop.train vs a plain peft + torch loop (same pruned
model, LoRA config, windows, batch, loss compress.heal.loss.heal_loss and AdamW), alternated
A B A B ... so the shared machine's load hits both alike.

    PYTHONPATH=. python benchmarks/heal.py --assets ../shared-cache --quality --speed
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

BOOKS = ["austen-persuasion.txt", "austen-northangerabbey.txt", "austen-mansfieldpark.txt"]


def recipe(assets: Path, out: Path, prune: dict, heal: dict, gptq: bool, eval_tokens: int) -> dict:
    books = assets / "books"
    stages = [prune, {"heal": heal}] + ([{"gptq": {"bits": 4, "group_size": 64, "desc_act": False, "sym": True}}]
                                        if gptq else [])
    return {"model": str(assets / "models" / "smollm2-135m-instruct"), "dtype": "float32", "device": "cpu",
            "output": str(out),
            "calibration": {"path": str(books / "austen-emma.txt"), "samples": 32, "seq_len": 256, "seed": 0},
            "evaluate": {"after": ["baseline", "every_stage"],
                         "perplexity": {"path": str(books / "austen-prideprejudice.txt"), "seq_len": 1024,
                                        "max_tokens": eval_tokens},
                         "fidelity": {"top_k": 64}},
            "stages": stages, "save": [next(iter(stages[-1]))]}


def heal_options(assets: Path, a) -> dict:
    return {"calibration": {"dataset": "text", "data_files": [str(assets / "books" / b) for b in BOOKS],
                            "samples": a.steps * a.batch + a.val, "seq_len": a.seq_len, "sampling": "strided"},
            "validation_samples": a.val, "steps": a.steps, "batch_size": a.batch, "lr": a.lr, "rank": a.rank,
            "alpha": 2 * a.rank, "top_k": a.top_k, "lm_weight": a.lm_weight, "eval_every": max(1, a.steps // 4), "checkpoint_every": max(1, a.steps // 4)}


PRUNINGS = {"bi7": {"layer_removal": {"metric": "bi", "remove": 7}}, "width25": {"width_pruning": {"fraction": 0.25}}}


def quality(assets: Path, work: Path, a) -> dict:
    """One epoch of heal windows (steps x batch, plus the held-out ones) per pruning in ``a.prune``."""
    from compress.pipeline import run_recipe

    found = {}
    for name in a.prune:
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe(assets, work / name, PRUNINGS[name], heal_options(assets, a),
                                              not a.no_gptq, a.eval_tokens)))
        start, load = time.perf_counter(), os.getloadavg()
        report = run_recipe(path, progress=False)
        rows = [{k: r.get(k) for k in ("step", "layers", "params", "ppl", "kl_mean", "top1_agree", "stage_wall_s",
                                        "eval_wall_s", "weight_bytes")} for r in report["rows"]]
        heal = next(s for s in report["stages"] if s["name"] == "heal")["details"]
        base, pruned, healed = (r["ppl"] for r in rows[:3])
        found[name] = {"rows": rows, "wall_s": time.perf_counter() - start,
                       "heal": {k: heal[k] for k in ("steps", "tokens_seen", "train_s", "tokens_per_s", "wall_s",
                                                      "initial_val_kl", "final_val_kl", "teacher_store_bytes",
                                                      "trained_parameters", "lr", "lm_weight", "top_k")},
                       "ppl_gap_closed": (pruned - healed) / (pruned - base),
                       "kl_closed": (rows[1]["kl_mean"] - rows[2]["kl_mean"]) / rows[1]["kl_mean"],
                       "load_average_at_start": load, "load_average_at_end": os.getloadavg()}
        print(json.dumps({name: found[name]}, indent=1), flush=True)
    return found


def speed(assets: Path, work: Path, steps: int, repeats: int, seq_len: int) -> dict:
    """Our loop vs a plain peft + torch loop, alternated; tokens/s of each repeat."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.data.calibration import calibration_data
    from compress.data.sources import CalibrationConfig
    from compress.heal.adapters import target_names, wrap_lora
    from compress.heal.loop import Settings, train
    from compress.heal.loss import heal_loss
    from compress.heal.schedule import lr_factor, micro_batch
    from compress.heal.teacher import build_teacher_store, window_rows, windows_of
    from compress.stages.heal import PROJECTIONS
    from compress.surgery import remove_layers

    model_dir = assets / "models" / "smollm2-135m-instruct"
    tok = AutoTokenizer.from_pretrained(model_dir)
    cal = CalibrationConfig(dataset="text", data_files=[str(assets / "books" / b) for b in BOOKS],
                            samples=steps * 4, seq_len=seq_len, sampling="strided")
    windows = windows_of(calibration_data(tok, cal))
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    store = build_teacher_store(teacher, windows, work / "speed-teacher", 64, torch.device("cpu"), progress=False)
    remove_layers(teacher, [12, 13, 14, 15, 17, 25, 26])  # the quickstart's BI -7 (benchmarks/README.md)
    pruned = teacher
    index = list(range(windows.shape[0]))
    s = Settings(total_steps=steps, batch_size=4, grad_accum=1, lr=5e-4, warmup_steps=1, min_lr_ratio=0.0,
                 weight_decay=0.0, max_grad_norm=1.0, lm_weight=0.0, seed=0, eval_every=10**9,
                 checkpoint_every=10**9, autocast=None, fingerprint="speed")

    def lora_model():
        torch.manual_seed(0)
        m = copy.deepcopy(pruned)
        return wrap_lora(m, target_names(m, list(range(23)), PROJECTIONS), 16, 32, 0.05)

    def ours() -> float:
        m = lora_model()
        out = train(m, windows, index, [], store, s, Path(tempfile.mkdtemp(dir=work)), logging.getLogger("x"), False)
        return out["tokens_per_s"]

    def plain() -> float:  # what one writes by hand: peft model, AdamW, LambdaLR, the same loss and batches
        m = lora_model()
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, 1, steps))
        tokens, start = 0, time.perf_counter()
        for step in range(steps):
            chunk = micro_batch(step, len(index), 4, 0)
            ids = windows[chunk]
            rows = window_rows(store, chunk, windows.shape[1], ids.device)
            logits = m(input_ids=ids).logits[:, :-1].reshape(-1, m.config.vocab_size)
            heal_loss(logits, rows, 0.0)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens += ids.numel()
        return tokens / (time.perf_counter() - start)

    runs = {"ours": [], "plain": []}
    for _ in range(repeats):
        runs["ours"].append(ours())
        runs["plain"].append(plain())
        print(json.dumps(runs), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    pairs = [a / b for a, b in zip(runs["ours"], runs["plain"])]
    return {"steps_per_run": steps, "batch": f"4 x {seq_len} tokens", "repeats": repeats, "tokens_per_s": runs,
            "min_tokens_per_s": {k: min(v) for k, v in runs.items()}, "median_tokens_per_s": med,
            "max_tokens_per_s": {k: max(v) for k, v in runs.items()},
            "ratio_ours_over_plain": med["ours"] / med["plain"],
            "ratio_per_pair": {"min": min(pairs), "median": statistics.median(pairs), "max": max(pairs)},
            "note": ("tokens / seconds in optimizer steps: ours from train()'s own clock (its final checkpoint "
                     "write is outside it), plain around its whole loop; validation off in both")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--assets", type=Path, default=Path("../shared-cache"))
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--steps", type=int, default=100, help="heal optimizer steps (batch 4 x 256 tokens)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--lm-weight", type=float, default=0.0)
    ap.add_argument("--val", type=int, default=8, help="held-out heal windows")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="perplexity tokens of Pride and Prejudice")
    ap.add_argument("--prune", nargs="+", default=["bi7", "width25"], choices=sorted(PRUNINGS))
    ap.add_argument("--no-gptq", action="store_true")
    ap.add_argument("--speed-steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--speed-seq-len", type=int, default=256)
    ap.add_argument("--work", type=Path, default=None,
                    help="work folder (default: a new temporary one); a rerun there resumes each run from its state")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "heal.json")
    args = ap.parse_args()
    args.assets = args.assets.resolve()  # the recipes are written to a temporary folder
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="heal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    load = os.getloadavg()
    if args.speed:
        result["speed"] = speed(args.assets, work, args.speed_steps, args.repeats, args.speed_seq_len)
    if args.quality:
        settings = {k: v for k, v in vars(args).items() if k not in ("assets", "out", "work", "speed", "speed_steps",
                                                                      "repeats", "speed_seq_len")}
        found = quality(args.assets, work, args)
        for entry in found.values():  # each pruning keeps the settings and command it ran with
            entry["settings"] = settings
            entry["command"] = "PYTHONPATH=. python benchmarks/heal.py " + " ".join(os.sys.argv[1:])
        result["quality"] = {**result.get("quality", {}), **found}
        result.pop("quality_settings", None)
    import transformers
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
                         "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                      "python": platform.python_version()}}
    command = "PYTHONPATH=. python benchmarks/heal.py " + " ".join(os.sys.argv[1:])
    for part in ("speed", "quality"):
        if getattr(args, part):
            result[f"{part}_command"] = command
            result[f"{part}_machine"] = result["machine"]
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

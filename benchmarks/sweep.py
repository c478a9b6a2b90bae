"""Six compression stacks of the real small model as one sweep vs six separate runs (and on Ray).

Stacks (SmolLM2-135M-Instruct, CPU, float32; calibration 32 x 256 tokens of *Emma*; perplexity and
KL vs the baseline on the first 4,096 tokens of *Pride and Prejudice*, 1,024-token windows):
(``--samples``/``--max-tokens`` shrink both for a loaded box) baseline, BI -7 of 30 layers (~25%), BI -7 + GPTQ 4-bit (group 64), BI -7 + NF4, GPTQ 4-bit alone,
NF4 alone. One pass runs, in turn:

* ``separate``: the five stacks with stages as five `compress run`s of their equivalent recipes, plus
  `compress eval` of the model for the baseline stack (`compress run` needs a stage);
* ``sweep``: `compress sweep` of the six (local executor);
* ``ray``: the same sweep with ``--executor ray --num-cpus 2`` (a local Ray instance, 2 workers).

Pass 0 runs ``separate`` before ``sweep``, pass 1 the other way round, and so on. Each is a fresh
process with fresh output folders, timed as a whole (wall clock). Then: the sweep's
rows vs the separate runs' (identical except timings and process memory peaks?), the Ray rows vs the
local sweep's (largest relative difference), the wall-time ratios sweep / separate and ray / separate.

    PYTHONPATH=. python benchmarks/sweep.py --assets ../shared-cache --passes 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# timings, the process's memory peak and the checkpoint's size on disk (its compress.json names the recipe
# file) differ between two runs of the same recipe; every other key must be equal
TIMING = ("stage_wall_s", "eval_wall_s", "wall_s", "peak_memory_bytes", "disk_bytes")
LATENCY = ("prefill_ms", "decode_tok_s")
STACKS = ["baseline", "bi7", "bi7+gptq4", "bi7+nf4", "gptq4", "nf4"]


def sweep_body(assets: Path, out: Path, samples: int, max_tokens: int) -> dict:
    base = yaml.safe_load((REPO / "recipes" / "sweeps" / "quickstart-stacks.yaml").read_text())["base"]
    base = json.loads(json.dumps(base).replace("${COMPRESS_ASSETS:-../../../shared-cache}", str(assets)))
    base["calibration"]["samples"] = samples
    base["evaluate"]["perplexity"]["max_tokens"] = max_tokens
    return {"base": base, "output": str(out),
            "axes": {"depth": ["none", {"bi7": {"layer_removal": {"metric": "bi", "remove": 7}}}],
                     "quant": ["none", {"gptq4": {"gptq": {"bits": 4, "group_size": 64, "desc_act": False, "sym": True}}},
                               {"nf4": {"bnb4": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}}}]},
            "stacks": STACKS}


def timed(cmd: list[str], log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    with log.open("a") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")
    return wall


def strip(row: dict) -> dict:
    return {k: v for k, v in row.items()
            if k not in TIMING and not k.startswith(("checkpoint", *LATENCY))}


def one_pass(assets: Path, work: Path, index: int, samples: int, max_tokens: int, order: str) -> dict:
    from compress.sweep.spec import load_sweep

    here = work / f"pass{index}"
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir(parents=True)
    log = here / "log.txt"
    py = sys.executable
    files = {}
    for kind in ("sweep", "ray"):
        files[kind] = here / f"{kind}.yaml"
        files[kind].write_text(yaml.safe_dump(sweep_body(assets, here / f"{kind}-out", samples, max_tokens), sort_keys=False))
    sweep = load_sweep(files["sweep"])
    recipes = []
    for stack in sweep.stacks:
        if not stack.variants:
            continue
        data = sweep.recipe_data(stack.variants, saved=False)
        data["output"] = str(here / "separate" / stack.name)
        path = here / f"separate-{stack.name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        recipes.append((stack.name, path))
    base = sweep.base
    ppl = base["evaluate"]["perplexity"]
    load = {"start": os.getloadavg()}
    walls = {"separate": {}}
    eval_json = here / "separate-baseline.json"

    def separate() -> None:
        walls["separate"]["baseline"] = timed(
            [py, "-m", "compress.cli", "eval", base["model"], "--ppl", ppl["path"], "--seq-len", str(ppl["seq_len"]),
             "--max-tokens", str(ppl["max_tokens"]), "--dtype", "float32", "--device", "cpu", "--out", str(eval_json)],
            log)
        for name, path in recipes:
            walls["separate"][name] = timed([py, "-m", "compress.cli", "run", str(path), "--no-progress"], log)
        load["after_separate"] = os.getloadavg()

    def swept() -> None:
        walls["sweep"] = timed([py, "-m", "compress.cli", "sweep", str(files["sweep"]), "--no-progress"], log)
        load["after_sweep"] = os.getloadavg()

    for part in ((separate, swept) if order == "separate-first" else (swept, separate)):
        part()
    walls["ray"] = timed([py, "-m", "compress.cli", "sweep", str(files["ray"]), "--executor", "ray",
                          "--num-cpus", "2", "--no-progress"], log)
    load["end"] = os.getloadavg()
    separate_total = sum(walls["separate"].values())
    return {"order": order, "samples": samples, "max_tokens": max_tokens, "walls_s": walls,
            "separate_total_s": separate_total,
            "ratio_sweep_over_separate": walls["sweep"] / separate_total,
            "ratio_ray_over_separate": walls["ray"] / separate_total, "load_average": load,
            **compare(here, [name for name, _ in recipes])}


def compare(here: Path, stacks: list[str]) -> dict:
    """Rows of the sweep vs the separate runs (identical except timings?), Ray vs the local sweep."""
    identical, differences = {}, {}
    for name in stacks:
        a = json.loads((here / "sweep-out" / "runs" / name / "report.json").read_text())["rows"]
        b = json.loads((here / "separate" / name / "report.json").read_text())["rows"]
        diff = [k for ra, rb in zip(a, b) for k in strip(ra).keys() | strip(rb).keys() if strip(ra).get(k) != strip(rb).get(k)]
        identical[name] = len(a) == len(b) and not diff
        if diff:
            differences[name] = sorted(set(diff))
    eval_rows = json.loads((here / "separate-baseline.json").read_text())
    eval_row = eval_rows[0] if isinstance(eval_rows, list) else eval_rows
    sweep_rows = json.loads((here / "sweep-out" / "report.json").read_text())["rows"]
    ray_rows = json.loads((here / "ray-out" / "report.json").read_text())["rows"]
    base_row = next(r for r in sweep_rows if r["step"] == "baseline")
    identical["baseline (compress eval ppl)"] = eval_row.get("ppl") == base_row.get("ppl")
    rel, by = 0.0, {r["step"]: r for r in sweep_rows}
    for row in ray_rows:
        for k, v in strip(row).items():
            w = by[row["step"]].get(k)
            if isinstance(v, float) and isinstance(w, float) and w:
                rel = max(rel, abs(v - w) / abs(w))
    nodes = json.loads((here / "sweep-out" / "report.json").read_text())["nodes"]
    return {"rows_identical_except_timings": identical, "row_differences": differences,
            "ray_vs_local_max_relative_difference": rel,
            "stacks": [{k: r.get(k) for k in ("step", "layers", "weight_bytes", "bits", "ppl", "kl_mean", "top1_agree")}
                       for r in sweep_rows],
            "nodes": {n: {"wall_s": r.get("wall_s"), "reused": sorted({e["what"] for e in r.get("cache", []) if e["hit"]})}
                      for n, r in nodes.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", type=Path, default=REPO.parent / "shared-cache")
    ap.add_argument("--work", type=Path, default=Path("/tmp/compress-sweep-bench"))
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (256 tokens) of every stack")
    ap.add_argument("--max-tokens", type=int, default=4096, help="perplexity / KL tokens of every evaluation")
    ap.add_argument("--first-pass", type=int, default=0, help="index of the first pass (odd: sweep first)")
    ap.add_argument("--merge", action="store_true", help="add these passes to the passes already in --out")
    ap.add_argument("--reanalyze", action="store_true",
                    help="recompute the row comparisons of the passes in --out from their folders in --work")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sweep.json")
    a = ap.parse_args()
    import torch
    import transformers

    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    # pass 0 runs the separate runs first, pass 1 the sweep first, ... (drift hits both alike)
    if a.reanalyze:
        old = json.loads(a.out.read_text())
        passes = []
        for i, p in enumerate(old["passes"]):
            here = a.work / f"pass{p.get('index', i)}"
            passes.append({**p, **compare(here, [s for s in STACKS if s != "baseline"])})
    else:
        passes = [{"index": i, **one_pass(a.assets.resolve(), a.work, i, a.samples, a.max_tokens,
                                          "separate-first" if i % 2 == 0 else "sweep-first")}
                  for i in range(a.first_pass, a.first_pass + a.passes)]
        if a.merge and a.out.exists():
            passes = json.loads(a.out.read_text())["passes"] + passes
    result = {"passes": passes,
              "median_ratio_sweep_over_separate": sorted(p["ratio_sweep_over_separate"] for p in passes)[len(passes) // 2],
              "median_ratio_ray_over_separate": sorted(p["ratio_ray_over_separate"] for p in passes)[len(passes) // 2],
              "command": "PYTHONPATH=. python benchmarks/sweep.py " + " ".join(sys.argv[1:]),
              "note": "rows compared without timings, latency (prefill_ms, decode_tok_s), process memory peak and "
                      "disk size (the checkpoint's compress.json names its recipe file)",
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "ray": ray_version}}
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "passes"}, indent=1))
    for p in passes:
        print(json.dumps({k: p[k] for k in ("walls_s", "separate_total_s", "ratio_sweep_over_separate",
                                            "ratio_ray_over_separate", "rows_identical_except_timings")}, indent=1))


if __name__ == "__main__":
    main()

"""The second real model, Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers), on CPU: a small run.

Writes one recipe per part into ``--work`` and drives ``compress run`` on it; the report rows (size,
perplexity, KL vs the baseline, MMLU) go into ``--out`` (results/real_1p5b.json), one entry per
part, merged with the parts already there, so parts can be run one at a time::

    PYTHONPATH=. nice -n 10 python benchmarks/real_1p5b.py --assets ../shared-cache --parts bi_gptq
    PYTHONPATH=. nice -n 10 python benchmarks/real_1p5b.py --assets ../shared-cache --parts slm,mmlu5
    PYTHONPATH=. nice -n 10 python benchmarks/real_1p5b.py --assets ../shared-cache --parts gptq --work /tmp/real_1p5b_h

Parts (all bfloat16, the asset's dtype; calibration: random windows of *Emma*, seed 0):

* ``bi_gptq``: baseline, BI removal of 7 of 28 layers (25%), then GPTQ 4-bit group 128 (sym,
  no act-order) on the pruned model; perplexity + KL on *Pride and Prejudice*, MMLU 0-shot (its
  recorded try was stopped in GPTQ: see the results' notes; ``gptq`` is the same without MMLU);
* ``gptq``: baseline, BI -7, GPTQ 4-bit as above (calibration 8 x 256 tokens); perplexity + KL only;
* ``slm``: baseline, SLM (``layer_merge: {remove: 7}``, the same depth as BI: the threshold is
  bisected, at most 8 walks sharing one memo of measured merge states) with its own small
  calibration (2 x 32 tokens); perplexity + KL only (the baseline is re-measured: KL needs it in the
  same run; MMLU left out for CPU time);
* ``heal``: baseline, BI -7, then ``heal`` (LoRA r16, top-64 distillation toward the model as
  loaded, 8 steps x 1 window x 128 tokens of *Persuasion* + *Northanger Abbey*, consecutive
  windows, 2 more held out for validation; lr 1e-3); perplexity + KL after baseline and heal only;
* ``mmlu5``: baseline and BI removal of 7 layers, MMLU 5-shot on ``MMLU5_SUBJECTS`` only;
* ``sweep``: baseline, BI -7, BI -7 + heal, BI -7 + GPTQ 4-bit and SLM ``remove: 7`` as one ``compress sweep``
  (the stages of ``heal``, ``gptq`` and ``slm`` above; the baseline evaluated once, BI -7 made once).

MMLU: the offline test split only (no dev split), so ``shots: 5`` takes each subject's first 5
test rows as exemplars and scores the next (compress.evaluate.mmlu). Sizes are CPU-small on purpose
(see ``SIZES``); the full benchmark (whole MMLU, 2,048-token windows, 128 calibration samples)
needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = "models/qwen2.5-coder-1.5b-instruct"
SIZES = {
    "calibration": {"samples": 8, "seq_len": 256},  # BI scoring and GPTQ
    "slm_calibration": {"samples": 2, "seq_len": 32},  # one forward per candidate window
    # remove: 7 bisects the threshold, one walk (~27 forwards) per step; the walks share one memo of
    # the merge states they measured (compress.stages.layer_merge), so later walks cost only new states
    "slm_target": {"remove": 7, "search_steps": 8},
    # heal after BI -7: LoRA top-64 distillation, 8 steps x 1 window x 128 tokens of other Austen
    # novels (not Emma, the calibration text, nor Pride and Prejudice, the evaluation text)
    "heal": {"train_windows": 8, "validation_samples": 2, "seq_len": 128, "steps": 8, "batch_size": 1,
             "lr": 1.0e-3, "rank": 16, "alpha": 32, "top_k": 64},
    "perplexity": {"seq_len": 512, "max_tokens": 2048},
    "mmlu0": {"shots": 0, "limit": 1},  # 1 question per subject, all 57 subjects
    "mmlu5": {"shots": 5, "limit": 1},
}
# 10 subjects, every 6th of the 57 in alphabetical order (a fixed spread over the four areas)
MMLU5_SUBJECTS = ["abstract_algebra", "college_biology", "conceptual_physics", "high_school_biology",
                  "high_school_geography", "high_school_physics", "human_sexuality", "machine_learning",
                  "moral_scenarios", "philosophy"]
KEYS = ("step", "summary", "layers", "params", "bits", "weight_bytes", "disk_bytes", "bits_per_param", "ppl",
        "ppl_tokens", "kl_mean", "kl_median", "kl_p99", "top1_agree", "fidelity_positions", "mmlu", "mmlu_micro", "mmlu_questions", "mmlu_shots",
        "mmlu_exemplars", "stage_wall_s", "eval_wall_s")


def recipe(part: str, assets: Path, work: Path) -> dict:
    books = assets / "books"
    common = {
        "model": str(assets / MODEL), "dtype": "bfloat16", "device": "cpu", "output": str(work / part),
        "calibration": {"path": str(books / "austen-emma.txt"), "label": "Austen (PG): Emma", "seed": 0,
                        **SIZES["calibration"]},
        "save": [],
    }
    ppl = {"path": str(books / "austen-prideprejudice.txt"), "label": "Austen (PG): Pride and Prejudice",
           **SIZES["perplexity"]}
    mmlu0 = {"path": str(assets / "mmlu"), **SIZES["mmlu0"]}
    if part == "bi_gptq":
        return {**common, "evaluate": {"after": ["baseline", "every_stage"], "perplexity": ppl, "fidelity": {},
                                       "mmlu": mmlu0},
                "stages": [{"layer_removal": {"metric": "bi", "remove": 7}},
                           {"gptq": {"bits": 4, "group_size": 128, "sym": True, "desc_act": False}}],
                "save": ["gptq"]}  # its size on disk
    if part == "gptq":  # bi_gptq without MMLU (its first try ran out of time in GPTQ)
        return {**common, "evaluate": {"after": ["baseline", "every_stage"], "perplexity": ppl, "fidelity": {}},
                "stages": [{"layer_removal": {"metric": "bi", "remove": 7}},
                           {"gptq": {"bits": 4, "group_size": 128, "sym": True, "desc_act": False}}],
                "save": ["gptq"]}
    if part == "slm":
        own = {"path": str(books / "austen-emma.txt"), "label": "Austen (PG): Emma", "seed": 0,
               **SIZES["slm_calibration"]}
        # no MMLU here: on the shared box (load ~11) the first try's baseline MMLU alone ran past 20 min
        return {**common, "evaluate": {"after": ["baseline", "layer_merge"], "perplexity": ppl, "fidelity": {}},
                "stages": [{"layer_merge": {**SIZES["slm_target"], "calibration": own}}]}
    if part == "heal":
        h = SIZES["heal"]
        heal_text = {"dataset": "text", "data_files": [str(books / "austen-persuasion.txt"),
                                                       str(books / "austen-northangerabbey.txt")],
                     "label": "Austen (PG): Persuasion, Northanger Abbey", "samples": h["train_windows"] +
                     h["validation_samples"], "seq_len": h["seq_len"], "sampling": "strided"}
        # the BI -7 row is not re-measured (CPU time): bi_gptq and gptq hold it
        return {**common, "evaluate": {"after": ["baseline", "heal"], "perplexity": ppl, "fidelity": {}},
                "stages": [{"layer_removal": {"metric": "bi", "remove": 7}},
                           {"heal": {"calibration": heal_text, "validation_samples": h["validation_samples"],
                                     "method": "lora", "rank": h["rank"], "alpha": h["alpha"], "top_k": h["top_k"],
                                     "steps": h["steps"], "batch_size": h["batch_size"], "lr": h["lr"],
                                     "eval_every": 8, "checkpoint_every": 4}}]}
    if part == "mmlu5":
        return {**common, "evaluate": {"after": ["baseline", "layer_removal"],
                                       "mmlu": {"path": str(assets / "mmlu"), "subjects": MMLU5_SUBJECTS,
                                                **SIZES["mmlu5"]}},
                "stages": [{"layer_removal": {"metric": "bi", "remove": 7}}]}
    raise SystemExit(f"--parts: unknown part {part!r}; choose from bi_gptq, gptq, slm, heal, mmlu5, sweep")


def sweep_spec(assets: Path, work: Path) -> dict:
    """Part ``sweep``: the stacks the separate parts measure, as one `compress sweep` (baseline evaluated once,
    BI scores once, the BI -7 model made once for its three children): baseline, bi7, bi7+heal, bi7+gptq4, slm7."""
    base = {k: v for k, v in recipe("heal", assets, work).items() if k not in ("stages", "save", "output")}
    base["evaluate"] = {**base["evaluate"], "after": ["baseline", "every_stage"]}
    heal = recipe("heal", assets, work)["stages"][1]
    gptq = recipe("gptq", assets, work)["stages"][1]
    slm = recipe("slm", assets, work)["stages"][0]
    return {"base": base, "output": str(work / "sweep"),
            "axes": {"depth": [{"bi7": {"layer_removal": {"metric": "bi", "remove": 7}}}, {"slm7": slm}],
                     "after": ["none", {"heal": heal}, {"gptq4": gptq}]},
            "stacks": ["baseline", "bi7", "bi7+heal", "bi7+gptq4", "slm7"], "save": ["bi7+gptq4"]}


def run_sweep_part(assets: Path, work: Path) -> dict:
    spec = sweep_spec(assets, work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    command = [sys.executable, "-m", "compress.cli", "sweep", str(path), "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    report_path = work / "sweep" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"rows": [], "nodes": {}}
    rows = [{k: row[k] for k in ("stack", *KEYS) if k in row} for row in report["rows"]]
    nodes = {n: {k: r.get(k) for k in ("wall_s", "step_s", "reused", "done_before") if k in r}
             for n, r in report.get("nodes", {}).items()}
    stages = {}
    for stack in spec["stacks"]:
        one = work / "sweep" / "runs" / stack / "report.json"
        if one.exists():
            stages[stack] = [{**{k: s.get(k) for k in ("stage", "summary", "removed_layers", "wall_s")},
                              "details": {k: v for k, v in (s.get("details") or {}).items()
                                          if isinstance(v, (int, float, str, bool))}}
                             for s in json.loads(one.read_text()).get("stages", [])]
    return {"sweep": spec, "command": " ".join(["PYTHONPATH=.", *command[1:]]), "exit_code": proc.returncode,
            "wall_s": round(wall, 1), "rows": rows, "nodes": nodes, "stages": stages,
            "stderr_tail": proc.stderr.strip().splitlines()[-8:] if proc.returncode else []}


def machine() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    try:
        import gptqmodel
        versions["gptqmodel"] = gptqmodel.__version__
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "load_average_at_start": os.getloadavg(),
            "versions": versions}


def run_part(part: str, assets: Path, work: Path) -> dict:
    spec = recipe(part, assets, work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{part}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    command = [sys.executable, "-m", "compress.cli", "run", str(path), "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    report_path = work / part / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"rows": [], "stages": []}
    rows = [{k: row[k] for k in KEYS if k in row} for row in report["rows"]]
    stages = [{**{k: s.get(k) for k in ("stage", "summary", "removed_layers", "wall_s")},
               "details": {k: v for k, v in (s.get("details") or {}).items() if isinstance(v, (int, float, str, bool))}}
              for s in report.get("stages", [])]
    return {"recipe": spec, "command": " ".join(["PYTHONPATH=.", *command[1:]]), "exit_code": proc.returncode,
            "wall_s": round(wall, 1), "complete": report.get("complete", False), "rows": rows, "stages": stages,
            "stderr_tail": proc.stderr.strip().splitlines()[-5:] if proc.returncode else []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, default=Path(os.environ.get("COMPRESS_ASSETS", REPO.parent / "shared-cache")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/real_1p5b"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/real_1p5b.json")
    ap.add_argument("--parts", default="bi_gptq,slm,mmlu5")
    args = ap.parse_args()
    assets = args.assets.resolve()
    if not (assets / MODEL / ".fetched").exists():
        raise SystemExit(f"{assets / MODEL} absent: run `bash ../shared/assets/fetch.sh --only qwen15`")
    results = json.loads(args.out.read_text()) if args.out.exists() else {"parts": {}}
    results.update({"model": "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers; weights dequantized from "
                             "llama.cpp Q4_K_M, stored bfloat16)", "sizes": SIZES, "mmlu5_subjects": MMLU5_SUBJECTS})
    for part in args.parts.split(","):
        print(f"real_1p5b: running {part}", flush=True)
        run = run_sweep_part(assets, args.work) if part == "sweep" else run_part(part, assets, args.work)
        entry = {"machine": machine(), **run}
        if args.out.exists():  # another invocation may have written its parts meanwhile
            results["parts"] = json.loads(args.out.read_text())["parts"]
        results["parts"][part] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"real_1p5b: {part}: exit {entry['exit_code']}, {entry['wall_s']} s, rows "
              f"{[(r.get('stack', r['step']), r.get('ppl'), r.get('kl_mean'), r.get('mmlu')) for r in entry['rows']]}",
              flush=True)


if __name__ == "__main__":
    main()

"""GGUF stacks beside GPTQ and NF4 ones on the real small model, all on this CPU.

SmolLM2-135M-Instruct, three float stacks made by the pipeline (compress.pipeline.run_recipe):

    baseline | BI -7 (layer_removal remove: 7) | BI -7 + heal (a SHORT heal: --heal-steps, default 8 steps)

each exported by llama.cpp's own tools (compress.gguf.export.export_gguf) as f16, q8_0, q4_k_m and q4_k_m
with an importance matrix (llama-imatrix on the recipe's calibration windows; q8_0 gets none: llama.cpp's
quantize_q8_0 ignores it, ggml-quants.c ``(void)quant_weights; // not used``), and quantized in
transformers by GPTQ 4-bit (GPTQModel) and NF4 (bitsandbytes 4-bit) through the pipeline's own stages.

Per row: file size (GGUF file / checkpoint weights on disk), perplexity on the first --eval-tokens tokens
of Pride and Prejudice in --seq-len windows (the same token ids and windows for llama.cpp,
compress.gguf.evaluate.gguf_perplexity, and transformers, compress.evaluate.perplexity), decode tok/s
(llama.cpp: compress.gguf.evaluate.gguf_speed; transformers: compress.evaluate.latency.measure_latency;
same prompt/new-token counts, same threads), and for every GGUF `compress verify --engine llamacpp`'s
top-1 agreement and max |Δ logprob| against transformers on its float source (the numbers
compress/verify/agreement.py's GGUF thresholds come from).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python benchmarks/gguf.py --assets ../shared-cache --out benchmarks/results/gguf.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

# run as `python benchmarks/gguf.py`, this folder is sys.path[0], where this file would shadow llama.cpp's own
# `gguf` package (gguf-py, which the importance-matrix reader imports)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

QUANTS = [("f16", False), ("q4_k_m", False), ("q8_0", False), ("q4_k_m", True)]


def stacks(assets: Path, work: Path, a) -> dict[str, Path]:
    from compress.pipeline import run_recipe

    books = assets / "books"
    heal = {"calibration": {"dataset": "text", "data_files": [str(books / "austen-persuasion.txt")],
                            "samples": a.heal_steps * 4 + 4, "seq_len": 256, "sampling": "strided"},
            "validation_samples": 4, "steps": a.heal_steps, "batch_size": 4, "rank": 16, "alpha": 32,
            "eval_every": a.heal_steps, "checkpoint_every": a.heal_steps}
    base = assets / "models" / "smollm2-135m-instruct"
    if a.only == ["baseline"]:
        return {"baseline": base}
    stages = [{"layer_removal": {"metric": "bi", "remove": 7}}] + ([{"heal": heal}] if "bi7+heal" in a.only else [])
    body = {"model": str(base), "dtype": "float32", "device": "cpu",
            "output": str(work / "stack"), "calibration": calibration(assets), "evaluate": {"after": []},
            "stages": stages, "save": [next(iter(s)) for s in stages]}
    (work / "stack.yaml").write_text(yaml.safe_dump(body))
    t0 = time.perf_counter()
    run_recipe(work / "stack.yaml", progress=False)
    print(f"stacks built in {time.perf_counter() - t0:.0f} s", flush=True)
    ck = work / "stack" / "checkpoints"
    return {"baseline": base, "bi7": ck / "layer_removal", "bi7+heal": ck / "heal"}


CALIBRATION_SAMPLES = 32


def calibration(assets: Path) -> dict:
    return {"path": str(assets / "books" / "austen-emma.txt"), "samples": CALIBRATION_SAMPLES, "seq_len": 256,
            "seed": 0}


def gguf_rows(name: str, folder: Path, tokens: torch.Tensor, work: Path, a, assets: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from compress.data.calibration import calibration_data
    from compress.data.sources import CalibrationConfig
    from compress.gguf.calibration import window_texts
    from compress.gguf.evaluate import gguf_perplexity, gguf_speed
    from compress.gguf.export import export_gguf
    from compress.verify.verify import VerifyOptions, verify_checkpoints

    tok = AutoTokenizer.from_pretrained(folder)
    cal = CalibrationConfig(**calibration(assets))
    texts = window_texts(tok, calibration_data(tok, cal))
    rows = []
    for quant, imx in QUANTS:
        out = work / f"{name}-{quant}{'-imatrix' if imx else ''}.gguf"
        t0 = time.perf_counter()
        done = export_gguf(folder, quant, out, imatrix_text=texts if imx else None,
                           imatrix_info={"data": f"austen-emma.txt, {cal.samples} x 256-token windows"} if imx else None,
                           imatrix_ctx=cal.seq_len)
        export_s = time.perf_counter() - t0
        ppl = gguf_perplexity(out, tokens, a.seq_len, None)
        speed = gguf_speed(out, a.prompt_tokens, a.new_tokens, a.repeats, threads=torch.get_num_threads())
        [v] = verify_checkpoints([out], VerifyOptions(engine="llamacpp", reference=folder, tokens=a.verify_tokens))
        row = {"stack": name, "format": "gguf", "quant": quant + (" + imatrix" if imx else ""),
               "bytes": done.bytes, **ppl, "decode_tok_s": speed["decode_tok_s"], "prefill_ms": speed["prefill_ms"],
               "export_s": round(export_s, 1), "verify_ok": v.ok,
               "verify_same_tokens": v.verdict.same_tokens if v.verdict else None,
               "verify_top1": v.verdict.top1_agree if v.verdict else None,
               "verify_max_dlogp": v.verdict.max_dlogp if v.verdict else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
        a.progress(row)
        out.unlink()
    return rows


def hf_rows(name: str, folder: Path, work: Path, a, assets: Path) -> list[dict]:
    """The float stack in transformers, then GPTQ 4-bit and NF4 of it, through the pipeline's stages and
    rows (perplexity on the same windows, decode speed with plain generate)."""
    from compress.pipeline import run_recipe

    evaluate = {"perplexity": {"path": str(assets / "books" / "austen-prideprejudice.txt"), "seq_len": a.seq_len,
                               "max_tokens": a.eval_tokens},
                "efficiency": {"prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "repeats": a.repeats,
                               "fast_path": False}}
    rows = []
    if a.no_hf_quant:
        return [float_row(name, folder, a, assets)]
    for quant, stage, after in (("gptq 4-bit g64", {"gptq": {"bits": 4, "group_size": 64, "desc_act": False,
                                                            "sym": True}}, ["baseline", "every_stage"]),
                                ("nf4 (bnb4)", {"bnb4": {"quant_type": "nf4", "double_quant": True,
                                                         "compute_dtype": "float32"}}, ["every_stage"])):
        kind = next(iter(stage))
        body = {"model": str(folder), "dtype": "float32", "device": "cpu", "output": str(work / f"{name}-{kind}"),
                "calibration": calibration(assets), "evaluate": {"after": after, **evaluate},
                "stages": [stage], "save": [kind]}
        path = work / f"{name}-{kind}.yaml"
        path.write_text(yaml.safe_dump(body))
        t0 = time.perf_counter()
        try:
            report = run_recipe(path, progress=False)
        except Exception as e:  # recorded, never hidden
            rows.append({"stack": name, "format": "hf", "quant": quant, "error": f"{type(e).__name__}: {e}"[:500]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        for r in report["rows"]:
            is_q = r["step"] != "baseline"
            if not is_q and r.get("ppl") is None:
                continue  # the NF4 run does not evaluate its input (the GPTQ run's baseline row is that row)
            ck = work / f"{name}-{kind}" / "checkpoints" / kind
            row = {"stack": name, "format": "hf", "quant": quant if is_q else "float32 (transformers)",
                   "bytes": safetensors_bytes(ck) if is_q else r.get("weight_bytes"), "weight_bytes": r.get("weight_bytes"),
                   "ppl": r.get("ppl"), "ppl_tokens": r.get("ppl_tokens"), "decode_tok_s": r.get("decode_tok_s"),
                   "prefill_ms": r.get("prefill_ms"), "stage_wall_s": r.get("stage_wall_s"),
                   "run_wall_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            a.progress(row)
    return rows


def safetensors_bytes(folder: Path) -> int:
    """The checkpoint's weight files on disk (tokenizer and config files left out)."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def float_row(name: str, folder: Path, a, assets: Path) -> dict:
    """The float stack in transformers alone (when the GPTQ / NF4 runs are skipped)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.evaluate.latency import measure_latency
    from compress.evaluate.perplexity import perplexity
    from compress.evaluate.suite import PerplexityConfig, perplexity_tokens

    tok = AutoTokenizer.from_pretrained(folder)
    tokens = perplexity_tokens(tok, PerplexityConfig(path=str(assets / "books" / "austen-prideprejudice.txt"),
                                                     seq_len=a.seq_len, max_tokens=a.eval_tokens))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ppl = perplexity(model, tokens, a.seq_len, progress=False)
    lat = measure_latency(model, a.prompt_tokens, a.new_tokens, repeats=a.repeats)
    row = {"stack": name, "format": "hf", "quant": "float32 (transformers)",
           "bytes": safetensors_bytes(folder), "ppl": ppl.ppl, "ppl_tokens": ppl.tokens,
           "decode_tok_s": lat.decode_tok_s, "prefill_ms": lat.prefill_ms,
           "note": "GPTQ 4-bit and NF4 rows not run (--no-hf-quant)"}
    print(json.dumps(row), flush=True)
    a.progress(row)
    return row


def versions() -> dict:
    import gptqmodel
    import llama_cpp
    import transformers

    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except Exception as e:  # noqa: BLE001
        bnb = f"not importable: {e}"
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "llama-cpp-python": llama_cpp.__version__, "gptqmodel": gptqmodel.__version__, "bitsandbytes": bnb}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--assets", type=Path, default=Path("../shared-cache"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf.json"))
    p.add_argument("--heal-steps", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--verify-tokens", type=int, default=32)
    p.add_argument("--only", nargs="*", default=["baseline", "bi7", "bi7+heal"])
    p.add_argument("--calibration-samples", type=int, default=32, help="BI scores, GPTQ and the imatrix")
    p.add_argument("--no-hf-quant", action="store_true", help="skip the GPTQ and NF4 rows (recorded as not run)")
    a = p.parse_args()
    global CALIBRATION_SAMPLES
    CALIBRATION_SAMPLES = a.calibration_samples
    done: list[dict] = []

    def progress(row: dict) -> None:  # every row on disk as soon as it exists
        done.append(row)
        a.out.write_text(json.dumps({"partial": True, "rows": done}, indent=1))

    a.progress = progress
    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoTokenizer

    from compress.evaluate.suite import PerplexityConfig, perplexity_tokens

    assets = a.assets.resolve()
    started = time.time()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        work = Path(tmp)
        folders = stacks(assets, work, a)
        tok = AutoTokenizer.from_pretrained(folders["baseline"])
        tokens = perplexity_tokens(tok, PerplexityConfig(path=str(assets / "books" / "austen-prideprejudice.txt"),
                                                         seq_len=a.seq_len, max_tokens=a.eval_tokens))
        rows = []
        for name in a.only:
            if a.no_hf_quant:  # the float row first: the one every GGUF row is compared with
                rows += hf_rows(name, folders[name], work, a, assets)
            rows += gguf_rows(name, folders[name], tokens, work, a, assets)
            if not a.no_hf_quant:
                rows += hf_rows(name, folders[name], work, a, assets)
    result = {
        "what": "SmolLM2-135M-Instruct stacks (baseline, BI -7, BI -7 + heal) as GGUF (llama.cpp's converter and "
                "quantizer) and as GPTQ 4-bit / NF4 checkpoints (transformers), on this CPU",
        "command": " ".join([*(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ),
                             "PYTHONPATH=. python benchmarks/gguf.py", *sys.argv[1:]]),
        "settings": {"heal": f"{a.heal_steps} steps x batch 4 x 256 tokens of Persuasion (a SHORT heal, LoRA r16)",
                     "perplexity": f"first {a.eval_tokens} tokens of Pride and Prejudice, {a.seq_len}-token "
                                   "non-overlapping windows, the same token ids for llama.cpp and transformers",
                     "speed": f"prompt {a.prompt_tokens} random tokens, {a.new_tokens} greedy new tokens, median of "
                              f"{a.repeats}, batch 1, {torch.get_num_threads()} threads both engines; transformers "
                              "plain generate (no static cache)",
                     "calibration": f"austen-emma.txt, {a.calibration_samples} x 256-token windows, seed 0 (BI scores, GPTQ, "
                                       "imatrix)",
                     "verify": f"compress verify --engine llamacpp: 6 default prompts x {a.verify_tokens} greedy "
                               "tokens, transformers float32 on the float source",
                     "q8_0 imatrix": "not run: llama.cpp's quantize_q8_0 ignores the importance matrix "
                                     "(ggml-quants.c: (void)quant_weights; // not used)"},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "machine": machine(), "versions": versions(),
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "wall_s": round(time.time() - started), "rows": rows,
        "not_run": ([] if not a.no_hf_quant else ["GPTQ 4-bit and NF4 rows (--no-hf-quant)"])
                   + [f"stack {s}" for s in ("baseline", "bi7", "bi7+heal") if s not in a.only],
    }
    a.out.write_text(json.dumps(result, indent=1))
    print(table(rows))


def table(rows: list[dict]) -> str:
    out = ["| stack | format | quant | size MB | ppl | decode tok/s | verify top-1 / max Δ |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['stack']} | {r['format']} | {r['quant']} | – | – | – | {r['error'][:80]} |")
            continue
        v = (f"{r['verify_top1']:.3f} / {r['verify_max_dlogp']:.2f}" if r.get("verify_top1") is not None else "–")
        out.append(f"| {r['stack']} | {r['format']} | {r['quant']} | {r['bytes'] / 1e6:.1f} | {r['ppl']:.3f} | "
                   f"{r['decode_tok_s']:.1f} | {v} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()

"""Command line: thin wrappers that parse, call one library function, and print."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from compress.errors import CompressError
from compress.limits import MAX_COUNT, MAX_LIMIT, MAX_SAMPLES, MAX_SEED, MAX_SEQ_LEN, MAX_TOKENS

# Bounds of the numbers that reach torch: beyond them it overflows (a traceback) or runs forever.
SEQ_LEN = click.IntRange(2, MAX_SEQ_LEN)
TOKENS = click.IntRange(1, MAX_SEQ_LEN)
SEED = click.IntRange(0, MAX_SEED)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s compress: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_errors(fn):
    """CompressError -> one message and exit 1; Ctrl-C -> how to resume, exit 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CompressError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished steps are kept; run the same command again to resume",
                       err=True)
            sys.exit(130)
    return wrapper


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="compress")
def main(verbose: bool) -> None:
    """Make causal LMs smaller and faster: depth pruning + quantization, with measured costs."""
    _setup_logging(verbose)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True,
              help="Replace an output folder that holds another recipe's run (only once this run completes).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@user_errors
def run(recipe: Path, overwrite: bool, no_progress: bool) -> None:
    """Run a YAML RECIPE: stages, evaluation after each, checkpoints, report."""
    from compress.pipeline import run_recipe
    from compress.report import table

    report = run_recipe(recipe, overwrite=overwrite, progress=not no_progress)
    click.echo(table(report["rows"]))
    click.echo(f"\nreport: {Path(report['output']) / 'report.md'}")
    failed = [e for e in report.get("verify") or [] if e["ok"] is False]
    if failed:
        names = ", ".join(f"{e['checkpoint']} ({e['engine']}: {e['status']})" for e in failed)
        raise click.ClickException(f"serving check failed for {names}; the checkpoints and report are written, "
                                   "see report.md \"Serving checks\"")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@user_errors
def validate(recipe: Path) -> None:
    """Check a RECIPE (and the model's config) without loading any weights."""
    from compress.model_io import model_facts, read_config
    from compress.recipe import check_against_model, load_recipe
    from compress.run_folder import output_status

    r = load_recipe(recipe)
    facts = model_facts(read_config(r.model, r.revision, r.trust_remote_code))
    warnings = check_against_model(r, facts)
    if r.evaluate.tasks is not None:
        from compress.evaluate.tasks import task_manager

        task_manager(r.evaluate.tasks)  # the task names exist (lm-eval's index; no data is read)
    status = output_status(r.output, r.fingerprint())
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{recipe}: ok ({len(r.stages)} stage(s): {', '.join(s.name for s in r.stages)}; "
               f"model {facts.model_type} with {facts.num_layers} layers; output {r.output}: {status})")


@main.command()
@click.argument("model")
@click.option("--metric", default="bi", show_default=True,
              help="Layers: bi, angular_layer (alias angular), relative_magnitude, ppl_drop, sequential, "
                   "reverse; blocks: angular_block (needs --remove N); units: heads, heads_ablation, channels.")
@click.option("--remove", type=click.IntRange(min=1),
              help="angular_block: the block size n (prints d(x^l, x^l+n) for every start l).")
@click.option("--data", "data", help="Local .txt/.jsonl file or folder for calibration text.")
@click.option("--dataset", help="Hub dataset (pg19 or a hub id) instead of --data.")
@click.option("--split", default="validation", show_default=True)
@click.option("--samples", default=32, show_default=True, type=click.IntRange(1, MAX_SAMPLES))
@click.option("--seq-len", default=512, show_default=True, type=SEQ_LEN)
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--sampling", default="random", show_default=True, type=click.Choice(["random", "strided"]),
              help="Calibration windows: seeded random offsets, or consecutive from the start (ShortGPT's code).")
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Folder for scores.json and the plot.")
@click.option("--layerwise/--full", default=None,
              help="Keep weights on the CPU and run one layer at a time on --device "
                   "(default: only when the weights do not fit the device).")
@click.option("--allow-pickle-weights", is_flag=True,
              help="Also read pickle (.bin) weights, with torch.load(weights_only=True); default: safetensors only.")
@user_errors
def score(model, metric, remove, data, dataset, split, samples, seq_len, seed, sampling, dtype, device, out,
          layerwise, allow_pickle_weights) -> None:
    """Score every decoder layer of MODEL (no changes); prints a table, writes a plot."""
    from compress.scoring import score_model

    result = score_model(model, metric=metric, data=data, dataset=dataset, split=split,
                         samples=samples, seq_len=seq_len, seed=seed, dtype=dtype, device=device, out=out,
                         layerwise=layerwise, sampling=sampling, remove=remove, allow_pickle=allow_pickle_weights)
    click.echo(result if isinstance(result, str) else result.table())
    if out:
        click.echo(f"\nscores: {out / 'scores.json'}")
        plot = out / f"{getattr(result, 'metric', metric)}-scores.png"
        if plot.exists():
            click.echo(f"plot: {plot}")


@main.command(name="eval")
@click.argument("model")
@click.option("--ppl", "ppl", help="Perplexity text: pg19, a hub dataset id, or a local .txt/.jsonl file or folder.")
@click.option("--ppl-split", default="test", show_default=True)
@click.option("--seq-len", default=2048, show_default=True, type=SEQ_LEN)
@click.option("--max-tokens", default=1_000_000, show_default=True, type=click.IntRange(2, MAX_TOKENS))
@click.option("--mmlu", "mmlu", help="MMLU: a local folder (CSV layout) or JSONL file, or a hub id (cais/mmlu).")
@click.option("--shots", default=5, show_default=True, type=click.IntRange(0, 20))
@click.option("--limit", type=click.IntRange(1, MAX_LIMIT),
              help="MMLU: questions per subject; --tasks: documents per task.")
@click.option("--tasks", "tasks", help="lm-eval tasks, comma-separated (arc_easy,hellaswag); `lm-eval ls tasks` lists them.")
@click.option("--num-fewshot", type=click.IntRange(0, 1000), help="--tasks: few-shot examples (default: each task's own).")
@click.option("--include-path", type=click.Path(), help="--tasks: a folder of your own lm-eval task YAML files.")
@click.option("--tasks-batch-size", default=8, show_default=True, type=click.IntRange(1, MAX_COUNT))
@click.option("--efficiency", is_flag=True, help="Also measure prefill latency and decode tokens/s.")
@click.option("--prompt-tokens", default=512, show_default=True, type=TOKENS)
@click.option("--new-tokens", default=128, show_default=True, type=click.IntRange(2, MAX_SEQ_LEN))
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write the result row as JSON here.")
@click.option("--allow-pickle-weights", is_flag=True,
              help="Also read pickle (.bin) weights, with torch.load(weights_only=True); default: safetensors only.")
@user_errors
def evaluate(model, ppl, ppl_split, seq_len, max_tokens, mmlu, shots, limit, tasks, num_fewshot, include_path,
             tasks_batch_size, efficiency, prompt_tokens, new_tokens, dtype, device, out,
             allow_pickle_weights) -> None:
    """Evaluate any MODEL (hub id or folder, ours or not): size, perplexity, MMLU, lm-eval tasks, latency."""
    from compress.evaluate.suite import (EfficiencyConfig, evaluate_model, mmlu_source, perplexity_source,
                                         tasks_source)
    from compress.report import table

    source = perplexity_source(ppl, ppl_split, seq_len, max_tokens) if ppl is not None else None
    eff = EfficiencyConfig(prompt_tokens=prompt_tokens, new_tokens=new_tokens) if efficiency else None
    mm = mmlu_source(mmlu, shots, limit) if mmlu is not None else None
    lm_tasks = tasks_source(tasks, num_fewshot, limit, tasks_batch_size, include_path)
    row = evaluate_model(model, ppl=source, efficiency=eff, mmlu=mm, tasks=lm_tasks, dtype=dtype, device=device,
                         out=out, allow_pickle=allow_pickle_weights)
    click.echo(table([row]))


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("compare"), show_default=True,
              help="Folder for compare.md, compare.json and the plots.")
@user_errors
def compare(runs, out) -> None:
    """Compare RUNS (folders of `compress run`): one table, Pareto plots of quality vs memory."""
    from compress.compare import compare_runs

    click.echo(compare_runs(list(runs), out))
    click.echo(f"\nwritten: {out / 'compare.md'}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@user_errors
def inspect(checkpoint: Path) -> None:
    """Show the provenance of a CHECKPOINT written by compress (compress.json)."""
    from compress.report import describe_provenance, read_provenance

    click.echo(describe_provenance(checkpoint, read_provenance(checkpoint)))


@main.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--engine", default="vllm", show_default=True, type=click.Choice(["vllm", "transformers", "llamacpp"]),
              help="vllm: vLLM from its own environment (--python); transformers: plain from_pretrained in a "
                   "fresh process (--python picks another transformers, e.g. vLLM's); llamacpp: GGUF files "
                   "in llama.cpp (llama-cpp-python), against the HF folder they came from.")
@click.option("--reference", type=click.Path(path_type=Path),
              help="llamacpp: the float HF checkpoint the GGUF files were made from (default: the one their "
                   "<file>.gguf.compress.json records).")
@click.option("--python", "python", help="Python of the engine's environment (default for vllm: "
                                         "$COMPRESS_VLLM_PYTHON; build one with `bash scripts/vllm-env.sh`).")
@click.option("--prompts", "prompts", type=click.Path(path_type=Path),
              help="Prompts: a .txt file (one per line, \\n for a newline) or .jsonl with a \"prompt\" field.")
@click.option("--tokens", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="Greedy tokens generated per prompt.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Both sides' dtype; auto: float32 for float checkpoints, bfloat16 for quantized ones.")
@click.option("--min-top1", type=click.FloatRange(0, 1), help="Quantized: least top-1 agreement (default 0.85; GGUF q8_0 0.90, lower quants 0.75).")
@click.option("--max-dlogp", type=click.FloatRange(0), help="Quantized: largest |Δ logprob| (default 1.0; GGUF q8_0 1.5, lower quants 3.0).")
@click.option("--engine-log", type=click.Path(path_type=Path), help="Keep the engine's own log in this file.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the results as JSON here.")
@user_errors
def verify(checkpoints, engine, reference, python, prompts, tokens, dtype, min_top1, max_dlogp, engine_log,
           json_out) -> None:
    """Load CHECKPOINTS (folders; GGUF files for llamacpp) in a serving engine and compare its greedy tokens with
    transformers' (exit 1 if any differs)."""
    import json as _json

    from compress.model_io import write_atomic
    from compress.verify.verify import VerifyOptions, read_prompts, table, verify_checkpoints

    options = VerifyOptions(engine=engine, python=python, tokens=tokens, dtype=dtype, engine_log=engine_log,
                            reference=reference)
    if prompts is not None:
        options.prompts = read_prompts(prompts)
    if min_top1 is not None:
        options.min_top1 = min_top1
    if max_dlogp is not None:
        options.max_dlogp = max_dlogp
    results = verify_checkpoints(list(checkpoints), options)
    click.echo(table(results))
    if json_out is not None:
        write_atomic(json_out, _json.dumps([r.to_json() for r in results], indent=2))
    if not all(r.ok for r in results):
        sys.exit(1)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="gguf", show_default=True, type=click.Choice(["gguf"]),
              help="gguf: llama.cpp / Ollama / LM Studio, made by llama.cpp's own converter and quantizer.")
@click.option("--quant", default="q4_k_m", show_default=True,
              help="f32, f16, bf16 (converter) or q8_0, q6_k, q5_k_m, q5_k_s, q5_0, q4_k_m, q4_k_s, q4_0, q3_k_m, "
                   "q3_k_s, q3_k_l, q2_k, iq4_xs, iq4_nl (llama.cpp's quantizer).")
@click.option("--imatrix", is_flag=True,
              help="Quantize with an importance matrix (llama-imatrix) from the calibration text of the recipe "
                   "that made CHECKPOINT (its compress.json), or from --imatrix-data.")
@click.option("--imatrix-data", type=click.Path(path_type=Path),
              help="Local .txt/.jsonl file or folder for the importance matrix (implies --imatrix).")
@click.option("--imatrix-samples", type=click.IntRange(1, MAX_SAMPLES),
              help="Chunks for the importance matrix (default: the recipe's calibration samples, else 128).")
@click.option("--imatrix-seq-len", type=click.IntRange(16, MAX_SEQ_LEN),
              help="Tokens per chunk (default: the recipe's calibration seq_len, else 512).")
@click.option("--out", type=click.Path(path_type=Path), help="The .gguf file (default: <CHECKPOINT>-<quant>.gguf beside it).")
@user_errors
def export(checkpoint, fmt, quant, imatrix, imatrix_data, imatrix_samples, imatrix_seq_len, out) -> None:
    """Write CHECKPOINT (a float HF folder) as a GGUF file, converted and quantized by llama.cpp's own tools."""
    from compress.gguf.export import export_gguf
    from compress.gguf.calibration import imatrix_texts

    texts = info = None
    ctx = 512
    if imatrix or imatrix_data is not None:
        texts, info, ctx = imatrix_texts(checkpoint, imatrix_data, imatrix_samples, imatrix_seq_len)
    done = export_gguf(checkpoint, quant, out, imatrix_text=texts, imatrix_info=info, imatrix_ctx=ctx)
    click.echo(f"{done.path}: {done.quant}, {done.bytes / 1e6:.1f} MB"
               + (f", importance matrix from {info['data']}" if info else ""))
    click.echo(f"provenance: {done.path}.compress.json; check it: compress verify {done.path} --engine llamacpp")


@main.command()
@click.argument("sweep_file", type=click.Path(path_type=Path))
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: this process, node after node; ray: one Ray task per node of the tree.")
@click.option("--address", help="Ray cluster to join (auto, or host:port); default: start a local Ray instance.")
@click.option("--num-cpus", type=click.IntRange(1, 4096), help="CPUs of the local Ray instance (default: all).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@user_errors
def sweep(sweep_file: Path, executor: str, address, num_cpus, no_progress: bool) -> None:
    """Run every stack of a SWEEP_FILE, sharing the work stacks have in common; write the sweep report."""
    from compress.report import table
    from compress.sweep import run_sweep

    report = run_sweep(sweep_file, executor, address, num_cpus, progress=not no_progress)
    click.echo(table(report["rows"]) if report["rows"] else "(no stack finished)")
    click.echo(f"\nreport: {Path(report['output']) / 'report.md'}")


@main.command()
@click.argument("sweep_run", type=click.Path(path_type=Path))
@click.option("--budget", "budgets", multiple=True,
              help="KEY<=N or KEY>=N on a stack's row, e.g. weight_mib<=300, decode_tok_s>=20 (repeatable).")
@click.option("--objective", default="ppl", show_default=True,
              help="ppl, kl, top1, mmlu, or an lm-eval task the sweep measured (arc_easy, tasks.arc_easy.acc).")
@click.option("--refine", is_flag=True, help="Also run the best stack's neighbours (remove k-1, k+1), then search again.")
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="Where --refine runs the new stacks.")
@click.option("--address", help="Ray cluster for --refine (auto, or host:port).")
@user_errors
def search(sweep_run: Path, budgets, objective: str, refine: bool, executor: str, address) -> None:
    """The best stack of a SWEEP_RUN (a sweep's output folder) within the budgets, and the Pareto front."""
    from compress.sweep import run_search

    result = run_search(sweep_run, list(budgets), objective, refine, executor, address)
    if result["best"]:
        click.echo(f"best within {', '.join(result['budgets']) or 'no budget'}: {result['best']} "
                   f"({result['key']} = {result['best_value']:.4g})")
    else:
        click.echo(f"no stack meets {', '.join(result['budgets'])}: {result['why_none']}")
    click.echo(f"Pareto front (weight memory vs {result['key']}): {', '.join(result['pareto'])}")
    if result.get("refined"):
        click.echo(f"refined: ran {', '.join(result['refined'])}")
    click.echo(f"written: {Path(sweep_run) / 'search.json'}, {Path(sweep_run) / 'report.md'}")


if __name__ == "__main__":
    main()

"""The evaluations run after each step and by `compress eval`: each returns a flat metrics dict."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.data.local import text_files
from compress.data.sources import TextSource, load_texts, source_description, source_label
from compress.data.tokens import bos_token_id, tokenize_documents
from compress.errors import CompressError
from compress.limits import MAX_COUNT, MAX_LIMIT, MAX_SEQ_LEN, MAX_TOKENS
from compress.evaluate.latency import bandwidth_floor_share, copy_bandwidth, measure_latency
from compress.evaluate.memory import PeakMemory, parameter_count, weight_bytes
from compress.evaluate.perplexity import perplexity
from compress.evaluate.tasks import TasksConfig, run_tasks, task_manager
from compress.surgery import decoder_layers

log = logging.getLogger("compress")


class PerplexityConfig(TextSource):
    """Perplexity over the first ``max_tokens`` tokens in windows of ``seq_len`` every ``stride``
    (null: non-overlapping); ``bos_per_window``: each window is [BOS] + seq_len - 1 text tokens,
    the BOS not scored (compress.evaluate.perplexity)."""

    seq_len: int = Field(2048, ge=2, le=MAX_SEQ_LEN)
    stride: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(1_000_000, ge=2, le=MAX_TOKENS)
    batch_size: int = Field(1, ge=1)
    bos_per_window: bool = False

    @model_validator(mode="after")
    def _stride(self):
        if self.stride is not None and self.bos_per_window and self.stride > self.seq_len - 1:
            raise ValueError(f"stride ({self.stride}) must not exceed seq_len - 1 ({self.seq_len - 1}) with "
                             "bos_per_window: the BOS takes one of the seq_len positions")
        if self.stride is not None and self.stride > self.seq_len:
            raise ValueError(f"stride ({self.stride}) must not exceed seq_len ({self.seq_len})")
        return self


def perplexity_description(cfg: PerplexityConfig) -> str:
    """What the perplexity was measured on, for reports: the source (whatever its label) and windows."""
    stride = cfg.stride or (cfg.seq_len - 1 if cfg.bos_per_window else cfg.seq_len)
    bos = ", BOS per window" if cfg.bos_per_window else ""
    return f"{source_description(cfg)}; first {cfg.max_tokens} tokens, seq_len {cfg.seq_len}, stride {stride}{bos}"


class FidelityConfig(BaseModel):
    """KL / top-1 agreement / Δ log-prob vs the baseline on the perplexity text (same pass)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    top_k: int = Field(64, ge=1, le=1_000_000)  # baseline log-probs kept per position (+ a rest bucket)


class EfficiencyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_tokens: int = Field(512, ge=1, le=MAX_SEQ_LEN)  # tensor sizes: bounded so they cannot overflow
    new_tokens: int = Field(128, ge=2, le=MAX_SEQ_LEN)
    batch_size: int = Field(1, ge=1, le=MAX_COUNT)
    repeats: int = Field(5, ge=1)
    fast_path: bool = True  # also time decoding with a static KV cache


def nominal_bits(model) -> int:
    """The bit width a user would name: the quantizer's ``bits``, else the weights' float width."""
    quant = getattr(model.config, "quantization_config", None)
    if quant is not None:
        bits = quant.get("bits") if isinstance(quant, dict) else getattr(quant, "bits", None)
        if bits is None and (getattr(quant, "load_in_4bit", False) or (isinstance(quant, dict) and quant.get("load_in_4bit"))):
            bits = 4
        if bits is not None:
            return int(bits)
    return torch.finfo(next(model.parameters()).dtype).bits


class MMLUConfig(BaseModel):
    """MMLU as lm-eval's `mmlu` task: from the hub (``dataset``, e.g. cais/mmlu) or disk (``path``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str | None = None
    path: str | None = None
    shots: int = Field(5, ge=0, le=20)
    limit: int | None = Field(None, ge=1, le=MAX_LIMIT)  # questions per subject
    subjects: list[str] | None = None
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.dataset is None) == (self.path is None):
            raise ValueError("give exactly one of `dataset` (e.g. cais/mmlu) or `path` (local CSV folder or JSONL)")
        return self


def mmlu_questions(cfg: MMLUConfig):
    """(test questions by subject, dev questions by subject or {})."""
    from compress.data.mmlu import load_mmlu

    source, hub = (cfg.dataset, True) if cfg.dataset else (cfg.path, False)
    test = load_mmlu(source, "test", cfg.subjects, hub=hub)
    dev = load_mmlu(source, "dev", cfg.subjects, hub=hub) if cfg.shots else {}
    return test, dev


def mmlu_metrics(model, tokenizer, questions, cfg: MMLUConfig, progress: bool = True) -> dict[str, Any]:
    from compress.evaluate.mmlu import evaluate_mmlu

    test, dev = questions
    r = evaluate_mmlu(model, tokenizer, test, shots=cfg.shots, dev_by_subject=dev, limit=cfg.limit,
                      batch_size=cfg.batch_size, progress=progress)
    return {"mmlu": r.macro, "mmlu_micro": r.micro, "mmlu_questions": r.n_questions, "mmlu_shots": r.shots,
            "mmlu_exemplars": r.exemplar_source,
            "mmlu_per_subject": {s: acc for s, (_, n, acc) in r.per_subject.items() if n}}


def size_metrics(model) -> dict[str, Any]:
    """Layers, parameters, nominal bits, and bytes of weights as stored (bits per parameter)."""
    params, stored = parameter_count(model), weight_bytes(model)
    return {"layers": len(decoder_layers(model)), "params": params, "bits": nominal_bits(model),
            "weight_bytes": stored, "bits_per_param": 8 * stored / params}


def perplexity_source(ppl: str, split: str, seq_len: int, max_tokens: int) -> PerplexityConfig:
    """`compress eval --ppl`: a local file or folder if ``ppl`` exists or looks like a path, else a
    hub dataset id (pg19 or owner/name)."""
    is_path = Path(ppl).exists() or ppl.startswith(("/", "./", "../", "~"))
    if is_path and not Path(ppl).expanduser().exists():
        raise CompressError(f"--ppl: {ppl} does not exist")
    return PerplexityConfig(path=str(Path(ppl).expanduser().resolve()) if is_path else None,
                            dataset=None if is_path else ppl, split=split, seq_len=seq_len, max_tokens=max_tokens)


def mmlu_source(mmlu: str, shots: int, limit: int | None) -> MMLUConfig:
    """`compress eval --mmlu`: a local folder or JSONL file if it exists, else a hub id."""
    local = Path(mmlu).expanduser().exists()
    return MMLUConfig(path=str(Path(mmlu).expanduser().resolve()) if local else None,
                      dataset=None if local else mmlu, shots=shots, limit=limit)


def perplexity_tokens(tokenizer, cfg: PerplexityConfig) -> torch.Tensor:
    """The text's token stream (without special tokens where every window gets its own BOS)."""
    if cfg.bos_per_window:
        bos_token_id(tokenizer, "evaluate.perplexity")  # before the text is read
    max_chars = cfg.max_tokens * 12 if cfg.max_tokens else None
    tokens = tokenize_documents(tokenizer, load_texts(cfg, max_chars), cfg.max_tokens,
                                add_special_tokens=not cfg.bos_per_window)
    if tokens.numel() < 2:
        raise CompressError(f"perplexity needs at least 2 tokens, but {cfg.path or cfg.dataset} gives "
                            f"{tokens.numel()}: give more text")
    log.info("perplexity data: %d tokens of %s", tokens.numel(), source_label(cfg))
    return tokens


def perplexity_metrics(model, tokens: torch.Tensor, cfg: PerplexityConfig, device: torch.device,
                       progress: bool = True, layerwise: bool = False, observe=None,
                       bos: int | None = None) -> dict[str, Any]:
    """Perplexity and the peak memory it took (``observe``: see compress.evaluate.perplexity;
    ``bos``: the tokenizer's BOS id, used if ``cfg.bos_per_window``)."""
    if cfg.bos_per_window and bos is None:
        raise ValueError("bos_per_window: pass the tokenizer's bos_token_id")
    with PeakMemory(device) as peak:
        result = perplexity(model, tokens, cfg.seq_len, cfg.stride, cfg.batch_size, device, progress,
                            layerwise=layerwise, observe=observe, bos=bos if cfg.bos_per_window else None)
    data = source_label(cfg) + (" (BOS per window)" if cfg.bos_per_window else "")
    return {"ppl": result.ppl, "ppl_tokens": result.tokens, "ppl_data": data,
            "peak_memory_bytes": peak.peak_bytes, "peak_memory_kind": peak.kind}


def efficiency_metrics(model, cfg: EfficiencyConfig) -> dict[str, Any]:
    """Prefill / decode latency with plain generate, and with the fast path if asked for."""
    args = dict(prompt_tokens=cfg.prompt_tokens, new_tokens=cfg.new_tokens,
                batch_size=cfg.batch_size, repeats=cfg.repeats)
    plain = measure_latency(model, **args)
    out = {"prefill_ms": plain.prefill_ms, "prefill_ms_p90": plain.prefill_ms_p90,
           "decode_tok_s": plain.decode_tok_s, "decode_tok_s_p90": plain.decode_tok_s_p90,
           "latency_setting": f"P={cfg.prompt_tokens} N={cfg.new_tokens} B={cfg.batch_size}"}
    device = next(model.parameters()).device
    if device.type == "cuda":
        bandwidth = copy_bandwidth(device)
        out["copy_bandwidth_gb_s"] = bandwidth / 1e9
        out["bandwidth_floor_share"] = bandwidth_floor_share(
            weight_bytes(model), bandwidth, plain.decode_tok_s, cfg.batch_size)
    if cfg.fast_path:
        try:
            out["decode_tok_s_fast"] = measure_latency(model, **args, fast=True).decode_tok_s
        except Exception as e:  # reported in the row, never hidden
            out["fast_path_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("fast decode path failed, plain generate reported only: %s", out["fast_path_error"])
    return out


def tasks_source(names: str | None, num_fewshot: int | None, limit: int | None, batch_size: int,
                 include_path: str | None) -> TasksConfig | None:
    """`compress eval --tasks a,b`: lm-eval tasks; ``--include-path`` a folder of task YAML files.
    None without --tasks."""
    if names is None:
        given = [flag for flag, value in (("--num-fewshot", num_fewshot), ("--include-path", include_path))
                 if value is not None]
        if given:
            raise CompressError(f"{' and '.join(given)}: only used with --tasks (e.g. --tasks arc_easy)")
        return None
    if include_path is not None:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            raise CompressError(f"--include-path: {include_path} is not a folder (give the folder that holds "
                                "your lm-eval task YAML files)")
        include_path = str(folder.resolve())
    listed = [n.strip() for n in names.split(",") if n.strip()]
    if not listed:
        raise CompressError(f"--tasks: no task names in {names!r}; give lm-eval task names separated by commas, "
                            "e.g. --tasks arc_easy,hellaswag")
    try:
        return TasksConfig(names=listed, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                           include_path=include_path)
    except ValueError as e:  # pydantic's ValidationError: a name given twice
        raise CompressError(f"--tasks: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def evaluate_model(model: str, *, ppl: PerplexityConfig | None, efficiency: EfficiencyConfig | None,
                   mmlu: MMLUConfig | None = None, tasks: TasksConfig | None = None, dtype: str = "auto",
                   device: str = "auto", progress: bool = True, out: Path | None = None,
                   allow_pickle: bool = False) -> dict[str, Any]:
    """`compress eval`: size, perplexity, MMLU, lm-eval tasks and latency of any model (ours or
    not); with ``out`` the row is also written there as JSON. ``allow_pickle``: also read .bin
    weights (``--allow-pickle-weights``). Paths, the device, the model's position limit and the
    task names are checked before the model loads."""
    import json

    from compress.evaluate.memory import disk_bytes
    from compress.model_checks import positions_problem
    from compress.model_io import (PICKLE_FLAG_HINT, load_model, local_model_dir, read_config, resolve_device,
                                   resolve_dtype, write_atomic)
    from compress.paths import output_file

    local = local_model_dir(model)
    name = str(local) if local else model
    dev = resolve_device(device)
    if out is not None:
        output_file(out, "--out", [local] if local else [])
    if ppl is not None and ppl.path is not None:
        text_files(Path(ppl.path))
    config = read_config(name)
    max_positions = getattr(config, "max_position_embeddings", None)
    problems = [positions_problem("--seq-len", ppl.seq_len, max_positions) if ppl else None,
                positions_problem("--prompt-tokens + --new-tokens", efficiency.prompt_tokens + efficiency.new_tokens,
                                  max_positions) if efficiency else None]
    if any(problems):
        raise CompressError(f"model {name!r}: " + "; ".join(p for p in problems if p))
    manager = task_manager(tasks, "--tasks") if tasks is not None else None
    net, tokenizer = load_model(name, dtype=resolve_dtype(dtype, config), device=dev,
                                allow_pickle=allow_pickle, pickle_hint=PICKLE_FLAG_HINT)
    row: dict[str, Any] = {"step": Path(name).name, "model": name, **size_metrics(net)}
    if local:
        row["disk_bytes"] = disk_bytes(local)
    if ppl is not None:
        row.update(perplexity_metrics(net, perplexity_tokens(tokenizer, ppl), ppl, dev, progress,
                                       bos=tokenizer.bos_token_id))
    if mmlu is not None:
        row.update(mmlu_metrics(net, tokenizer, mmlu_questions(mmlu), mmlu, progress))
    if tasks is not None:
        row.update(run_tasks(net, tokenizer, tasks, manager, progress))
    if efficiency is not None:
        row.update(efficiency_metrics(net, efficiency))
    if out is not None:
        write_atomic(out, json.dumps(row, indent=2, default=str))
    return row

"""`compress verify`: does a serving engine load this checkpoint and compute what transformers computes?

For each checkpoint (any Hugging Face model folder, ours or not): tokenize the prompts with its tokenizer,
let the engine (vLLM in its own environment, or plain transformers in a fresh process) generate greedily,
then run transformers in this process on the same checkpoint and compare (``agreement.py``). The engine
runs once for all checkpoints of a call.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.errors import CompressError
from compress.model_io import checkpoint_config, quant_method
from compress.verify.agreement import (GGUF_FLOAT_TIE_NATS, QUANTIZED_MAX_DLOGP, QUANTIZED_MIN_TOP1, Verdict,
                                      gguf_thresholds, judge, prompt_agreement)
from compress.verify.engines import ENGINES, engine_python, engine_settings, no_engine_reason, run_engine
from compress.verify.reference import reference_outputs

log = logging.getLogger("compress")

DEFAULT_PROMPTS = (  # prose, facts, code, a list, dialogue: different parts of the vocabulary
    "The capital of France is",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "def fibonacci(n):\n",
    "The three primary colours are",
    "Once upon a time, in a small village by the sea,",
    "Q: What is the boiling point of water at sea level?\nA:",
)
MAX_PROMPTS = 64
DTYPES = ("auto", "float32", "bfloat16", "float16")
# vLLM runs GPTQ only in float16/bfloat16 ("torch.float32 is not supported for quantization method
# auto_gptq"); float checkpoints are compared in float32, where both engines should agree exactly
QUANTIZED_DTYPE, FLOAT_DTYPE = "bfloat16", "float32"


@dataclass
class Verification:
    """One checkpoint's result."""

    checkpoint: str
    engine: str
    engine_version: str | None
    dtype: str
    quantization: str | None  # quant_method from config.json, None for a float checkpoint
    ok: bool
    error: str | None = None  # the engine refused or crashed: its message
    verdict: Verdict | None = None
    load_s: float | None = None
    generate_s: float | None = None
    tokens: int = 0
    settings: dict[str, str] = field(default_factory=dict)  # engine environment variables it ran with
    reference: str | None = None  # llamacpp: the HF folder transformers ran (the GGUF's source)

    @property
    def status(self) -> str:
        if self.error is not None:
            return "refused"
        return "ok" if self.ok else "differs"

    def to_json(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "checkpoint": self.checkpoint, "engine": self.engine, "engine_version": self.engine_version,
            "dtype": self.dtype, "quantization": self.quantization, "reference": self.reference,
            "ok": self.ok, "status": self.status,
            "error": self.error, "settings": self.settings, "load_s": self.load_s, "generate_s": self.generate_s, "tokens": self.tokens,
            "same_tokens": v.same_tokens if v else None, "top1_agree": v.top1_agree if v else None,
            "max_dlogp": v.max_dlogp if v else None, "reasons": v.reasons if v else [],
            "prompts": [p.__dict__ for p in v.prompts] if v else [],
        }


@dataclass
class VerifyOptions:
    engine: str = "vllm"
    python: str | None = None
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    tokens: int = 16
    dtype: str = "auto"
    min_top1: float | None = None  # None: QUANTIZED_MIN_TOP1 (llamacpp: gguf_thresholds of the quant)
    max_dlogp: float | None = None
    timeout_s: float = 1800.0
    engine_log: Path | None = None
    reference: Path | None = None  # llamacpp: the HF folder a GGUF came from (default: its sidecar's record)


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: one per line (blank lines skipped), or JSONL with a ``prompt`` field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CompressError(f"--prompts {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                value = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError):
                raise CompressError(f"--prompts {path}, line {n}: expected a JSON object with a \"prompt\" "
                                    "string (or use a .txt file: one prompt per line)") from None
            if not isinstance(value, str) or not value.strip():
                raise CompressError(f"--prompts {path}, line {n}: \"prompt\" must be a non-empty string")
            line = value
        else:
            line = line.replace("\\n", "\n")
        prompts.append(line)
    if not prompts:
        raise CompressError(f"--prompts {path}: holds no prompt (one per line, or JSONL with \"prompt\")")
    if len(prompts) > MAX_PROMPTS:
        raise CompressError(f"--prompts {path}: {len(prompts)} prompts; at most {MAX_PROMPTS} (verification "
                            "needs a few, and every prompt costs engine and reference time)")
    return prompts


def checkpoint_kind(folder: Path) -> str | None:
    """quant_method of the checkpoint's config.json (None: float). Errors name the folder."""
    return quant_method(checkpoint_config(folder, "verify"))


def _dtype(requested: str, quantization: str | None) -> str:
    if requested != "auto":
        return requested
    return QUANTIZED_DTYPE if quantization else FLOAT_DTYPE


def stop_tokens(folder: Path, tokenizer) -> list[int]:
    """End-of-sequence ids: generation_config.json's eos_token_id (int or list), else the tokenizer's."""
    ids: list[int] = []
    try:
        gen = json.loads((folder / "generation_config.json").read_text())
        eos = gen.get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    except (OSError, ValueError, AttributeError):
        pass
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return ids


def _tokenize(folder: Path, prompts: list[str]) -> tuple[list[list[int]], list[int]]:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise CompressError(f"{folder}: cannot load its tokenizer ({str(e).splitlines()[0]}); verify needs the "
                            "tokenizer files beside the weights") from None
    ids = [tok(p).input_ids for p in prompts]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise CompressError(f"prompt {empty[0]} tokenizes to no tokens; give non-empty prompts")
    return ids, stop_tokens(folder, tok)


def verify_checkpoints(checkpoints: list[Path], options: VerifyOptions) -> list[Verification]:
    """Verify every checkpoint with one engine process; returns one Verification each."""
    if options.engine not in ENGINES:
        raise CompressError(f"--engine: {options.engine!r} is not one of {list(ENGINES)}")
    if options.dtype not in DTYPES:
        raise CompressError(f"--dtype: {options.dtype!r} is not one of {list(DTYPES)}")
    python = engine_python(options.engine, options.python)
    if python is None:
        raise CompressError(f"verify --engine {options.engine}: {no_engine_reason(options.engine)}")
    plans = []
    for folder in checkpoints:
        if options.engine == "llamacpp":
            plans.append(_gguf_plan(folder, options))
            continue
        if options.reference is not None:
            raise CompressError("--reference: only for --engine llamacpp (a GGUF file and the folder it came from)")
        quant = checkpoint_kind(folder)
        ids, stops = _tokenize(folder, options.prompts)
        plans.append({"path": str(folder), "dtype": _dtype(options.dtype, quant), "quant": quant,
                      "prompts": ids, "stop_token_ids": stops, "ref": str(folder)})
    result = run_engine(options.engine, python,
                        [{k: p[k] for k in ("path", "dtype", "prompts", "stop_token_ids")} for p in plans],
                        options.tokens, options.timeout_s, options.engine_log)
    by_path = {r["path"]: r for r in result["results"]}
    out = []
    for plan in plans:
        r = by_path[str(Path(plan["path"]).resolve())]
        if options.engine == "llamacpp":
            plan["quant"] = gguf_quant(plan.get("quant"), r.get("file_type"))
        v = Verification(checkpoint=plan["path"], engine=options.engine, engine_version=result.get("engine_version"),
                         dtype=plan["dtype"], quantization=plan["quant"], ok=False, tokens=options.tokens,
                         load_s=r.get("load_s"), generate_s=r.get("generate_s"),
                         settings=engine_settings() if options.engine == "vllm" else {},
                         reference=plan["ref"] if options.engine == "llamacpp" else None)
        if not r.get("ok"):
            v.error = r.get("error") or "the engine gave no result"
        else:
            v.verdict = _compare(Path(plan["path"]), plan, r["outputs"], options)
            v.ok = v.verdict.ok
        out.append(v)
    return out


def _compare(folder: Path, plan: dict[str, Any], outputs: list[dict[str, Any]], options: VerifyOptions) -> Verdict:
    dtype = getattr(torch, plan["dtype"])
    log.info("verify: transformers reference for %s (%s, %s, CPU)", plan["ref"], plan["quant"] or "float", plan["dtype"])
    ref = Path(plan["ref"])
    refs = reference_outputs(ref, dtype, plan["prompts"], outputs, plan.get("ref_quant", plan["quant"]))
    prompts = [prompt_agreement(i, e["tokens"], e["logprobs"], r["tokens"], r["forced_argmax"], r["forced_logprobs"],
                                r.get("forced_top_logprobs"))
               for i, (e, r) in enumerate(zip(outputs, refs))]
    top1, dlogp = QUANTIZED_MIN_TOP1, QUANTIZED_MAX_DLOGP
    if options.engine == "llamacpp" and plan["quant"] is not None:
        top1, dlogp = gguf_thresholds(plan["quant"])
    # a float GGUF holds 16-bit roundings of the source's weights: greedy tokens may part at near ties only
    tie = GGUF_FLOAT_TIE_NATS if options.engine == "llamacpp" and plan["quant"] is None else None
    return judge(prompts, quantized=plan["quant"] is not None,
                 min_top1=top1 if options.min_top1 is None else options.min_top1,
                 max_dlogp=dlogp if options.max_dlogp is None else options.max_dlogp, tie_nats=tie)


# llama_ftype values (llama.h) of GGUF files whose weights are plain floats
GGUF_FLOAT_FILE_TYPES = {0: "f32", 1: "f16", 32: "bf16"}


def gguf_quant(recorded: str | None, file_type: int | None) -> str | None:
    """None for a float GGUF (judged by exact tokens), else its quant name: the sidecar's record, else
    the file's general.file_type."""
    if recorded is not None:
        return None if recorded in GGUF_FLOAT_FILE_TYPES.values() else recorded
    if file_type is None:
        return "unknown"
    return None if int(file_type) in GGUF_FLOAT_FILE_TYPES else f"gguf file_type {file_type}"


def gguf_reference(path: Path, given: Path | None) -> tuple[Path, str | None]:
    """The HF folder a GGUF came from, and the quant its sidecar records (None: no sidecar)."""
    from compress.gguf.export import sidecar

    record = None
    if sidecar(path).is_file():
        try:
            record = json.loads(sidecar(path).read_text())
        except ValueError as e:
            raise CompressError(f"{sidecar(path)}: is not valid JSON ({e}); pass --reference HF_FOLDER") from None
    quant = record.get("quant") if isinstance(record, dict) else None
    if given is not None:
        return given, quant
    source = (record or {}).get("source", {}).get("folder") if isinstance(record, dict) else None
    if source is None:
        raise CompressError(f"{path}: no --reference and no {sidecar(path).name} beside it naming its source; "
                            "pass --reference HF_FOLDER (the float checkpoint the GGUF was made from)")
    folder = Path(source) if Path(source).is_absolute() else path.parent / source  # relative: to the GGUF's folder
    if not folder.is_dir():
        raise CompressError(f"{path}: its source folder {source} (from {sidecar(path).name}) does not exist any "
                            "more; pass --reference HF_FOLDER")
    return folder.resolve(), quant


def _gguf_plan(path: Path, options: VerifyOptions) -> dict[str, Any]:
    if not path.is_file() or path.suffix != ".gguf":
        raise CompressError(f"{path}: not a .gguf file; --engine llamacpp verifies GGUF files (made by "
                            "`compress export CHECKPOINT --format gguf`) against --reference HF_FOLDER")
    ref, quant = gguf_reference(path, options.reference)
    ref_quant = checkpoint_kind(ref)
    if ref_quant is not None:
        raise CompressError(f"--reference {ref}: a {ref_quant} checkpoint; a GGUF is compared with the float "
                            "checkpoint it was made from")
    ids, stops = _tokenize(ref, options.prompts)
    dtype = FLOAT_DTYPE if options.dtype == "auto" else options.dtype
    return {"path": str(path), "dtype": dtype, "quant": quant, "ref_quant": None, "prompts": ids,
            "stop_token_ids": stops, "ref": str(ref)}


def table(results: list[Verification]) -> str:
    """A short markdown table, then what differs or why the engine refused, per checkpoint."""
    lines = ["| checkpoint | kind | engine | dtype | result | same tokens | top-1 | max Δlogp | load s |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for v in results:
        d = v.verdict
        cells = [v.checkpoint, v.quantization or "float", f"{v.engine} {v.engine_version or ''}".strip(), v.dtype,
                 v.status, ("yes" if d.same_tokens else "no") if d else "–", f"{d.top1_agree:.3f}" if d else "–",
                 f"{d.max_dlogp:.4f}" if d else "–", f"{v.load_s:.1f}" if v.load_s is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
        if v.error:
            notes.append(f"{v.checkpoint}: {v.engine} refused it:\n    " + v.error.strip().replace("\n", "\n    "))
        elif d and d.reasons:
            notes.append(f"{v.checkpoint}: " + "; ".join(d.reasons))
    return "\n".join(lines + ([""] + notes if notes else []))


def verify_saved(folder: Path, names: list[str], engines: tuple[str, ...]) -> list[dict[str, Any]]:
    """A recipe's ``verify:``: every saved checkpoint (``folder/checkpoints/<name>``) in every engine.
    An engine with no configured environment is skipped with the reason, logged as a warning and kept
    in the result (never silently). Checkpoint paths in the result are relative to ``folder``."""
    checkpoints = [folder / "checkpoints" / n for n in names if (folder / "checkpoints" / n).is_dir()]
    out: list[dict[str, Any]] = []
    for engine in engines:
        python = engine_python(engine, None)
        if python is None:
            reason = no_engine_reason(engine)
            log.warning("verify: %s skipped: %s", engine, reason)
            out += [{"checkpoint": str(c.relative_to(folder)), "engine": engine, "status": "skipped", "ok": None,
                     "reason": reason} for c in checkpoints]
            continue
        for r in verify_checkpoints(checkpoints, VerifyOptions(engine=engine, python=python)):
            entry = r.to_json()
            entry["checkpoint"] = str(Path(r.checkpoint).relative_to(folder))
            out.append(entry)
            why = "" if r.ok else (r.error or "; ".join(r.verdict.reasons)).splitlines()[0]
            log.log(logging.INFO if r.ok else logging.ERROR, "verify: %s in %s: %s %s", entry["checkpoint"], engine,
                    r.status, why)
    return out


def markdown_rows(entries: list[dict[str, Any]]) -> list[str]:
    """report.md's "Serving checks" section."""
    lines = ["## Serving checks (`compress verify`)", "",
             "| checkpoint | engine | dtype | result | same tokens | top-1 | max Δlogp |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        if e["status"] == "skipped":
            lines.append(f"| {e['checkpoint']} | {e['engine']} | – | skipped: {e['reason'].split(';')[0]} | – | – | – |")
            continue
        same = "–" if e.get("same_tokens") is None else ("yes" if e["same_tokens"] else "no")
        top1 = "–" if e.get("top1_agree") is None else f"{e['top1_agree']:.3f}"
        dl = "–" if e.get("max_dlogp") is None else f"{e['max_dlogp']:.4f}"
        why = (e.get("error") or "; ".join(e.get("reasons") or [])).splitlines()
        lines.append(f"| {e['checkpoint']} | {e['engine']} {e.get('engine_version') or ''} | {e['dtype']} | "
                     f"{e['status']}{': ' + why[0] if why else ''} | {same} | {top1} | {dl} |")
    return lines + [""]

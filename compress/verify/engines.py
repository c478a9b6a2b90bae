"""Running a serving engine on checkpoints, in its own Python: vLLM's pins (torch, transformers) conflict
with compress's, so it lives in a separate virtual environment (``bash scripts/vllm-env.sh`` builds one)
and runs ``engine_worker.py`` there as a subprocess."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from compress.errors import CompressError

log = logging.getLogger("compress")

ENGINES = ("vllm", "transformers", "llamacpp")
PYTHON_ENV = "COMPRESS_VLLM_PYTHON"
WORKER = Path(__file__).with_name("engine_worker.py")
HOW_TO = ("build vLLM's environment once with `bash scripts/vllm-env.sh` (vLLM's CPU build; on a GPU "
          "machine `pip install vllm` into any venv) and pass its python with --python PATH or "
          f"{PYTHON_ENV}=PATH")


def engine_python(engine: str, python: str | None) -> str | None:
    """The interpreter that runs ``engine``: --python, else $COMPRESS_VLLM_PYTHON for vLLM, else
    this one for transformers. None: vLLM has no configured environment."""
    chosen = python or (os.environ.get(PYTHON_ENV) if engine == "vllm" else None)
    if chosen is None and engine == "llamacpp":  # llama-cpp-python installs into compress's own Python
        import importlib.util

        return sys.executable if importlib.util.find_spec("llama_cpp") is not None else None
    if chosen is None:
        return None if engine == "vllm" else sys.executable
    path = Path(chosen).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        source = "--python" if python else PYTHON_ENV
        raise CompressError(f"{source}: {chosen} is not an executable Python; {HOW_TO}")
    return str(path)


# vLLM's CPU build serves 4-bit GPTQ on CPUs with AMX as W4A8 (activations quantized to int8 on the fly,
# VLLM_CPU_INT4_W4A8=1 by default): another computation than the checkpoint's weight-only quantization
# (measured: top-1 0.80, max |Δ logprob| 1.66 vs transformers, where W4A16 gives 0.97 / 0.22). verify checks
# the checkpoint, so it asks for W4A16 unless the caller set the variable.
VLLM_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_INT4_W4A8": "0"}


# llama.cpp's OpenMP threads spin while they wait by default: on a box with more busy processes than
# cores one verify took over 25 min that way and about 6 min with PASSIVE (measured on the 2-core box)
LLAMACPP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def engine_settings(engine: str = "vllm") -> dict[str, str]:
    """The engine environment variables verify runs with (the caller's own values win)."""
    defaults = LLAMACPP_DEFAULTS if engine == "llamacpp" else VLLM_DEFAULTS
    return {k: os.environ.get(k, v) for k, v in defaults.items()}


def no_engine_reason(engine: str) -> str:
    if engine == "llamacpp":
        from compress.gguf.env import HOW_TO as GGUF_HOW_TO

        return f"llama-cpp-python is not installed in this Python; {GGUF_HOW_TO}"
    return f"no {engine} environment configured ({PYTHON_ENV} is not set); {HOW_TO}"


def run_engine(engine: str, python: str, checkpoints: list[dict[str, Any]], tokens: int,
               timeout_s: float, log_path: Path | None = None) -> dict[str, Any]:
    """Run the engine over all ``checkpoints`` (each ``{path, dtype, prompts, stop_token_ids}``) in one
    process, so that vLLM's start-up is paid once; a checkpoint that fails after the first is tried again
    alone in a fresh process (a second engine in one process can fail for reasons of its own, e.g. the
    previous engine's workers not yet gone), so that only a checkpoint the engine refuses on its own is
    reported as refused. The engine's own log goes to ``log_path`` (default: a temporary file, kept and
    named in the error when something fails, removed otherwise)."""
    keep = log_path is not None
    log_file = log_path or Path(tempfile.mkstemp(prefix=f"compress-verify-{engine}-", suffix=".log")[1])
    log.info("verify: %s (%s) on %d checkpoint(s), %d token(s) per prompt; engine log: %s",
             engine, python, len(checkpoints), tokens, log_file)
    result = _worker(engine, python, checkpoints, tokens, timeout_s, log_file, append=False)
    results = result["results"]
    for i, r in enumerate(results):
        if i > 0 and not r.get("ok"):
            log.info("verify: %s failed in the shared %s process; trying it alone", r["path"], engine)
            again = _worker(engine, python, [checkpoints[i]], tokens, timeout_s, log_file, append=True)
            results[i] = {**again["results"][0], "first_error": r.get("error")}
    if not keep and all(r.get("ok") for r in results):
        log_file.unlink(missing_ok=True)
    else:
        for r in results:
            if not r.get("ok"):
                causes = _error_lines(log_file, r["path"])
                r["error"] = (f"{r.get('error')}" + (f"\nfrom the engine's log:\n{causes}" if causes else "")
                              + f"\n(the engine's full log: {log_file})")
    return result


def _worker(engine: str, python: str, checkpoints: list[dict[str, Any]], tokens: int, timeout_s: float,
            log_file: Path, append: bool) -> dict[str, Any]:
    request = {"engine": engine, "tokens": tokens, "dtype": "auto",
               "checkpoints": [{**c, "path": str(Path(c["path"]).resolve())} for c in checkpoints]}
    with tempfile.TemporaryDirectory(prefix="compress-verify-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        env = {**os.environ, **engine_settings(engine), "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ""}
        with log_file.open("a" if append else "w") as f:
            try:
                proc = subprocess.run([python, str(WORKER), str(req), str(res)], stdout=f, stderr=subprocess.STDOUT,
                                      env=env, timeout=timeout_s, cwd=tmp)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
        result = json.loads(res.read_text()) if res.exists() else {"results": []}
    tail = _tail(log_file)
    done = {r["path"] for r in result.get("results", [])}
    for c in request["checkpoints"]:
        if c["path"] not in done:  # the engine process died (or timed out) before this one finished
            why = (f"the {engine} process ran past {timeout_s:.0f} s" if code is None
                   else f"the {engine} process exited with code {code}")
            result.setdefault("results", []).append(
                {"path": c["path"], "ok": False, "error": f"{why}; its last output:\n{tail}"})
    return result


def _error_lines(path: Path, checkpoint: str, shown: int = 6) -> str:
    """The lines of the engine's log, in its last part about ``checkpoint``, that name an error (vLLM
    reports a worker's root cause there, and only "see root cause above" in the exception)."""
    mark = f"=== compress verify: checkpoint {checkpoint}"
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    starts = [i for i, ln in enumerate(lines) if ln == mark]
    if starts:
        end = next((i for i in range(starts[-1] + 1, len(lines)) if lines[i].startswith("=== compress verify: ")),
                   len(lines))
        lines = lines[starts[-1] + 1:end]
    messages = [re.sub(r"^.*?\[[\w./-]+:\d+\]\s*", "", ln).strip() for ln in lines if "WARNING" not in ln]
    hits = [m for m in messages if re.match(r"[\w.]*(Error|Exception)\b[^:]*: ", m)]
    return "\n".join(list(dict.fromkeys(hits))[-shown:])


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])

"""HF checkpoint folder -> GGUF file, by llama.cpp's own tools (``env.py``): ``convert_hf_to_gguf.py``
writes a 16/32-bit GGUF, ``llama_model_quantize`` (llama-cpp-python's binding of llama.cpp's quantizer)
makes the K-/IQ-quant from it, with an importance matrix from ``llama-imatrix`` when asked (``imatrix.py``).

Everything that can be refused is refused before any work (``check_exportable``): quantized checkpoints
(GPTQ, bitsandbytes: the GGUF quantizer replaces them, so export the float checkpoint before them),
architectures llama.cpp's converter does not know, and shapes its loader cannot take.

Beside the GGUF file goes ``<file>.compress.json``: what it was made from (the source folder and its
content hash, the source's own compress.json), the quant, the importance matrix used, the versions.
``compress verify FILE.gguf --engine llamacpp`` reads the source folder from it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.gguf.env import GGUFEnv, LLAMA_CPP_PYTHON_VERSION, gguf_env
from compress.model_io import checkpoint_config, quant_method

log = logging.getLogger("compress")

# written by llama.cpp's converter directly
FLOAT_TYPES = ("f32", "f16", "bf16")
# made by llama.cpp's quantizer from the converter's f16 file: name -> llama_ftype (llama.h)
QUANT_TYPES = {
    "q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q5_k_s": 16, "q5_0": 8, "q4_k_m": 15, "q4_k_s": 14, "q4_0": 2,
    "q3_k_m": 12, "q3_k_s": 11, "q3_k_l": 13, "q2_k": 10, "iq4_xs": 30, "iq4_nl": 25,
}
QUANTS = (*FLOAT_TYPES, *QUANT_TYPES)
SIDECAR_SUFFIX = ".compress.json"
CONVERT_TIMEOUT_S = 3600


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def converter_architectures(env: GGUFEnv) -> set[str]:
    """The HF architecture names llama.cpp's converter registers (``@ModelBase.register("...")``)."""
    names: set[str] = set()
    for py in (env.converter.parent / "conversion").glob("*.py"):
        for args in re.findall(r"ModelBase\.register\(([^)]*)\)", py.read_text(errors="replace")):
            names.update(re.findall(r"\"([A-Za-z0-9_]+)\"", args))
    return names


def shape_problems(config: dict[str, Any]) -> list[str]:
    """What llama.cpp cannot load, from config.json alone (pure; see the tests for where each was found)."""
    return []


def check_exportable(folder: Path, quant: str, env: GGUFEnv | None = None) -> dict[str, Any]:
    """All refusals, before any work: returns config.json. CompressError names the folder and the fix."""
    if quant not in QUANTS:
        raise CompressError(f"--quant: {quant!r} is not one of {', '.join(QUANTS)}")
    config = checkpoint_config(folder, "GGUF export")
    method = quant_method(config)
    if method is not None:
        raise CompressError(
            f"{folder}: a {method} checkpoint (config.json quantization_config); GGUF export needs the float "
            "weights: export the checkpoint from before the quantization stage (e.g. checkpoints/layer_removal) "
            f"and let llama.cpp's quantizer make the low-bit file (--quant q4_k_m), which replaces {method}")
    archs = config.get("architectures") or []
    known = converter_architectures(env or gguf_env())  # refusals that need no llama.cpp come before this
    if not archs or not any(a in known for a in archs):
        raise CompressError(f"{folder}: architecture {archs or '(none in config.json)'} is not one llama.cpp's "
                            f"converter ({LLAMA_CPP_PYTHON_VERSION}) knows, so it cannot become a GGUF")
    problems = shape_problems(config)
    if problems:
        raise CompressError(f"{folder}: llama.cpp cannot run this checkpoint: " + "; ".join(problems))
    return config


@dataclass
class Exported:
    path: Path
    quant: str
    bytes: int
    record: dict[str, Any]  # what the sidecar holds


def _run(cmd: list[str], env: dict[str, str], what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CompressError(f"{what}: ran past {CONVERT_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        raise CompressError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout + proc.stderr


def convert(env: GGUFEnv, folder: Path, out: Path, outtype: str) -> None:
    """llama.cpp's convert_hf_to_gguf.py, run with this Python (torch, transformers, sentencepiece)."""
    run_env = {**os.environ, "PYTHONPATH": env.converter_pythonpath(), "NO_LOCAL_GGUF": ""}
    log.info("gguf: converting %s -> %s (%s) with llama.cpp's converter", folder, out.name, outtype)
    _run([sys.executable, str(env.converter), str(folder.resolve()), "--outfile", str(out), "--outtype", outtype],
         run_env, f"llama.cpp's converter on {folder}", cwd=env.converter.parent)


def quantize(src: Path, out: Path, quant: str, imatrix: dict[str, Any] | None = None, threads: int = 0) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``), with the importance matrix if given
    (``imatrix.read_imatrix``: tensor name -> per-column mean of squared activations)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant]
    params.nthread = threads
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = (ctypes.c_float * len(values))(*values)
            keep.append((name.encode(), arr))
            entries[i].name, entries[i].data, entries[i].size = keep[-1][0], arr, len(values)
        entries[len(imatrix)].name = None  # the list ends with a NULL name (llama-quantize's own layout)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    log.info("gguf: quantizing %s -> %s (%s%s) with llama.cpp's quantizer", src.name, out.name, quant,
             ", importance matrix" if imatrix else "")
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise CompressError(f"llama.cpp's quantizer returned {code} for {src} -> {quant}")


def default_output(folder: Path, quant: str) -> Path:
    folder = folder.resolve()
    return folder.parent / f"{folder.name}-{quant}.gguf"


def export_gguf(folder: Path, quant: str = "q4_k_m", out: Path | None = None,
                imatrix_text: list[str] | None = None, imatrix_info: dict[str, Any] | None = None,
                imatrix_ctx: int = 512, provenance: dict[str, Any] | None = None) -> Exported:
    """Write ``out`` (default: ``<folder>-<quant>.gguf`` beside the folder) and its sidecar.
    ``imatrix_text``: calibration texts for llama-imatrix (one chunk of ``imatrix_ctx`` tokens each)."""
    from compress.model_io import content_hash, write_atomic

    config = check_exportable(folder, quant)  # refusals first, the environment after
    env = gguf_env()
    if imatrix_text is not None and quant in FLOAT_TYPES:
        raise CompressError(f"--imatrix: an importance matrix steers quantization; {quant} is not quantized")
    out = (out or default_output(folder, quant)).resolve()
    if out.suffix != ".gguf":
        raise CompressError(f"--out {out}: give a file name ending in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    record: dict[str, Any] = {
        "format": 1, "gguf": out.name, "quant": quant,
        "source": {"folder": str(folder.resolve()), "content_sha256": content_hash(folder),
                   "architectures": config.get("architectures"), "num_hidden_layers": config.get("num_hidden_layers")},
        "tools": {"llama-cpp-python": LLAMA_CPP_PYTHON_VERSION, "converter": "convert_hf_to_gguf.py",
                  "quantizer": "llama_model_quantize" if quant in QUANT_TYPES else None},
        "imatrix": None,
    }
    prov = folder / "compress.json"
    if provenance is not None:
        record["source"]["compress"] = provenance
    elif prov.is_file():
        record["source"]["compress"] = json.loads(prov.read_text())
    with tempfile.TemporaryDirectory(prefix=".tmp-gguf-", dir=out.parent) as tmp:
        work = Path(tmp)
        base = work / ("model-" + (quant if quant in FLOAT_TYPES else "f16") + ".gguf")
        convert(env, folder, base, quant if quant in FLOAT_TYPES else "f16")
        if quant in QUANT_TYPES:
            matrix = None
            if imatrix_text is not None:
                from compress.gguf.imatrix import compute_imatrix, read_imatrix

                imx = compute_imatrix(env, base, imatrix_text, work, imatrix_ctx)
                matrix = read_imatrix(imx["file"])
                record["imatrix"] = {**(imatrix_info or {}), **{k: v for k, v in imx.items() if k != "file"},
                                     "tensors": len(matrix)}
            final = work / "model.gguf"
            quantize(base, final, quant, matrix)
        else:
            final = base
        os.replace(final, out)
    record["bytes"] = out.stat().st_size
    record["wall_s"] = round(time.perf_counter() - start, 2)
    write_atomic(sidecar(out), json.dumps(record, indent=2, default=str))
    log.info("gguf: wrote %s (%.1f MB, %s) in %.1f s", out, record["bytes"] / 1e6, quant, record["wall_s"])
    return Exported(path=out, quant=quant, bytes=record["bytes"], record=record)

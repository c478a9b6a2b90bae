"""Importance matrix by llama.cpp's own ``llama-imatrix`` (tools/imatrix of the pinned sdist, built by
``scripts/gguf-env.sh``), on the recipe's calibration text; read back for ``llama_model_quantize`` the way
llama-quantize reads it (``normalize``)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import CompressError
from compress.gguf.env import GGUFEnv


def compute_imatrix(env: GGUFEnv, model: Path, texts: list[str], work: Path, ctx: int,
                    threads: int | None = None) -> dict[str, Any]:
    """Run llama-imatrix over ``texts`` (joined; llama.cpp tokenizes them itself) in chunks of ``ctx``
    tokens, at most ``len(texts)`` chunks. Returns the file and what was used."""
    from compress.gguf.export import _run

    text_file, out = work / "imatrix-text.txt", work / "imatrix.gguf"
    body = "\n\n".join(texts)
    text_file.write_text(body, encoding="utf-8")
    cmd = [str(env.imatrix_tool), "-m", str(model), "-f", str(text_file), "-o", str(out), "-c", str(ctx),
           "--chunks", str(len(texts)), "--no-ppl", "-t", str(threads or os.cpu_count() or 1)]
    start = time.perf_counter()
    log = _run(cmd, env.tool_env(), "llama.cpp's llama-imatrix")
    if not out.is_file():
        raise CompressError(f"llama-imatrix wrote no {out.name}; its output ended:\n" + "\n".join(log.splitlines()[-8:]))
    return {"file": out, "tool": "llama-imatrix", "chunks": len(texts), "chunk_tokens": ctx,
            "text_chars": len(body), "text_sha256": hashlib.sha256(body.encode()).hexdigest(),
            "wall_s": round(time.perf_counter() - start, 2)}


def normalize(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """llama-quantize's ``load_imatrix`` for the GGUF format: per expert j, sums[j] / counts[j], or ones
    where a count is 0 (pure; ``sums`` flat, ``counts`` one per expert)."""
    sums = np.asarray(sums, dtype=np.float32).reshape(len(counts), -1)
    counts = np.asarray(counts, dtype=np.float32).reshape(-1, 1)
    out = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), 1.0)
    return out.reshape(-1).astype(np.float32)


def read_imatrix(path: Path, converter: Path | None = None) -> dict[str, list[float]]:
    """tensor name -> importance values, from llama-imatrix's GGUF output (``<name>.in_sum2`` and
    ``<name>.counts`` tensors), read with llama.cpp's gguf-py."""
    from compress.gguf.env import gguf_reader

    reader = gguf_reader(converter)(str(path))
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = np.array(t.data).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = np.array(t.data).reshape(-1)
    missing = sorted(set(sums) ^ set(counts))
    if missing:
        raise CompressError(f"{path}: importance matrix entries without sums or counts: {missing[:3]}")
    return {name: normalize(sums[name], counts[name]).tolist() for name in sorted(sums)}

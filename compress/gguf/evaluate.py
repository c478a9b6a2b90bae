"""The harness's rows for a GGUF file, computed by llama.cpp (llama-cpp-python): perplexity on the same
token windows as the HF rows (``compress.evaluate.perplexity.make_windows``), fed to the same fidelity
observer (KL / top-1 vs the baseline store), and prefill / decode speed on this CPU."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.evaluate.perplexity import make_windows


def load(path: Path, n_ctx: int, threads: int | None = None):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                           seed=0, n_threads=threads or os.cpu_count() or 1, verbose=False)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


def gguf_perplexity(path: Path, tokens: torch.Tensor, seq_len: int, stride: int | None, bos: int | None = None,
                    observe=None) -> dict[str, Any]:
    """Token-weighted perplexity over the same windows ``compress.evaluate.perplexity`` uses."""
    ids = tokens.reshape(-1).tolist()
    windows = make_windows(len(ids), seq_len, stride or (seq_len - (1 if bos is not None else 0)), bos is not None)
    llm = load(path, seq_len)
    nll, count = 0.0, 0
    try:
        for w in windows:
            inp = ([bos] if w.bos else []) + ids[w.begin:w.end]
            llm.reset()
            llm.eval(inp)
            shift = 1 if w.bos else 0  # position of token `begin` in inp
            first = w.target_from - w.begin + shift  # index in inp of the first scored token
            rows = np.asarray(llm.scores[first - 1:len(inp) - 1])
            targets = np.asarray(inp[first:], dtype=np.int64)
            logp = log_softmax(rows)
            nll -= float(logp[np.arange(len(targets)), targets].sum())
            count += len(targets)
            if observe is not None:
                observe(torch.from_numpy(logp), torch.from_numpy(targets))
    finally:
        llm.close()
    return {"ppl": float(np.exp(nll / count)), "ppl_tokens": count}


def gguf_speed(path: Path, prompt_tokens: int = 512, new_tokens: int = 128, repeats: int = 3,
               threads: int | None = None) -> dict[str, Any]:
    """Prefill ms for ``prompt_tokens`` and greedy decode tokens/s in llama.cpp (median of ``repeats``)."""
    llm = load(path, prompt_tokens + new_tokens + 8, threads)
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, llm.n_vocab() - 100, prompt_tokens)]
    prefill, decode = [], []
    try:
        for _ in range(repeats):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            prefill.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                llm.eval([tok])
            decode.append(new_tokens / (time.perf_counter() - t0))
    finally:
        llm.close()
    return {"prefill_ms": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "latency_setting": f"P={prompt_tokens} N={new_tokens} B=1 (llama.cpp, {threads or os.cpu_count()} threads)"}

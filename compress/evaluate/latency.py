"""Latency: prefill time for P prompt tokens and decode tokens/s for N new tokens at batch B.

Warm-up runs first, then the median and 90th percentile over ``repeats`` runs; CUDA events on GPU,
perf_counter on CPU. Two decode paths: plain ``generate`` (dynamic KV cache), and a fast path
(static KV cache, whose decode step ``generate`` compiles where it can) that is reported separately; if the fast path fails, its
row says why instead of a number (never hidden, never silently replaced).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch

log = logging.getLogger("compress")


@dataclass
class LatencyResult:
    prefill_ms: float  # median
    prefill_ms_p90: float
    decode_tok_s: float  # median, new tokens per second (all sequences of the batch)
    decode_tok_s_p90: float  # 90th percentile of per-run time, as tokens/s (the slow tail)
    prompt_tokens: int
    new_tokens: int
    batch_size: int
    path: str  # "generate" or "static-cache"


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "_Timer":
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


@torch.no_grad()
def _generate_seconds(model, ids, new_tokens: int, device, **kwargs) -> float:
    with _Timer(device) as t:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return t.seconds


@torch.no_grad()
def measure_latency(model, prompt_tokens: int = 512, new_tokens: int = 128, batch_size: int = 1,
                    repeats: int = 5, warmup: int = 1, fast: bool = False) -> LatencyResult:
    """Prefill = one forward over the prompt; decode rate = new tokens / (generate time - prefill)."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch_size, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    kwargs = {"cache_implementation": "static"} if fast else {}  # generate compiles the step itself
    prefill, decode = [], []
    for run in range(warmup + repeats):
        with _Timer(device) as t:
            model(ids, use_cache=False)
        total = _generate_seconds(model, ids, new_tokens, device, **kwargs)
        if run >= warmup:
            prefill.append(t.seconds)
            decode.append(max(total - t.seconds, 1e-9))
    rate = lambda s: batch_size * new_tokens / s  # noqa: E731
    return LatencyResult(
        prefill_ms=1000 * statistics.median(prefill), prefill_ms_p90=1000 * _p90(prefill),
        decode_tok_s=rate(statistics.median(decode)), decode_tok_s_p90=rate(_p90(decode)),
        prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch_size=batch_size,
        path="static-cache" if fast else "generate",
    )


@torch.no_grad()
def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (reads + writes counted), CUDA only."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        with _Timer(device) as t:
            dst.copy_(src)
        times.append(t.seconds)
    return 2 * src.numel() / statistics.median(times)  # each byte read once and written once


def bandwidth_floor_share(weight_bytes: int, bandwidth: float, decode_tok_s: float, batch_size: int) -> float:
    """Share of the memory-bandwidth floor that decoding reaches: every decode step must read all
    weights once, so a step takes at least weight_bytes / bandwidth; 1.0 = at the floor."""
    floor_s = weight_bytes / bandwidth
    step_s = batch_size / decode_tok_s  # one step produces batch_size tokens
    return floor_s / step_s

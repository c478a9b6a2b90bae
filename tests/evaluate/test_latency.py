"""Latency measurement: structure and arithmetic (timings themselves live in benchmarks/)."""

from __future__ import annotations

import pytest
import torch

from compress.evaluate.latency import bandwidth_floor_share, copy_bandwidth, measure_latency
from conftest import tiny_model


def test_latency_result_fields_for_both_paths():
    model = tiny_model("llama", 2)
    for fast in (False, True):
        r = measure_latency(model, prompt_tokens=8, new_tokens=4, batch_size=2, repeats=2, fast=fast)
        assert r.prefill_ms > 0 and r.decode_tok_s > 0 and r.prefill_ms_p90 >= r.prefill_ms
        assert (r.prompt_tokens, r.new_tokens, r.batch_size) == (8, 4, 2)
        assert r.path == ("static-cache" if fast else "generate")


def test_bandwidth_floor_share():
    # 1 GB of weights at 1 TB/s: at least 1 ms a step; 500 tok/s at batch 1 = 2 ms a step -> 50%.
    assert bandwidth_floor_share(10**9, 10**12, 500.0, 1) == pytest.approx(0.5)
    # batch 4 at 2000 tok/s is also 2 ms a step.
    assert bandwidth_floor_share(10**9, 10**12, 2000.0, 4) == pytest.approx(0.5)


@pytest.mark.gpu
def test_copy_bandwidth_on_gpu_is_plausible():
    bw = copy_bandwidth(torch.device("cuda"), nbytes=1 << 28)
    assert 1e10 < bw < 1e13  # 10 GB/s .. 10 TB/s

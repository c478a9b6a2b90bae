"""Model IO: memory checks before loading, sizes, device_map, atomic writes."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoConfig

import compress.model_io as model_io
from compress.errors import CompressError
from compress.model_io import check_fits, check_fits_anywhere, estimated_weight_bytes, parse_size, resolve_device
from compress.pipeline import run_recipe
from conftest import tiny_model


def test_estimated_weight_bytes_equals_the_built_models_parameters(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    model = tiny_model("llama", 5)
    expected = sum(p.numel() for p in model.parameters()) * 2
    assert estimated_weight_bytes(config, torch.bfloat16) == expected


def test_a_model_larger_than_free_memory_is_refused_with_numbers(tiny_model_dir, monkeypatch):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(model_io, "available_bytes", lambda device: 1000)
    with pytest.raises(CompressError, match=r"needs about 0\.0 GiB for its weights in float32, but cpu has 0\.0 GiB free"):
        check_fits(config, torch.float32, torch.device("cpu"))
    with pytest.raises(CompressError, match="but max_memory allows 0.0 GiB in all"):
        check_fits_anywhere(config, torch.float32, {"cpu": "1KB"})
    assert check_fits_anywhere(config, torch.float32, {"cpu": "1GiB"}) > 0


def test_parse_size():
    assert parse_size("70GiB") == 70 * 2**30 and parse_size("500MB") == 500 * 10**6
    assert parse_size(4096) == 4096 and parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("lots") is None and parse_size(-1) is None and parse_size("5XB") is None


def test_absent_cuda_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CompressError, match="no CUDA GPU is visible"):
        resolve_device("cuda:0")


def test_device_map_run_and_max_memory_checks(tmp_path, tiny_model_dir, text_file):
    body = {"model": str(tiny_model_dir), "dtype": "float32", "output": "run", "device": "cpu",
            "device_map": "cpu", "max_memory": {"cpu": "4GiB"},
            "calibration": {"path": str(text_file), "samples": 2, "seq_len": 16},
            "evaluate": {"perplexity": {"path": str(text_file), "seq_len": 32, "max_tokens": 128}},
            "stages": [{"layer_removal": {"remove": 1}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    report = run_recipe(path, progress=False)
    assert [r["layers"] for r in report["rows"]] == [5, 4]
    body["max_memory"] = {"cpu": "lots"}
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(CompressError, match="max_memory.cpu: 'lots' is not a size like 70GiB"):
        run_recipe(path, progress=False)
    body.pop("device_map")
    body["max_memory"] = {"cpu": "1GiB"}
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(CompressError, match="max_memory: only used with device_map"):
        run_recipe(path, progress=False)

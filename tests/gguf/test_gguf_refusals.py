"""GGUF export and `verify --engine llamacpp` without llama.cpp: the refusals that come before any work,
the importance-matrix normalization, the recipe's stage order, and how a GGUF's quant is read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from compress.cli import main
from compress.errors import CompressError
from compress.gguf.export import check_exportable
from compress.gguf.imatrix import normalize
from compress.recipe import load_recipe
from compress.verify.verify import VerifyOptions, gguf_quant, verify_checkpoints


def _quantized_folder(tmp_path: Path, method: str) -> Path:
    folder = tmp_path / method
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    "quantization_config": {"quant_method": method, "bits": 4}}))
    return folder


@pytest.mark.parametrize("method", ["gptq", "bitsandbytes"])
def test_a_quantized_checkpoint_is_refused_before_any_work_naming_the_fix(tmp_path, method):
    folder = _quantized_folder(tmp_path, method)
    result = CliRunner().invoke(main, ["export", str(folder), "--format", "gguf", "--quant", "q4_k_m"])
    assert result.exit_code == 1
    assert (f"{folder}: a {method} checkpoint (config.json quantization_config); GGUF export needs the float "
            "weights: export the checkpoint from before the quantization stage") in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.glob("*.gguf")) == []


def test_an_unknown_quant_is_refused_with_the_list():
    with pytest.raises(CompressError, match=r"--quant: 'q4_k_x' is not one of f32, f16, bf16, q8_0"):
        check_exportable(Path("/nonexistent"), "q4_k_x")


def test_importance_values_are_sums_over_counts_per_expert_and_ones_where_unseen():
    """llama-quantize's load_imatrix (GGUF format): e[j*ne0 + i] = sums[j*ne0 + i] / counts[j], 1 if count 0."""
    sums = np.array([2.0, 4.0, 6.0, 8.0, 5.0, 7.0])
    got = normalize(sums, np.array([2.0, 0.0, 4.0]))
    assert got.tolist() == [1.0, 2.0, 1.0, 1.0, 1.25, 1.75]


def test_float_gguf_types_are_judged_exactly_and_the_rest_as_quantized():
    assert gguf_quant("f16", None) is None and gguf_quant("q4_k_m", 15) == "q4_k_m"
    assert gguf_quant(None, 1) is None and gguf_quant(None, 0) is None and gguf_quant(None, 32) is None
    assert gguf_quant(None, 15) == "gguf file_type 15"


def test_verify_llamacpp_needs_a_gguf_file_and_its_source(tmp_path, monkeypatch):
    import compress.verify.verify as v

    monkeypatch.setattr(v, "engine_python", lambda engine, python: "/usr/bin/python3")
    with pytest.raises(CompressError, match="not a .gguf file; --engine llamacpp verifies GGUF files"):
        verify_checkpoints([tmp_path], VerifyOptions(engine="llamacpp"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(CompressError, match=r"no --reference and no m.gguf.compress.json beside it naming its "
                                            r"source; pass --reference HF_FOLDER"):
        verify_checkpoints([gguf], VerifyOptions(engine="llamacpp"))
    (tmp_path / "m.gguf.compress.json").write_text(json.dumps({"quant": "f16", "source": {"folder": "/gone"}}))
    with pytest.raises(CompressError, match="its source folder /gone .* does not exist any more"):
        verify_checkpoints([gguf], VerifyOptions(engine="llamacpp"))
    q = _quantized_folder(tmp_path, "gptq")
    with pytest.raises(CompressError, match="--reference .*gptq: a gptq checkpoint; a GGUF is compared with the "
                                            "float checkpoint"):
        verify_checkpoints([gguf], VerifyOptions(engine="llamacpp", reference=q))


def test_recipe_refuses_gguf_after_a_quantization_stage_and_anything_after_gguf(tmp_path, tiny_model_dir, text_file):
    body = {"model": str(tiny_model_dir), "output": str(tmp_path / "out"),
            "calibration": {"path": str(text_file), "samples": 2, "seq_len": 16},
            "stages": [{"gptq": {"bits": 4, "group_size": 32}}, {"gguf": {"quant": "q4_k_m"}},
                       {"layer_removal": {"metric": "bi", "remove": 1}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(CompressError) as e:
        load_recipe(path)
    text = str(e.value)
    assert ("stages[1].gguf: comes after quantization stage 'gptq'; llama.cpp converts float weights and its own "
            "quantizer (gguf: {quant: q4_k_m}) replaces gptq") in text
    assert "stages[2].layer_removal: comes after quantization stage 'gguf'; quantization must be the last stage" in text

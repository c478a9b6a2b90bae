"""A run without quantization imports no quantization backend, and the backends' import noise
(torchao's missing CUDA kernels, "Detected no triton", GPTQModel's banner) stays out of the log."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings

import yaml

from compress.quiet import quiet_backends

BACKENDS = ("gptqmodel", "bitsandbytes", "torchao")
NOISE = ("triton", "mxfp8", "Failed to load", "GPT-QModel", "GIL")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_cli_registry_and_recipe_check_import_no_backend(tmp_path, tiny_model_dir, text_file):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "dtype": "float32", "output": "out",
        "calibration": {"path": str(text_file), "samples": 4, "seq_len": 16},
        "stages": [{"layer_removal": {"remove": 1}}, {"gptq": {"bits": 4, "group_size": 32}}],
    }))
    code = f"""
import json, sys
import compress.cli, compress.pipeline
from compress.stages import STAGES
from compress.model_io import model_facts, read_config
from compress.recipe import check_against_model, load_recipe
r = load_recipe({str(recipe)!r})
check_against_model(r, model_facts(read_config(r.model, None, False)))
print(json.dumps({{"stages": [s.kind for s in r.stages], "group": r.stages[1].config.group_size,
                  "bnb4": STAGES["bnb4"].Config().quant_type,
                  "loaded": [m for m in {BACKENDS!r} if m in sys.modules]}}))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"stages": ["layer_removal", "gptq"], "group": 32, "bnb4": "nf4",
                                       "loaded": []}
    assert not any(n in proc.stderr for n in NOISE), proc.stderr


def test_run_without_quantization_has_a_clean_log(tmp_path, tiny_model_dir, text_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "dtype": "float32", "output": "out",
        "calibration": {"path": str(text_file), "samples": 4, "seq_len": 16},
        "evaluate": {"perplexity": {"path": str(text_file), "seq_len": 32, "max_tokens": 256}},
        "stages": [{"layer_removal": {"metric": "bi", "remove": 2}}],
    }))
    code = f"""
import sys
from compress.cli import main
try:
    main(["run", "--no-progress", {str(recipe)!r}])
except SystemExit as e:
    assert e.code in (0, None), e.code
print("LOADED", [m for m in ("gptqmodel", "bitsandbytes") if m in sys.modules])
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert "| layer_removal | 3 |" in proc.stdout
    assert "LOADED []" in proc.stdout
    assert "compress: stage 1/1: layer_removal" in proc.stderr  # our own log is still there
    noisy = [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)]
    assert noisy == []


def test_quiet_backends_hides_only_the_backends_and_restores_levels(caplog):
    torchao, ours = logging.getLogger("torchao.kernel.intmm"), logging.getLogger("compress")
    logging.getLogger("bitsandbytes").setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_backends():
                torchao.warning("Detected no triton")
                ours.warning("ours")
                warnings.warn_explicit("backend warning", UserWarning, "x.py", 1, module="torchao.ops")
                warnings.warn_explicit("our warning", UserWarning, "y.py", 1, module="compress.pipeline")
            torchao.warning("after")
        assert [r.getMessage() for r in caplog.records] == ["ours", "after"]
        assert [str(w.message) for w in caught] == ["our warning"]
        assert logging.getLogger("bitsandbytes").level == logging.DEBUG
        assert logging.getLogger("torchao").level == logging.NOTSET
    finally:
        logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)


def test_help_prints_only_help():
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "Usage:" in proc.stdout
    assert proc.stderr == ""

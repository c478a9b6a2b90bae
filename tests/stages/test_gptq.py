"""Stage gptq (GPTQModel): standard GPTQ checkpoints that reload exactly, better than
round-to-nearest on the calibration data, after layer removal, resumable."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers as tf
import yaml

from compress.stages.base import StageContext
from compress.stages.gptq import GPTQ, GPTQConfig
from compress.surgery import decoder_layers, remove_layers
from conftest import crash_perplexity_at, restore_perplexity, MIXED

pytest.importorskip("gptqmodel", reason="GPTQModel is in the test extra: pip install -e '.[test]'")
GEN = torch.Generator().manual_seed(21)
CAL = [{"input_ids": torch.randint(0, 320, (4, 32), generator=GEN), "attention_mask": torch.ones(4, 32, dtype=torch.long)}
       for _ in range(2)]
IDS = torch.randint(0, 320, (2, 12), generator=GEN)


def model_of(kind: str, layers: int = 3):
    torch.manual_seed(0)
    shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=320, num_hidden_layers=layers)
    if kind == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=32, use_sliding_window=True, sliding_window=8,
                                                  layer_types=MIXED[:layers], **shape)).eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(**shape)).eval()


def ctx(tokenizer) -> StageContext:
    return StageContext(CAL, tokenizer, torch.device("cpu"), [], logging.getLogger("t"), progress=False)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_gptq_checkpoint_is_standard_and_reloads_exactly(kind, tiny_tokenizer, tmp_path):
    model = model_of(kind, 4)
    remove_layers(model, [2])
    stage = GPTQ(GPTQConfig(bits=4, group_size=32))
    record = stage.apply(model, ctx(tiny_tokenizer))
    work = stage._saved.parent
    q = record.new_model
    assert q.config.num_hidden_layers == 3 == len(decoder_layers(q))
    stage.save(q, tmp_path)
    assert not work.exists()  # GPTQModel's temporary output does not pile up in /tmp
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == \
        ("gptq", "gptq", 4, 32, False, True)
    reloaded = GPTQ.load(tmp_path, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, q(IDS).logits, rtol=0, atol=0)
    assert record.details["backend"].startswith("gptqmodel") and record.details["calibration_windows"] == 8


def rtn(model, bits: int, group: int):
    """Independent round-to-nearest baseline: symmetric, per group of `group` input columns."""
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in [*layer.self_attn.children(), *layer.mlp.children()]:
                if isinstance(lin, torch.nn.Linear):
                    w = lin.weight.view(lin.out_features, -1, group)
                    scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-8) / levels
                    lin.weight.copy_((torch.round(w / scale).clamp(-levels - 1, levels) * scale).view_as(lin.weight))
    return model


def test_gptq_beats_round_to_nearest_on_the_calibration_data(tiny_tokenizer):
    """Why GPTQ exists (Frantar et al. 2022): lower output error than RTN at the same bits/group."""
    reference = model_of("llama")
    stage = GPTQ(GPTQConfig(bits=4, group_size=32))
    q = stage.apply(model_of("llama"), ctx(tiny_tokenizer)).new_model
    baseline = rtn(model_of("llama"), 4, 32).to(q.dtype)
    ids = torch.cat([b["input_ids"] for b in CAL])
    with torch.no_grad():
        want = reference(ids).logits.float()
        err_gptq = (q(ids).logits.float() - want).pow(2).mean()
        err_rtn = (baseline(ids).logits.float() - want).pow(2).mean()
    assert err_gptq < err_rtn, (float(err_gptq), float(err_rtn))


def test_pipeline_prune_then_gptq_resumes_from_its_checkpoint(tmp_path, tiny_tokenizer, text_file, monkeypatch):
    from compress.pipeline import run_recipe

    model_dir = tmp_path / "m"
    model_of("llama", 4).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    body = {"model": str(model_dir), "dtype": "float32", "device": "cpu", "output": "run",
            "calibration": {"path": str(text_file), "samples": 4, "seq_len": 32},
            "evaluate": {"perplexity": {"path": str(text_file), "seq_len": 32, "max_tokens": 256}},
            "stages": [{"layer_removal": {"remove": 1}}, {"gptq": {"bits": 4, "group_size": 32}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    crash_perplexity_at(monkeypatch, 3)
    with pytest.raises(RuntimeError):
        run_recipe(tmp_path / "r.yaml", progress=False)
    restore_perplexity(monkeypatch)
    monkeypatch.setattr(GPTQ, "apply", lambda *a: pytest.fail("gptq redone instead of loaded"))
    rows = run_recipe(tmp_path / "r.yaml", progress=False)["rows"]
    assert [r["layers"] for r in rows] == [4, 3, 3] and rows[2]["bits"] == 4
    assert rows[2]["params"] == rows[1]["params"]  # logical count, not packed storage
    assert rows[2]["weight_bytes"] < 0.5 * rows[1]["weight_bytes"]
    ckpt = tmp_path / "run/checkpoints/gptq"
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq"
    assert (ckpt / "quantize_config.json").exists() and (ckpt / "tokenizer.json").exists()


def test_gptq_with_its_own_calibration_needs_no_recipe_calibration(tmp_path, tiny_model_dir, text_file):
    from compress.recipe import load_recipe

    body = {"model": str(tiny_model_dir), "output": "o",
            "stages": [{"gptq": {"calibration": {"path": text_file.name, "samples": 3, "seq_len": 16}}}]}
    (text_file.parent / "r.yaml").write_text(yaml.safe_dump(body))
    recipe = load_recipe(text_file.parent / "r.yaml")
    assert recipe.calibration is None
    assert recipe.stages[0].config.calibration.path == str(text_file)  # resolved against the recipe
    body["stages"] = [{"gptq": {}}]
    (text_file.parent / "r.yaml").write_text(yaml.safe_dump(body))
    with pytest.raises(Exception, match="needs calibration data"):
        load_recipe(text_file.parent / "r.yaml")


@pytest.mark.gpu
def test_gptq_on_gpu_selects_a_gpu_kernel_and_reloads(tiny_tokenizer, tmp_path):
    stage = GPTQ(GPTQConfig(bits=4, group_size=32))
    cuda_ctx = StageContext(CAL, tiny_tokenizer, torch.device("cuda"), [], logging.getLogger("t"), progress=False)
    q = stage.apply(model_of("llama").cuda(), cuda_ctx).new_model
    kernel = type(decoder_layers(q)[0].self_attn.q_proj).__name__
    assert "TorchAten" not in kernel, kernel  # a CUDA kernel (Marlin / ExLlama / Triton), not the CPU one
    stage.save(q, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(GPTQ.load(tmp_path, "cuda")(IDS.cuda()).logits, q(IDS.cuda()).logits)


def test_group_size_must_divide_the_layer_widths():
    from compress.stages.base import ModelFacts

    facts = ModelFacts("llama", 30, 9, 3, intermediate_size=1536, hidden_size=576)  # SmolLM2-135M
    msg = GPTQ(GPTQConfig(group_size=128)).check(facts)
    assert msg == ["group_size: 128 does not divide q_proj, k_proj, v_proj, gate_proj, up_proj in_features 576 "
                   "(hidden_size); o_proj in_features 576 (9 heads x head_dim 64); the int4 kernels need whole "
                   "groups: use group_size: 64 or -1"]
    assert GPTQ(GPTQConfig(group_size=64)).check(facts) == [] and GPTQ(GPTQConfig(group_size=-1)).check(facts) == []
    pruned = ModelFacts("llama", 30, 9, 3, intermediate_size=1504, hidden_size=576,
                        shaped_by={"intermediate_size": "stages[0].width_pruning"})
    assert GPTQ(GPTQConfig(group_size=64)).check(pruned) == [
        "group_size: 64 does not divide down_proj in_features 1504 (intermediate_size after "
        "stages[0].width_pruning); the int4 kernels need whole groups: use group_size: 32 or -1, "
        "or set multiple_of: 64 on stages[0].width_pruning"]
    assert GPTQ(GPTQConfig(group_size=32)).check(pruned) == []
    assert GPTQ(GPTQConfig()).facts_after(facts).quantized

"""Stage gptq (GPTQModel): standard GPTQ checkpoints that reload exactly, better than
round-to-nearest on the calibration data, after layer removal, resumable."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

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
    local = [s for name in ("config.json", "quantize_config.json")
             for s in strings_in(json.loads((tmp_path / name).read_text()))
             if s.startswith("/") or tempfile.gettempdir() in s]
    assert local == []  # GPTQModel writes meta.offload_to_disk_path, a temporary folder of this machine
    reloaded = GPTQ.load(tmp_path, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, q(IDS).logits, rtol=0, atol=0)
    assert record.details["backend"].startswith("gptqmodel") and record.details["calibration_windows"] == 8
    # 3 layers x (qkv_proj, o_proj, gate_up_proj, down_proj) as vLLM fuses them; all fit Marlin at group 32
    assert record.details["marlin"] == "all 12 layers" and "vLLM Marlin: all 12 layers" in record.summary


def strings_in(value) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings_in(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return [value] if isinstance(value, str) else []


def test_per_channel_quantizes_with_classic_gptq(tiny_tokenizer, tmp_path):
    """group_size -1 (one scale per output channel): GPTQModel 7.6 turns its group-aware reordering
    on by default, which refuses -1; classic GPTQ (the paper, AutoGPTQ) is our default."""
    stage = GPTQ(GPTQConfig(bits=4, group_size=-1))
    record = stage.apply(model_of("llama", 2), ctx(tiny_tokenizer))
    q_proj = decoder_layers(record.new_model)[0].self_attn.q_proj
    assert tuple(q_proj.scales.shape) == (1, 128)  # one group spanning all 128 input columns
    assert record.details["act_group_aware"] is False and record.details["group_size"] == -1
    assert "act_group_aware False" in record.summary
    stage.save(record.new_model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (qc["group_size"], qc["meta"]["act_group_aware"]) == (-1, False)


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
    gptq = next(st for st in json.loads((ckpt / "compress.json").read_text())["stages"] if st["name"] == "gptq")
    assert (gptq["details"]["act_group_aware"], gptq["details"]["marlin"]) == (False, "all 12 layers")
    assert "act_group_aware False" in rows[2]["summary"] and "vLLM Marlin: all 12 layers" in rows[2]["summary"]


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


def recipe_problems(folder, model_dir, options: dict) -> list[str]:
    """The problems load_recipe lists for a recipe whose only stage is gptq with ``options``."""
    from compress.errors import CompressError
    from compress.recipe import load_recipe

    body = {"model": str(model_dir), "output": "o", "calibration": {"dataset": "pg19", "samples": 2, "seq_len": 16},
            "stages": [{"gptq": options}]}
    (folder / "r.yaml").write_text(yaml.safe_dump(body))
    with pytest.raises(CompressError) as e:
        load_recipe(folder / "r.yaml")
    return [line.removeprefix("  - ") for line in str(e.value).splitlines()[1:]]


def test_act_group_aware_with_per_channel_is_a_recipe_error(tmp_path, tiny_model_dir, no_model_load):
    assert recipe_problems(tmp_path, tiny_model_dir, {"group_size": -1, "act_group_aware": True}) == [
        "stages[0].gptq: act_group_aware: true needs groups (group_size 32, 64 or 128); "
        "with group_size: -1 use act_group_aware: false"]
    assert recipe_problems(tmp_path, tiny_model_dir, {"desc_act": True, "act_group_aware": True}) == [
        "stages[0].gptq: act_group_aware: true and desc_act: true exclude each other (GPTQModel); choose one"]


def test_asymmetric_quantization_is_refused_with_the_reason(tmp_path, tiny_model_dir, no_model_load):
    assert recipe_problems(tmp_path, tiny_model_dir, {"sym": False}) == [
        "stages[0].gptq.sym: false is not supported: the checkpoint is written in the v1 `gptq` "
        "format, whose asymmetric zero points vLLM and other v1 readers mis-dequantize "
        "(optimum: gptq v1 supports only sym=True); use sym: true (got False)"]


def test_local_paths_are_dropped_from_json_and_named():
    from compress.stages.gptq import without_local_paths

    cfg = {"bits": 4, "meta": {"offload_to_disk_path": "/tmp/gptqmodel_x", "uri": "https://github.com/modelcloud/gptqmodel",
                               "files": ["a.bin", "/home/me/b.bin", {"cache": "C:relative", "dir": "file:///scratch/t/c"}]},
           "dynamic": {"-:.*mlp": {}}}
    clean, dropped = without_local_paths(cfg, "/scratch/t")
    assert clean == {"bits": 4, "meta": {"uri": "https://github.com/modelcloud/gptqmodel",
                                         "files": ["a.bin", {"cache": "C:relative"}]}, "dynamic": {"-:.*mlp": {}}}
    assert dropped == ["meta.offload_to_disk_path", "meta.files.[1]", "meta.files.[2].dir"]


def test_the_record_names_the_layers_vllm_runs_off_marlin():
    """Act-order keeps vLLM's strict Marlin tile check: in_features 64 (hidden size) misses it."""
    from compress.stages.gptq import _marlin
    from conftest import tiny_model

    phrase, fields = _marlin(tiny_model("llama", 2), GPTQConfig(group_size=32, desc_act=True))
    assert phrase == "vLLM Marlin: 6 of 8 layers fall back (details.marlin)"
    assert fields["marlin"] == [
        f"model.layers.{i}.{name} (out {out}, in 64): in_features 64 is not a multiple of 128 (Marlin min_thread_k)"
        for i in range(2) for name, out in (("self_attn.qkv_proj", 128), ("self_attn.o_proj", 64), ("mlp.gate_up_proj", 256))]
    assert _marlin(tiny_model("llama", 2), GPTQConfig(group_size=32))[1] == {
        "marlin": "all 8 layers", "marlin_without_tile_padding": fields["marlin"]}


def test_a_failed_quantization_leaves_no_temporary_copy(tiny_tokenizer, monkeypatch):
    """The float copy handed to GPTQModel (the model's full size) goes even when GPTQModel raises."""
    import tempfile as tmp

    import gptqmodel

    made, real_mkdtemp = [], tmp.mkdtemp

    def spy(*a, **k):
        path = real_mkdtemp(*a, **k)
        made.extend([path] if "compress-gptq" in path else [])
        return path
    monkeypatch.setattr(tmp, "mkdtemp", spy)
    monkeypatch.setattr(gptqmodel.GPTQModel, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    stage = GPTQ(GPTQConfig(bits=4, group_size=32))
    with pytest.raises(RuntimeError, match="boom"):
        stage.apply(model_of("llama", 1), ctx(tiny_tokenizer))
    assert len(made) == 1 and not Path(made[0]).exists() and stage._saved is None

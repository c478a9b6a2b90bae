"""Head pruning per architecture: OLMo2's whole-width q_norm/k_norm are sliced with the kept heads;
engines that derive head_dim from hidden_size // num_heads (vLLM's qwen2, olmo2) are warned about."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
import yaml
from transformers import AutoModelForCausalLM

from compress.recipe import check_against_model, load_recipe
from compress.stages.base import ModelFacts
from compress.surgery import decoder_layers, remove_heads
from conftest import TINY, randomize_norms

IDS = torch.randint(1, 320, (2, 10), generator=torch.Generator().manual_seed(5))
HEAD_DIM = 16  # TINY: hidden 64, 4 query heads in 2 KV groups


def olmo2(layers: int = 3):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tf.Olmo2Config(num_hidden_layers=layers, **TINY),
                                             dtype=torch.float32).eval()
    randomize_norms(model)
    return model


def cols(heads: list[int]) -> list[int]:
    return [c for h in heads for c in range(h * HEAD_DIM, (h + 1) * HEAD_DIM)]


def kept_statistics_logits(model, drop_q: list[int], drop_kv: list[int]) -> torch.Tensor:
    """Independent reference on the unpruned model: q_norm/k_norm take their RMS over the kept heads'
    columns only (what a sliced whole-width norm computes) and the removed query heads are zeroed
    before o_proj. (Removed KV heads feed only removed query heads.)"""
    n_q, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads

    def kept_rms(keep):
        def hook(norm, args, out):
            x = args[0].float()
            rms = x[..., keep].pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon).rsqrt()
            return (norm.weight * x * rms).to(args[0].dtype)
        return hook

    def zero_removed(mod, args):
        x = args[0].clone()
        x[..., cols(drop_q)] = 0
        return (x,)
    handles = []
    for layer in decoder_layers(model):
        attn = layer.self_attn
        handles.append(attn.q_norm.register_forward_hook(kept_rms(cols([h for h in range(n_q) if h not in drop_q]))))
        handles.append(attn.k_norm.register_forward_hook(kept_rms(cols([g for g in range(n_kv) if g not in drop_kv]))))
        handles.append(attn.o_proj.register_forward_pre_hook(zero_removed))
    try:
        with torch.no_grad():
            return model(IDS).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("drop_q, drop_kv", [([0, 2], []), ([2, 3], [1])])
def test_olmo2_head_pruning_slices_q_norm_and_k_norm(drop_q, drop_kv, tmp_path):
    model = olmo2()
    q_norm = decoder_layers(model)[0].self_attn.q_norm.weight.detach().clone()
    k_norm = decoder_layers(model)[0].self_attn.k_norm.weight.detach().clone()
    expected = kept_statistics_logits(model, drop_q, drop_kv)
    with torch.no_grad():
        assert not torch.allclose(expected, model(IDS).logits, atol=1e-3)  # the pruning matters
    remove_heads(model, [drop_q] * 3, [drop_kv] * 3)
    attn = decoder_layers(model)[0].self_attn
    assert torch.equal(attn.q_norm.weight, q_norm[cols([h for h in range(4) if h not in drop_q])])
    assert torch.equal(attn.k_norm.weight, k_norm[cols([g for g in range(2) if g not in drop_kv])])
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, got, rtol=0, atol=0)


def test_olmo2_with_no_head_removed_is_the_original():
    model = olmo2()
    with torch.no_grad():
        before = model(IDS).logits
    remove_heads(model, [[]] * 3, [[]] * 3)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)


def write_recipe(tmp_path, tiny_model_dir, text_file):
    body = {"model": str(tiny_model_dir), "output": "out",
            "calibration": {"path": str(text_file), "samples": 4, "seq_len": 16},
            "stages": [{"head_pruning": {"metric": "norm", "remove": 2, "multiple_of": 16}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    return load_recipe(tmp_path / "r.yaml")


@pytest.mark.parametrize("model_type", ["qwen2", "olmo2"])
def test_head_pruning_warns_about_engines_that_derive_head_dim(model_type, tmp_path, tiny_model_dir,
                                                               text_file, caplog):
    recipe = write_recipe(tmp_path, tiny_model_dir, text_file)
    warnings = check_against_model(recipe, ModelFacts(model_type, 4, 4, 2, 128, hidden_size=64))
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"stages[0].head_pruning: a head-pruned {model_type} checkpoint does not load in vLLM: its "
        f"{model_type} attention takes head_dim = hidden_size // num_attention_heads and ignores "
        "config.head_dim")
    assert "transformers loads it (it reads config.head_dim)" in warnings[0]
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == warnings


def test_head_pruning_on_llama_gives_no_warning(tmp_path, tiny_model_dir, text_file):
    recipe = write_recipe(tmp_path, tiny_model_dir, text_file)
    assert check_against_model(recipe, ModelFacts("llama", 4, 4, 2, 128, hidden_size=64)) == []


def test_cli_validate_prints_the_warning_and_succeeds(tmp_path, tiny_tokenizer, text_file):
    from click.testing import CliRunner

    from compress.cli import main
    from conftest import tiny_model

    folder = tmp_path / "tiny-qwen2"
    tiny_model("qwen2", 3).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    recipe = write_recipe(tmp_path, folder, text_file)
    result = CliRunner().invoke(main, ["validate", str(recipe.path)])
    assert result.exit_code == 0, result.output
    assert "warning: stages[0].head_pruning: a head-pruned qwen2 checkpoint does not load in vLLM" in result.stderr
    assert "ok (1 stage(s): head_pruning; model qwen2 with 3 layers" in result.stdout

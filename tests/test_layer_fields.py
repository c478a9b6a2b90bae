"""After layer removal or merging, every loader gives each kept layer its original attention type,
RoPE base and MLP kind: the per-layer lists are sliced and the pattern scalars some loaders derive
them from (gemma3 ``sliding_window_pattern``, qwen2 ``max_window_layers``, MoE
``decoder_sparse_step`` + ``mlp_only_layers``) are recomputed, or dropped where none can say it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from compress.errors import CompressError
from compress.surgery import decoder_layers, merge_layers, remove_layers
from conftest import TINY, randomize_norms

IDS = torch.randint(1, 320, (2, 12), generator=torch.Generator().manual_seed(3))
S, F = "sliding_attention", "full_attention"


def gemma3(layers: int = 6):  # pattern 3: S S F S S F; sliding RoPE base 100, full 5000
    return tf.Gemma3TextConfig(num_hidden_layers=layers, head_dim=16, sliding_window=4,
                               sliding_window_pattern=3, rope_local_base_freq=100.0,
                               rope_theta=5000.0, **TINY)


def qwen2(layers: int = 6):  # layers >= 3 slide: F F F S S S
    return tf.Qwen2Config(num_hidden_layers=layers, use_sliding_window=True, sliding_window=4,
                          max_window_layers=3, **TINY)


def qwen2_moe(layers: int = 6):  # MoE where (i + 1) % 2 == 0 and i not in [3]: layers 1, 5
    return tf.Qwen2MoeConfig(num_hidden_layers=layers, decoder_sparse_step=2, mlp_only_layers=[3],
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32, **TINY)


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_norms(model, seed)
    return model


def logits_skipping(model, skip: list[int]) -> torch.Tensor:
    """Independent reference: the unpruned model whose skipped layers return their input."""
    handles = [decoder_layers(model)[i].register_forward_hook(
        lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
        for i in skip]
    try:
        with torch.no_grad():
            return model(IDS, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def layer_facts(model) -> list[tuple]:
    """Per decoder layer: (sliding window or None, RoPE base, MLP is MoE), as the model built it."""
    c = model.config
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        attn_type = c.layer_types[i]
        rope = c.rope_parameters.get(attn_type, c.rope_parameters)["rope_theta"]
        out.append((getattr(layer.self_attn, "sliding_window", None), rope, "experts" in dict(layer.mlp.named_children())))
    return out


def scalar_only_types(folder, config_class) -> list[str]:
    """The attention types a loader derives from the saved pattern scalars alone (transformers
    without ``layer_types``; vLLM's gemma3 before it read ``layer_types``)."""
    saved = json.loads((folder / "config.json").read_text())
    saved.pop("layer_types")
    return config_class(**saved).layer_types


def save_reload(model, folder):
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


CASES = [  # (config, removed, expected kept types)
    (gemma3, [5], [S, S, F, S, S]),       # pattern 3 still describes the kept layers
    (gemma3, [2, 5], [S, S, S, S]),       # all sliding: pattern 5 (> the layer count)
    (gemma3, [0], [S, F, S, S, F]),       # no pattern describes it: the scalar is dropped
    (qwen2, [1, 4], [F, F, S, S]),        # max_window_layers 3 -> 2
    (qwen2, [3, 4, 5], [F, F, F]),        # max_window_layers 3 == the new layer count
    (qwen2_moe, [0], [F] * 5),
    (qwen2_moe, [2, 3], [F] * 4),
]


@pytest.mark.parametrize("make, removed, types", CASES)
def test_kept_layers_keep_attention_rope_and_mlp_after_save_and_reload(make, removed, types, tmp_path):
    model = build(make())
    original = layer_facts(model)
    expected_logits = logits_skipping(model, removed)
    kept = remove_layers(model, removed)
    assert model.config.layer_types == types
    reloaded = save_reload(model, tmp_path)
    assert layer_facts(reloaded) == [original[i] for i in kept]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS, use_cache=False).logits, expected_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, removed, types", [c for c in CASES if c[0] is not qwen2_moe])
def test_pattern_scalars_left_in_config_describe_the_kept_layers(make, removed, types, tmp_path, caplog):
    model = build(make())
    remove_layers(model, removed)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    dropped = [r.message for r in caplog.records if "no sliding_window_pattern describes" in r.message]
    if make is gemma3 and removed == [0]:
        assert "sliding_window_pattern" not in saved and "_sliding_window_pattern" not in saved
        assert dropped == [f"no sliding_window_pattern describes the kept layers' attention types {types}: "
                           "the field is dropped and config.layer_types is their only description"]
    else:
        assert dropped == []
        assert scalar_only_types(tmp_path, type(model.config)) == types


def test_gemma3_scalar_values_and_vllm_style_pattern():
    model = build(gemma3())
    remove_layers(model, [2, 5])
    assert model.config.sliding_window_pattern == 5
    # vLLM's older gemma3: sliding iff (layer_idx + 1) % sliding_window_pattern
    assert [S if (i + 1) % model.config.sliding_window_pattern else F for i in range(4)] == [S] * 4


def test_qwen2_max_window_layers_is_renumbered():
    model = build(qwen2())
    remove_layers(model, [1, 4])
    assert model.config.max_window_layers == 2
    model = build(qwen2())
    remove_layers(model, [3, 4, 5])
    assert model.config.max_window_layers == 3 == model.config.num_hidden_layers


@pytest.mark.parametrize("removed, step, mlp_only", [
    ([0], 1, [1, 2, 3]),      # kept 1..5: MoE, dense, dense, dense, MoE -> explicit list
    ([0, 1], 2, [1]),          # kept 2..5: dense, dense(3), dense, MoE: step 2 with [3] renumbered still fits
])
def test_moe_layers_are_rewritten_when_the_step_no_longer_fits(removed, step, mlp_only):
    model = build(qwen2_moe())
    remove_layers(model, removed)
    assert (model.config.decoder_sparse_step, model.config.mlp_only_layers) == (step, mlp_only)


def test_merged_layer_keeps_the_low_layers_kinds(tmp_path):
    model = build(gemma3())
    original = layer_facts(model)
    merge_layers(model, [(0, 1)])  # layers 0+1 -> 0; kept originals 0, 2, 3, 4, 5
    assert model.config.layer_types == [S, F, S, S, F]
    assert layer_facts(save_reload(model, tmp_path)) == [original[i] for i in [0, 2, 3, 4, 5]]


def test_an_unknown_per_layer_list_is_refused_before_any_change():
    config = tf.LlamaConfig(num_hidden_layers=4, **TINY)
    config.attention_chunk_layers = [0, 1, 1, 0]
    model = build(config)
    with pytest.raises(CompressError) as e:
        remove_layers(model, [1])
    assert str(e.value) == (
        "config.attention_chunk_layers looks like a per-layer field (a list of 4 for 4 layers) that "
        "compress does not know how to update for llama; layer removal would leave it stale. "
        "Remove the field from config.json if it is unused, or report the model type")
    assert len(decoder_layers(model)) == 4 and model.config.num_hidden_layers == 4

"""Layer removal keeps a plain, consistent transformers model (DESIGN: correctness peers get wrong)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compress.errors import CompressError
from compress.surgery import decoder_layers, remove_layers, skip_layers
from conftest import ARCHS, tiny_model

IDS = torch.randint(1, 320, (2, 12), generator=torch.Generator().manual_seed(1))


def logits_skipping(model, skip: list[int]) -> torch.Tensor:
    """Independent reference: the unpruned model with forward hooks that make the skipped layers
    return their input unchanged (identity residual)."""
    handles = [decoder_layers(model)[i].register_forward_hook(
        lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
        for i in skip]
    try:
        with torch.no_grad():
            return model(IDS, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_logits_equal_original_with_layers_skipped(arch):
    model = tiny_model(arch, 5)
    expected = logits_skipping(model, [1, 3])
    assert not torch.allclose(expected, model(IDS).logits, atol=1e-3)  # the skip matters
    kept = remove_layers(model, [3, 1])
    assert kept == [0, 2, 4]
    with torch.no_grad():
        got = model(IDS, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_and_layer_idx_are_consistent(arch):
    model = tiny_model(arch, 5)
    before = list(getattr(model.config, "layer_types", None) or [])
    remove_layers(model, [0, 3])
    assert model.config.num_hidden_layers == 3 == len(decoder_layers(model))
    if before:
        assert model.config.layer_types == [before[1], before[2], before[4]]
    idx = [m.layer_idx for layer in decoder_layers(model) for m in layer.modules() if hasattr(m, "layer_idx")]
    assert sorted(set(idx)) == [0, 1, 2]


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_cache_equals_without_after_removal(arch):
    model = tiny_model(arch, 5)
    remove_layers(model, [1, 2])
    prompt = IDS[:1, :6]
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape[1] == 18
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "gpt_neox"])
def test_save_and_reload_gives_identical_logits_and_config(arch, tmp_path):
    model = tiny_model(arch, 5)
    remove_layers(model, [4, 0])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.num_hidden_layers == 3
    assert getattr(config, "layer_types", None) == getattr(model.config, "layer_types", None)


@pytest.mark.parametrize("indices, message", [
    ([0, 1, 2, 3, 4], "cannot remove 5 of 5 layers: at least one must remain"),
    ([1, 1], "layer indices [1] are repeated"),
    ([5], "layer indices [5] are out of range: the model has 5 layers (valid: 0..4)"),
    ([-1], "layer indices [-1] are out of range"),
])
def test_bad_indices_are_clear_errors(indices, message):
    model = tiny_model("llama", 5)
    with pytest.raises(CompressError) as e:
        remove_layers(model, indices)
    assert message in str(e.value)
    assert len(decoder_layers(model)) == 5  # untouched


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(CompressError, match=r"model_type 'gpt2' is not supported for layer surgery; supported: \["):
        remove_layers(model, [0])


def test_skip_layers_restores_the_model():
    model = tiny_model("llama", 4)
    before = model(IDS).logits
    with skip_layers(model, [0, 2]):
        skipped = model(IDS, use_cache=False).logits
    torch.testing.assert_close(skipped, logits_skipping(model, [0, 2]))
    torch.testing.assert_close(model(IDS).logits, before)

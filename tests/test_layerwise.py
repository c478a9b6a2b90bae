"""Layer-by-layer execution gives exactly the full-model results (issue: scale to 70B on one GPU)."""

from __future__ import annotations

import pytest
import torch

from compress.data.tokens import pad_batch
from compress.importance import score_layers
from compress.layerwise import run_layerwise
from compress.surgery import decoder_layers
from conftest import ARCHS, tiny_model

GEN = torch.Generator().manual_seed(7)
SEQS = [torch.randint(1, 320, (n,), generator=GEN).tolist() for n in (12, 5, 9, 12)]
BATCHES = [pad_batch(SEQS[:3], 0), pad_batch(SEQS[3:], 0)]  # padded and unpadded batches


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("metric", ["bi", "angular_layer", "relative_magnitude"])
def test_layerwise_scores_equal_full_model_scores(arch, metric):
    model = tiny_model(arch, 5)
    full = score_layers(model, metric, BATCHES, progress=False)
    layerwise = score_layers(model, metric, BATCHES, progress=False, layerwise_on=torch.device("cpu"))
    assert layerwise == pytest.approx(full, abs=1e-5)


def test_each_layer_sees_exactly_the_full_models_inputs_and_outputs():
    model = tiny_model("qwen3", 5)  # mixed sliding / full attention layers
    seen_full = {}

    def record(i):
        def hook(module, args, kwargs, out):
            seen_full[i] = (args[0] if args else kwargs["hidden_states"], out[0] if isinstance(out, tuple) else out)
        return hook
    hooks = [layer.register_forward_hook(record(i), with_kwargs=True)
             for i, layer in enumerate(decoder_layers(model))]
    with torch.no_grad():
        model.base_model(**BATCHES[0], use_cache=False)
    for h in hooks:
        h.remove()
    seen_layerwise = {}
    run_layerwise(model, BATCHES[:1], lambda i, x, y, m: seen_layerwise.setdefault(i, (x, y)),
                  torch.device("cpu"), progress=False)
    for i in range(5):
        torch.testing.assert_close(seen_layerwise[i][0], seen_full[i][0], rtol=0, atol=0)
        torch.testing.assert_close(seen_layerwise[i][1], seen_full[i][1], rtol=0, atol=0)


def test_model_is_left_intact():
    model = tiny_model("llama", 4)
    ids = torch.tensor([SEQS[0]])
    before = model(ids).logits
    run_layerwise(model, BATCHES, lambda *a: None, torch.device("cpu"), progress=False)
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in decoder_layers(model))
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_ppl_drop_has_no_layerwise_mode():
    with pytest.raises(ValueError, match="ppl_drop needs full forward passes"):
        score_layers(tiny_model("llama", 3), "ppl_drop", BATCHES, layerwise_on=torch.device("cpu"))


@pytest.mark.gpu
def test_layerwise_on_gpu_keeps_weights_on_cpu_and_matches():
    model = tiny_model("llama", 4)
    full = score_layers(model, "bi", BATCHES, progress=False)
    cuda = torch.device("cuda")
    got = score_layers(model, "bi", BATCHES, progress=False, layerwise_on=cuda)
    assert got == pytest.approx(full, abs=1e-4)
    assert all(p.device.type == "cpu" for p in model.parameters())  # everything back where it was


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_head_and_channel_importance_layerwise_equal_full(arch):
    from compress.importance.channels import channel_scores
    from compress.importance.heads import head_scores

    model, cpu = tiny_model(arch, 4), torch.device("cpu")
    torch.testing.assert_close(head_scores(model, BATCHES, layerwise_on=cpu), head_scores(model, BATCHES), rtol=1e-6, atol=1e-6)
    for a, b in zip(channel_scores(model, BATCHES, layerwise_on=cpu), channel_scores(model, BATCHES)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

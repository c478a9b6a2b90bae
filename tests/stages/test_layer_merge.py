"""Sliding layer merging (SLM): the paper's merge rule, the walk, bookkeeping, reload, replay."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.importance.similarity import final_hidden_states, linear_cka, mean_cosine
from compress.stages.base import ModelFacts, StageContext
from compress.stages.layer_merge import LayerMerge, LayerMergeConfig, slm_windows
from compress.surgery import _merge_params, decoder_layers, merge_layers, merged_weights
from conftest import tiny_model

IDS = torch.randint(1, 320, (2, 12), generator=torch.Generator().manual_seed(4))
CAL = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}]


def ctx(n: int) -> StageContext:
    return StageContext(CAL, None, torch.device("cpu"), list(range(n)), logging.getLogger("t"), progress=False)


def test_delta_sum_is_base_plus_sum_of_deltas_and_differs_from_top():
    model = tiny_model("llama", 5)
    layers = decoder_layers(model)
    p = [_merge_params(layers[j]) for j in range(5)]
    merged = merged_weights(layers, 1, 3, "delta_sum")
    for k in merged:
        expected = p[1][k] + (p[2][k] - p[1][k]) + (p[3][k] - p[1][k])
        torch.testing.assert_close(merged[k], expected, rtol=1e-6, atol=1e-6)
    top = merged_weights(layers, 1, 3, "top")
    assert all(torch.equal(top[k], p[3][k]) for k in top)
    assert not torch.allclose(merged["mlp.up_proj.weight"], top["mlp.up_proj.weight"])


def test_merging_identical_layers_gives_that_layer_back():
    model = tiny_model("qwen3", 5)
    layers = decoder_layers(model)
    for j in (2, 3):
        layers[j].load_state_dict(layers[1].state_dict())
    original = {k: v.clone() for k, v in layers[1].state_dict().items()}
    merge_layers(model, [(1, 3)], "delta_sum")
    for k, v in decoder_layers(model)[1].state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=1e-6)


def test_merged_model_bookkeeping_reload_and_cached_generation(tmp_path):
    model = tiny_model("qwen3", 6)  # mixed sliding/full attention layers
    types = list(model.config.layer_types)
    removed = merge_layers(model, [(3, 4), (0, 1)], "delta_sum")
    assert removed == [1, 4] and model.config.num_hidden_layers == 4
    assert model.config.layer_types == [types[0], types[2], types[3], types[5]]
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1, 2, 3]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(reloaded.generate(IDS[:1, :4], **kw), reloaded.generate(IDS[:1, :4], use_cache=False, **kw))


def test_walk_never_touches_the_last_layer_and_threshold_zero_merges_everything_else():
    model = tiny_model("llama", 5)
    ref = final_hidden_states(model, CAL)
    assert slm_windows(model, CAL, ref, 0.0, "cosine", "delta_sum") == [(0, 3)]
    assert slm_windows(model, CAL, ref, 1.0 + 1e-9, "cosine", "delta_sum") == []


def test_remove_search_hits_the_count_records_originals_and_replays():
    model, twin = tiny_model("llama", 6), tiny_model("llama", 6)
    stage = LayerMerge(LayerMergeConfig(remove=2, similarity="cka"))
    record = stage.apply(model, ctx(6))
    assert model.config.num_hidden_layers == 4 and len(record.removed_layers) == 2
    assert sum(len(g) - 1 for g in record.details["merged_groups_original"]) == 2
    stage.replay(twin, record.replay)
    with torch.no_grad():
        torch.testing.assert_close(twin(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_similarity_measures():
    a = [torch.randn(20, 8, generator=torch.Generator().manual_seed(0))]
    assert mean_cosine(a, a) == pytest.approx(1.0) and linear_cka(a, a) == pytest.approx(1.0)
    assert linear_cka(a, [2 * a[0] + 3]) == pytest.approx(1.0)  # invariant to scale and shift
    assert mean_cosine(a, [-a[0]]) == pytest.approx(-1.0)


def test_checks_and_config():
    assert "max 3" in LayerMerge(LayerMergeConfig(remove=4)).check(ModelFacts("llama", 5))[0]
    with pytest.raises(ValueError, match="give exactly one of threshold"):
        LayerMergeConfig(threshold=0.7, remove=2)
    assert LayerMerge(LayerMergeConfig(threshold=0.72)).layers_removed(30) == 0


def test_pipeline_provenance_for_a_merge(tmp_path, tiny_model_dir, text_file):
    import json

    import yaml

    from compress.pipeline import run_recipe

    body = {"model": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "output": "run",
            "calibration": {"path": str(text_file), "samples": 2, "seq_len": 16},
            "stages": [{"layer_merge": {"remove": 2}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    report = run_recipe(tmp_path / "r.yaml", progress=False)
    assert [r["layers"] for r in report["rows"]] == [5, 3]
    prov = json.loads((tmp_path / "run/checkpoints/layer_merge/compress.json").read_text())
    groups = prov["stages"][0]["details"]["merged_groups_original"]
    merged_away = sorted(i for g in groups for i in g[1:])
    assert prov["removed_layers"] == merged_away and len(prov["kept_layers"]) == 3


def test_layerwise_merge_search_equals_the_full_path():
    cpu = torch.device("cpu")
    model = tiny_model("qwen3", 6)
    full_ref = final_hidden_states(model, CAL)
    lw_ref = final_hidden_states(model, CAL, cpu)
    for a, b in zip(full_ref, lw_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for t in (0.5, 0.8, 0.95):
        assert slm_windows(model, CAL, full_ref, t, "cosine", "delta_sum") == \
            slm_windows(model, CAL, lw_ref, t, "cosine", "delta_sum", cpu)


def test_own_calibration_set_is_used(tmp_path, tiny_model_dir, text_file):
    import yaml

    from compress.pipeline import run_recipe

    body = {"model": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "output": "run",
            "stages": [{"layer_merge": {"remove": 1, "calibration": {"path": str(text_file), "samples": 3,
                                                                      "seq_len": 12}}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    report = run_recipe(tmp_path / "r.yaml", progress=False)  # no top-level calibration needed
    assert [r["layers"] for r in report["rows"]] == [5, 4]

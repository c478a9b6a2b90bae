"""Head and MLP-width pruning: standard configs, exact against zeroing references, reload, GQA."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.errors import CompressError
from compress.importance.channels import channel_scores
from compress.importance.heads import head_scores
from compress.stages.base import ModelFacts, StageContext
from compress.stages.head_pruning import HeadPruning, HeadPruningConfig
from compress.stages.width_pruning import WidthPruning, WidthPruningConfig, kept_width
from compress.surgery import decoder_layers, remove_channels, remove_heads
from conftest import tiny_model

GEN = torch.Generator().manual_seed(11)
IDS = torch.randint(1, 320, (2, 10), generator=GEN)
CAL = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}]


def ctx() -> StageContext:
    return StageContext(calibration=CAL, tokenizer=None, device=torch.device("cpu"),
                        original_layer_ids=[0, 1, 2], log=logging.getLogger("test"), progress=False)


def zeroed_logits(model, module_of, zero_slices_per_layer) -> torch.Tensor:
    """Reference: the unpruned model with some input features of a projection zeroed."""
    def hook_for(slices):
        def pre(mod, args):
            x = args[0].clone()
            for sl in slices:
                x[..., sl] = 0
            return (x,)
        return pre
    handles = [module_of(layer).register_forward_pre_hook(hook_for(zero_slices_per_layer[i]))
               for i, layer in enumerate(decoder_layers(model))]
    with torch.no_grad():
        out = model(IDS).logits
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_head_pruning_equals_zeroing_those_heads_and_reloads(arch, tmp_path):
    model = tiny_model(arch, 3)  # 4 query heads, 2 KV groups of 2, head_dim 16
    stage = HeadPruning(HeadPruningConfig(remove=2, multiple_of=32))  # kept 2 x 16 = 32
    scores = head_scores(model, CAL, "norm")
    queries, kvs = stage.choose(scores, 4, 2)
    assert all(len(q) == 2 and {h // 2 for h in q} == {0, 1} for q in queries)  # one per group
    expected = zeroed_logits(model, lambda l: l.self_attn.o_proj,
                             [[slice(h * 16, (h + 1) * 16) for h in q] for q in queries])
    record = stage.apply(model, ctx())
    assert record.replay["query_heads"] == queries
    assert (record.details["multiple_of"], record.details["kept_query_width"]) == (32, 32)
    assert decoder_layers(model)[0].self_attn.o_proj.in_features == 32
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(reloaded.generate(IDS[:1, :4], **kw), reloaded.generate(IDS[:1, :4], use_cache=False, **kw))


def test_whole_kv_groups_and_replay():
    model, twin = tiny_model("qwen3", 3), tiny_model("qwen3", 3)
    config = HeadPruningConfig(remove=1, kv_groups=True, metric="ablation", multiple_of=16)
    record = HeadPruning(config).apply(model, ctx())
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    assert all(len(k) == 1 for k in record.replay["kv_heads"])
    HeadPruning(HeadPruningConfig(remove=1, kv_groups=True, multiple_of=16)).replay(twin, record.replay)
    with torch.no_grad():
        torch.testing.assert_close(twin(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_head_ablation_score_is_the_nll_increase():
    from compress.importance.ppl_drop import calibration_nll

    model = tiny_model("llama", 2)
    scores = head_scores(model, CAL, "ablation")
    base = calibration_nll(model, CAL)
    handle = decoder_layers(model)[1].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: (torch.cat([a[0][..., :48], torch.zeros_like(a[0][..., 48:])], -1),))
    assert float(scores[1, 3]) == pytest.approx(calibration_nll(model, CAL) - base, abs=1e-6)
    handle.remove()


@pytest.mark.parametrize("heads, kv, message", [
    ([[0], [0], [0]], None, "every kept KV group must keep the same, non-zero number of query heads"),
    ([[2, 3], [2, 3], [2, 3]], None, "every kept KV group must keep the same"),
    ([[0, 2], [0, 2], [1]], None, "every kept KV group must keep the same"),
    ([[0, 2]] * 3, [[0]] * 3, "removing KV head 0 needs its query heads [0, 1] removed too"),
    ([[0, 2]] * 2, None, "give heads to remove for each of the 3 layers"),
])
def test_head_removal_that_would_break_gqa_is_refused(heads, kv, message):
    with pytest.raises(CompressError) as e:
        remove_heads(tiny_model("llama", 3), heads, kv)
    assert message in str(e.value)


def test_head_pruning_checks():
    facts = ModelFacts("llama", 30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
    assert HeadPruning(HeadPruningConfig(remove=3)).check(facts) == []
    assert "cannot come equally from 3 KV groups" in HeadPruning(HeadPruningConfig(remove=4)).check(facts)[0]
    assert "would remove 9 of 9 query heads" in HeadPruning(HeadPruningConfig(remove=9)).check(facts)[0]
    assert "would remove 3 of 3 KV groups" in HeadPruning(HeadPruningConfig(remove=3, kv_groups=True)).check(facts)[0]
    assert "not supported" in HeadPruning(HeadPruningConfig(remove=3)).check(ModelFacts("gpt_neox", 4, 4, 4, 16))[0]


def test_head_pruning_multiple_of_is_checked_on_the_kept_query_width():
    facts = ModelFacts("llama", 30, 9, 3, 1536, hidden_size=576)  # SmolLM2-135M: head_dim 576 / 9 = 64
    assert HeadPruning(HeadPruningConfig(remove=3)).check(facts) == []  # 6 x 64 = 384 = 3 x 128
    assert HeadPruning(HeadPruningConfig(remove=6)).check(facts) == [
        "remove: leaves 3 query heads x head_dim 64 = 192 (o_proj input), not a multiple of multiple_of: 128; "
        "use remove: 3, or set multiple_of: 64 (or 1: any count)"]
    assert HeadPruning(HeadPruningConfig(remove=2, kv_groups=True)).check(facts) == [
        "remove: leaves 3 query heads x head_dim 64 = 192 (o_proj input), not a multiple of multiple_of: 128; "
        "use remove: 1, or set multiple_of: 64 (or 1: any count)"]
    assert HeadPruning(HeadPruningConfig(remove=6, multiple_of=64)).check(facts) == []
    after = HeadPruning(HeadPruningConfig(remove=2, kv_groups=True, multiple_of=64)).facts_after(facts)
    assert (after.num_attention_heads, after.num_key_value_heads, after.head_dim) == (3, 1, 64)
    after = HeadPruning(HeadPruningConfig(remove=3)).facts_after(facts)
    assert (after.num_attention_heads, after.num_key_value_heads, after.head_dim) == (6, 3, 64)
    assert after.linear_inputs()["o_proj"][0] == 384  # not hidden_size // heads = 96


def test_head_pruning_apply_refuses_a_width_off_the_multiple():
    with pytest.raises(CompressError) as e:
        HeadPruning(HeadPruningConfig(remove=2)).apply(tiny_model("llama", 3), ctx())
    assert str(e.value) == ("head_pruning.remove: leaves 2 query heads x head_dim 16 = 32 (o_proj input), not a "
                            "multiple of multiple_of: 128; set multiple_of: 16 (or 1: any count)")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_width_pruning_equals_zeroing_those_channels_and_reloads(arch, tmp_path):
    model = tiny_model(arch, 3)  # intermediate 128
    scores = channel_scores(model, CAL)
    drop = [sorted(s.argsort(stable=True)[:32].tolist()) for s in scores]
    expected = zeroed_logits(model, lambda l: l.mlp.down_proj, drop)
    record = WidthPruning(WidthPruningConfig(fraction=0.25, multiple_of=32)).apply(model, ctx())
    assert record.replay["channels"] == drop and model.config.intermediate_size == 96
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.intermediate_size == 96
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_channel_score_is_mean_abs_activation_times_column_norm():
    model = tiny_model("llama", 1)
    seen = []
    h = decoder_layers(model)[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(IDS)
    h.remove()
    expected = seen[0].abs().mean(dim=(0, 1)) * decoder_layers(model)[0].mlp.down_proj.weight.norm(dim=0)
    torch.testing.assert_close(channel_scores(model, CAL)[0], expected, rtol=1e-5, atol=1e-7)


def test_width_checks_and_errors():
    facts = ModelFacts("llama", 30, 9, 3, intermediate_size=1536)
    assert WidthPruning(WidthPruningConfig(remove=384)).check(facts) == []
    assert "would leave 0 of 1536 MLP channels" in WidthPruning(WidthPruningConfig(remove=1536)).check(facts)[0]
    assert WidthPruning(WidthPruningConfig(remove=32)).check(facts) == [
        "remove: removing 32 of 1536 MLP channels leaves 1504, which multiple_of: 128 rounds up to 1536 "
        "(nothing removed); remove at least 128 channels, or lower multiple_of (1 removes exactly the asked count)"]
    assert WidthPruning(WidthPruningConfig(fraction=0.5)).check(ModelFacts("llama", 2, 4, 2, 128)) == [
        "fraction: removing 64 of 128 MLP channels leaves 64, which multiple_of: 128 rounds up to 128 "
        "(nothing removed); lower multiple_of (1 removes exactly the asked count)"]
    with pytest.raises(CompressError, match="same number of distinct channels"):
        remove_channels(tiny_model("llama", 2), [[0, 1], [0]])


@pytest.mark.parametrize("width, remove, multiple_of, kept", [
    (11008, 2752, 128, 8320),  # Llama-2-7B, fraction 0.25: 8256 = 64.5 x 128 rounds up
    (11008, 2752, 64, 8256),
    (1536, 384, 128, 1152),    # SmolLM2-135M, fraction 0.25: already a multiple
    (1536, 32, 128, 1536),     # nothing left to remove
    (1536, 32, 32, 1504),
    (1536, 32, 1, 1504),
    (1500, 100, 128, 1408),
    (1500, 50, 128, 1500),     # 1450 rounds up past the width: capped
])
def test_kept_width_rounds_up_to_the_multiple(width, remove, multiple_of, kept):
    assert kept_width(width, remove, multiple_of) == kept


def test_width_pruning_apply_refuses_a_rounding_that_removes_nothing():
    with pytest.raises(CompressError) as e:
        WidthPruning(WidthPruningConfig(fraction=0.25)).apply(tiny_model("llama", 2), ctx())  # 96 -> 128
    assert str(e.value) == ("width_pruning.fraction: removing 32 of 128 MLP channels leaves 96, which "
                            "multiple_of: 128 rounds up to 128 (nothing removed); lower multiple_of "
                            "(1 removes exactly the asked count)")


def test_width_pruning_keeps_a_multiple_and_records_it():
    model, exact = tiny_model("llama", 3), tiny_model("llama", 3)
    record = WidthPruning(WidthPruningConfig(remove=40, multiple_of=32)).apply(model, ctx())  # 88 -> 96
    assert model.config.intermediate_size == 96
    assert all(layer.mlp.down_proj.in_features == 96 for layer in decoder_layers(model))
    assert record.details == {"removed_channels_per_layer": 32, "requested_channels_per_layer": 40,
                              "multiple_of": 32, "intermediate_size": 96}
    assert record.summary == ("MLP width 128 -> 96 in every layer (activation x weight importance; 40 asked, "
                              "kept width rounded up to a multiple of 32)")
    # the same 32 lowest-scoring channels an exact remove: 32 drops
    assert record.replay == WidthPruning(WidthPruningConfig(remove=32, multiple_of=1)).apply(exact, ctx()).replay
    facts = ModelFacts("llama", 3, 4, 2, 128, hidden_size=64)
    assert WidthPruning(WidthPruningConfig(remove=40, multiple_of=32)).facts_after(facts).intermediate_size == 96

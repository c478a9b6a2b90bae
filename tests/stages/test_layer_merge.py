"""Sliding layer merging (SLM): the paper's merge rule, the walk, bookkeeping, reload, replay."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.importance.similarity import final_hidden_states, linear_cka, sample_cosine, token_cosine
from compress.stages.base import ModelFacts, StageContext
from compress.stages.layer_merge import LayerMerge, LayerMergeConfig, slm_windows
from compress.surgery import _merge_params, decoder_layers, merge_layers, merged_view, merged_weights
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
    assert slm_windows(model, CAL, ref, 0.0, "token_cosine", "delta_sum") == [(0, 3)]
    assert slm_windows(model, CAL, ref, 1.0 + 1e-9, "token_cosine", "delta_sum") == []
    # the reference loop ends without committing a window that grows past layer 0
    assert slm_windows(model, CAL, ref, -1.0, "sample_cosine", "delta_sum", walk="paper") == [(0, 3)]
    assert slm_windows(model, CAL, ref, -1.0, "sample_cosine", "delta_sum", walk="reference") == []


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
    assert token_cosine(a, a) == pytest.approx(1.0) and linear_cka(a, a) == pytest.approx(1.0)
    assert linear_cka(a, [2 * a[0] + 3]) == pytest.approx(1.0)  # invariant to scale and shift
    assert token_cosine(a, [-a[0]]) == pytest.approx(-1.0)


def test_sample_cosine_is_the_cosine_of_each_flattened_sample_averaged():
    gen = torch.Generator().manual_seed(1)
    a = [torch.randn(t, 6, generator=gen) for t in (5, 3, 7)]  # samples of different lengths
    b = [x + 0.8 * torch.randn(x.shape, generator=gen) for x in a]
    b[1][0] *= 30  # one token with a large norm: it dominates its sample's flattened cosine
    per_sample = []
    for x, y in zip(a, b):
        u, v = x.reshape(-1).tolist(), y.reshape(-1).tolist()
        dot = sum(p * q for p, q in zip(u, v))
        per_sample.append(dot / (sum(p * p for p in u) ** 0.5 * sum(q * q for q in v) ** 0.5))
    assert sample_cosine(a, b) == pytest.approx(sum(per_sample) / 3, abs=1e-12)
    assert abs(sample_cosine(a, b) - token_cosine(a, b)) > 0.01  # not the per-token mean


def test_final_hidden_states_are_hf_hidden_states_last_per_sample_without_padding():
    model = tiny_model("llama", 3)
    ids = torch.randint(1, 320, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])  # right padding on the second row
    got = final_hidden_states(model, [{"input_ids": ids, "attention_mask": mask}])
    assert [tuple(g.shape) for g in got] == [(6, 64), (4, 64)]
    with torch.no_grad():  # the reference's outputs.hidden_states[-1] (after the final norm)
        for row, n in ((0, 6), (1, 4)):
            hs = model(ids[row:row + 1, :n], output_hidden_states=True).hidden_states[-1][0]
            torch.testing.assert_close(got[row], hs, rtol=1e-5, atol=1e-5)


THRESHOLDS = (-1.0, 0.3, 0.4, 0.6, 0.9)


def reference_slm(model, prompts: torch.Tensor, threshold: float, rule: str, strict: bool = True,
                  commit_last: bool = False) -> list[tuple[int, int]]:
    """The SLM reference loop transcribed (920927/SLM-a-sliding-layer-merging-method, SLM.py at
    b8229d0: ``cal_sim``, ``merge_layers_return_model`` and the ``while low_lay >= 0`` loop; batch
    size 1). ``strict=False, commit_last=True`` is the variant our ``walk: paper`` implements."""
    def merge_layers_return_model(m, low_lay, high_lay):
        m = copy.deepcopy(m)
        if low_lay < high_lay:  # the reference adds nothing and deletes nothing otherwise
            merge_layers(m, [(low_lay, high_lay)], rule)
        return m

    def last_hidden(m):
        with torch.no_grad():
            return [m(prompts[i:i + 1], output_hidden_states=True, use_cache=False).hidden_states[-1]
                    for i in range(len(prompts))]

    def cal_sim(hidden_states, model2):
        sims = [torch.cosine_similarity(h1.squeeze(0).flatten().unsqueeze(0), h2.squeeze(0).flatten().unsqueeze(0))
                for h1, h2 in zip(hidden_states, last_hidden(model2))]
        return sum(s.item() for s in sims) / len(sims)

    hidden_states1 = last_hidden(model)
    short_model, records = model, []
    high_lay = len(decoder_layers(model)) - 1 - 1
    low_lay = high_lay - 1
    while low_lay >= 0:
        sim_value = cal_sim(hidden_states1, merge_layers_return_model(short_model, low_lay, high_lay))
        if sim_value > threshold or (not strict and sim_value == threshold):
            low_lay -= 1
        else:
            if low_lay + 1 != high_lay:
                short_model = merge_layers_return_model(short_model, low_lay + 1, high_lay)
                records.append(list(range(low_lay + 1, high_lay + 1)))
                high_lay = low_lay
            else:
                high_lay -= 1
                low_lay -= 1
    if commit_last and low_lay + 1 < high_lay:
        records.append(list(range(low_lay + 1, high_lay + 1)))
    return [(r[0], r[-1]) for r in records if r]


def test_walks_choose_the_windows_of_the_transcribed_reference_loop():
    model = tiny_model("llama", 7)
    prompts = torch.randint(1, 320, (2, 8), generator=torch.Generator().manual_seed(4))
    cal = [{"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}]
    ref = final_hidden_states(model, cal)
    seen = set()
    for t in THRESHOLDS:
        ours = slm_windows(model, cal, ref, t, "sample_cosine", "delta_sum", walk="reference")
        assert ours == reference_slm(model, prompts, t, "delta_sum"), t
        paper = slm_windows(model, cal, ref, t, "sample_cosine", "delta_sum", walk="paper")
        assert paper == reference_slm(model, prompts, t, "delta_sum", strict=False, commit_last=True), t
        seen.add((tuple(ours), tuple(paper)))
    assert len(seen) == len(THRESHOLDS)  # every threshold makes a different choice


def test_reference_walk_needs_strictly_more_than_the_threshold():
    model = tiny_model("llama", 5)
    ref = final_hidden_states(model, CAL)
    with merged_view(model, [(2, 3)], "delta_sum"):  # the first window the walk tries
        tie = sample_cosine(ref, final_hidden_states(model, CAL))
    assert slm_windows(model, CAL, ref, tie, "sample_cosine", "delta_sum", walk="paper")[0][1] == 3
    assert all(high < 3 for _, high in slm_windows(model, CAL, ref, tie, "sample_cosine", "delta_sum",
                                                    walk="reference"))


def test_progress_bar_counts_the_windows_tried_and_respects_progress(capsys):
    model, twin = tiny_model("llama", 6), tiny_model("llama", 6)
    tried = []
    slm_windows(model, CAL, final_hidden_states(model, CAL), 0.5, "sample_cosine", "delta_sum",
                on_try=lambda: tried.append(1))
    capsys.readouterr()
    LayerMerge(LayerMergeConfig(threshold=0.5)).apply(model, ctx(6))
    assert capsys.readouterr().err == ""  # progress=False: silent
    loud = StageContext(CAL, None, torch.device("cpu"), list(range(6)), logging.getLogger("t"), progress=True)
    LayerMerge(LayerMergeConfig(threshold=0.5)).apply(twin, loud)
    err = capsys.readouterr().err
    assert "layer_merge" in err and f"{len(tried)}window" in err
    assert len(tried) >= 2


def test_checks_and_config():
    assert "max 3" in LayerMerge(LayerMergeConfig(remove=4)).check(ModelFacts("llama", 5))[0]
    with pytest.raises(ValueError, match="give exactly one of threshold"):
        LayerMergeConfig(threshold=0.7, remove=2)
    assert LayerMerge(LayerMergeConfig(threshold=0.72)).layers_removed(30) == 0
    defaults = LayerMergeConfig(threshold=0.72)  # the reference's threshold goes with its measure
    assert (defaults.similarity, defaults.walk, defaults.merge_rule) == ("sample_cosine", "paper", "delta_sum")
    with pytest.raises(ValueError, match="walk"):
        LayerMergeConfig(threshold=0.72, walk="slm")
    with pytest.raises(ValueError, match="extra"):
        LayerMergeConfig(threshold=0.72, treshold=0.5)


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
        assert slm_windows(model, CAL, full_ref, t, "sample_cosine", "delta_sum") == \
            slm_windows(model, CAL, lw_ref, t, "sample_cosine", "delta_sum", cpu)


def test_own_calibration_set_is_used(tmp_path, tiny_model_dir, text_file):
    import yaml

    from compress.pipeline import run_recipe

    body = {"model": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "output": "run",
            "stages": [{"layer_merge": {"remove": 1, "calibration": {"path": str(text_file), "samples": 3,
                                                                      "seq_len": 12}}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    report = run_recipe(tmp_path / "r.yaml", progress=False)  # no top-level calibration needed
    assert [r["layers"] for r in report["rows"]] == [5, 4]


def unmemoized_search(model, cal, reference, c: LayerMergeConfig) -> tuple[float, list, int]:
    """The ``remove`` bisection as it was before the memo: every walk measures every state it meets."""
    lo, hi, best, walks = 0.0, 1.0, (1.0, []), 0
    for _ in range(c.search_steps):
        mid = (lo + hi) / 2
        windows = slm_windows(model, cal, reference, mid, c.similarity, c.merge_rule, walk=c.walk)
        walks += 1
        n = sum(high - low for low, high in windows)
        if n <= c.remove and n >= sum(high - low for low, high in best[1]):
            best = (mid, windows)
        if n == c.remove:
            break
        lo, hi = (mid, hi) if n > c.remove else (lo, mid)
    return best[0], best[1], walks


@pytest.mark.parametrize("remove, similarity, walk", [(1, "sample_cosine", "paper"), (3, "cka", "paper"),
                                                      (1, "token_cosine", "reference")])
def test_remove_search_memo_measures_fewer_states_and_chooses_the_same_merge(monkeypatch, remove, similarity, walk):
    import compress.stages.layer_merge as lm

    model = tiny_model("llama", 9)
    cal = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}]
    ref = final_hidden_states(model, cal)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return final_hidden_states(*args, **kwargs)

    monkeypatch.setattr(lm, "final_hidden_states", counted)
    config = LayerMergeConfig(remove=remove, similarity=similarity, walk=walk, search_steps=10)
    threshold, windows, walks = unmemoized_search(model, cal, ref, config)
    plain = len(calls)
    calls.clear()
    memo = {}
    got = LayerMerge(config).search(model, cal, ref, logging.getLogger("t"), memo=memo)
    assert got == (threshold, windows)
    assert walks >= 3 and len(calls) == len(memo) < plain  # one forward per distinct merge state
    # every stored similarity is the one measured afresh for that merge state
    state = next(iter(memo))
    with merged_view(model, list(state), "delta_sum"):
        assert memo[state] == lm.SIMILARITIES[similarity](ref, final_hidden_states(model, cal))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: mixed sliding/full attention masks
def test_suffix_runner_gives_the_full_forward_values_exactly(arch):
    from compress.importance.suffix import SuffixRunner

    model = tiny_model(arch, 6)
    mask = torch.tensor([[1] * 12, [1] * 9 + [0] * 3])  # right padding on the second row
    cal = [{"input_ids": IDS, "attention_mask": mask}, {"input_ids": IDS[:1, :7], "attention_mask": mask[:1, :7]}]
    runner = SuffixRunner(model, cal)
    for a, b in zip(runner(0), final_hidden_states(model, cal), strict=True):
        assert torch.equal(a, b)
    for state in ([(3, 4)], [(3, 4), (1, 2)], [(0, 4)], [(2, 4), (0, 1)]):
        with merged_view(model, state, "delta_sum"):
            full = final_hidden_states(model, cal)
            got = runner(min(lo for lo, _ in state))
        assert len(got) == len(full) == 3 and all(torch.equal(a, b) for a, b in zip(got, full))
    assert runner.layer_calls == 6 + 3 + 5 + 6 + 6


def test_stage_search_with_memo_and_suffix_chooses_what_the_plain_search_chooses():
    model = tiny_model("llama", 9)
    ref = final_hidden_states(model, CAL)
    config = LayerMergeConfig(remove=3, similarity="cka", search_steps=10)
    threshold, windows, _ = unmemoized_search(model, CAL, ref, config)
    record = LayerMerge(config).apply(model, ctx(9))
    assert (record.details["threshold"], record.details["windows"]) == (threshold, sorted(windows))
    details = record.details
    # 9 layers: a plain forward runs 9 decoder layers; the suffix runs fewer per measured state
    assert 0 < details["decoder_layers_run"] < 9 * details["merge_states_measured"]

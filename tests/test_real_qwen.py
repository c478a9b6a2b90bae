"""On the real Qwen2.5-Coder-1.5B-Instruct (qwen2: 28 layers, GQA 12/2, q/k/v biases, untied
embeddings), the second real architecture: scoring and surgery give what an independent computation
gives. Opt-in asset (`bash ../shared/assets/fetch.sh --only qwen15`, 3.3 GiB): the tests skip with a
reason when it is absent and never fetch it. Short sequences (32-64 tokens) keep each test to
seconds on 2 CPU cores (bfloat16 weights, as the asset ships)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.data.local import load_local_texts
from compress.data.tokens import calibration_batches, tokenize_documents
from compress.importance import score_layers
from compress.model_io import load_model
from compress.surgery import decoder_layers, merge_layers, remove_layers

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
NAME = "qwen2.5-coder-1.5b-instruct"
REMOVE = [3, 9, 14, 20, 21, 24, 26]  # 7 of 28 (25%), spread out, two adjacent


@pytest.fixture(scope="module")
def qwen_dir() -> Path:
    """The qwen15 asset folder; skip (never fetch: 1.1 GB download, 3.5 min) when it is absent."""
    out = Path(os.environ.get("COMPRESS_ASSETS", REPO.parent / "shared-cache"))
    folder = out / "models" / NAME
    if not (folder / ".fetched").exists():
        why = f"opt-in asset {folder} absent: run `bash ../shared/assets/fetch.sh --only qwen15`"
        if os.environ.get("COMPRESS_REQUIRE_QWEN15") == "1":  # CI fetches it: absent there is a failure
            pytest.fail(why)
        pytest.skip(why)
    return folder


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    model, tok = load_model(str(qwen_dir), dtype=torch.bfloat16, device=torch.device("cpu"))
    return model, tok


@pytest.fixture(scope="module")
def text_ids(qwen, qwen_dir) -> torch.Tensor:
    _, tok = qwen
    book = qwen_dir.parents[1] / "books" / "austen-prideprejudice.txt"
    if not book.exists():
        pytest.skip(f"{book} absent: run `bash ../shared/assets/fetch.sh` (books)")
    return tokenize_documents(tok, load_local_texts(book), 4096)


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def test_the_asset_is_the_architecture_we_claim(qwen):
    model, tok = qwen
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size) == ("qwen2", 28, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.tie_word_embeddings) == (12, 2, False)
    attn = decoder_layers(model)[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.o_proj.bias is None
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]


def test_bi_scores_equal_an_independent_computation_from_hidden_states(qwen, text_ids):
    """score_layers('bi') (forward hooks) == 1 - mean token cosine of consecutive entries of
    output_hidden_states; its last entry is after the final norm, so the last layer's output is
    taken as the final norm's input (a hook on model.norm)."""
    model, _ = qwen
    batches = calibration_batches(text_ids, 2, 48, seed=0, batch_size=1)
    ours = score_layers(model, "bi", batches, progress=False)

    pre_norm: list[torch.Tensor] = []
    handle = model.model.norm.register_forward_hook(lambda m, args, out: pre_norm.append(args[0]))
    cos_sum, count = torch.zeros(28, dtype=torch.float64), 0
    try:
        with torch.no_grad():
            for batch in batches:
                hs = model(input_ids=batch["input_ids"], output_hidden_states=True, use_cache=False).hidden_states
                states = [*hs[:28], pre_norm[-1]]  # inputs of layers 0..27, then the last layer's output
                for i in range(28):
                    a, b = states[i].double(), states[i + 1].double()
                    cos_sum[i] += (torch.nn.functional.cosine_similarity(a, b, dim=-1)).sum()
                count += batch["input_ids"].numel()
    finally:
        handle.remove()
    independent = (1 - cos_sum / count).tolist()
    assert len(ours) == 28
    assert ours == pytest.approx(independent, abs=1e-5)
    assert min(range(28), key=independent.__getitem__) != 0  # layer 0 transforms most (ShortGPT)


def _skip_hook(module, args, kwargs, output):
    x = args[0] if args else kwargs["hidden_states"]
    return (x, *output[1:]) if isinstance(output, tuple) else x


def test_removing_layers_equals_skipping_them_and_the_config_follows(qwen, text_ids):
    """remove_layers(REMOVE) gives the logits of the original model whose layers REMOVE pass their
    input through (forward hooks), without and with the KV cache (greedy decoding); the config
    describes 21 layers."""
    model, _ = qwen
    ids = text_ids[:32].unsqueeze(0)
    layers = decoder_layers(model)
    handles = [layers[i].register_forward_hook(_skip_hook, with_kwargs=True) for i in REMOVE]
    try:
        expected = logits_of(model, ids)
        expected_gen = model.generate(ids[:, :16], max_new_tokens=4, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    full = logits_of(model, ids)

    pruned = copy.deepcopy(model)
    keep = remove_layers(pruned, REMOVE)
    try:
        assert keep == [i for i in range(28) if i not in REMOVE]
        got = logits_of(pruned, ids)
        assert torch.equal(got, expected)
        assert (got - full).abs().max() > 0.1  # the removal did change the model
        assert torch.equal(pruned.generate(ids[:, :16], max_new_tokens=4, do_sample=False), expected_gen)
        c = pruned.config
        assert c.num_hidden_layers == 21 == len(decoder_layers(pruned))
        assert [layer.self_attn.layer_idx for layer in decoder_layers(pruned)] == list(range(21))
        assert c.layer_types == ["full_attention"] * 21
        assert c.max_window_layers == 21  # 28 -> the kept layers below it: all of them
    finally:
        del pruned


def test_save_and_reload_with_plain_transformers_gives_the_same_logits(qwen, text_ids, tmp_path):
    model, tok = qwen
    ids = text_ids[100:132].unsqueeze(0)
    pruned = copy.deepcopy(model)
    remove_layers(pruned, REMOVE)
    expected = logits_of(pruned, ids)
    pruned.save_pretrained(tmp_path / "pruned")
    tok.save_pretrained(tmp_path / "pruned")
    del pruned
    saved = json.loads((tmp_path / "pruned/config.json").read_text())
    assert (saved["num_hidden_layers"], len(saved["layer_types"]), saved["max_window_layers"]) == (21, 21, 21)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.bfloat16).eval()
    assert len(reloaded.model.layers) == 21 and not reloaded.config.tie_word_embeddings
    assert torch.equal(logits_of(reloaded, ids), expected)


def test_merging_a_window_sums_weight_and_bias_deltas(qwen):
    """SLM's rule θ = θ_low + Σ_j (θ_j − θ_low) on a real model with q/k/v biases: the merged
    layer's q/k/v biases and weights are that sum (computed here in float32, then rounded to bf16),
    its norms stay the low layer's, and 2 layers go."""
    model, _ = qwen
    layers = decoder_layers(model)
    low, high = 20, 22
    names = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
             "self_attn.o_proj.weight", "mlp.down_proj.weight"]
    params = [dict(layers[j].named_parameters()) for j in range(low, high + 1)]
    expected = {}
    for n in names:  # in float32, in the order of the sum, then rounded to the weights' bf16
        acc = params[0][n].detach().float().clone()
        for p in params[1:]:
            acc += p[n].detach().float() - params[0][n].detach().float()
        expected[n] = acc.to(torch.bfloat16)
    norm = layers[low].input_layernorm.weight.detach().clone()
    merged = copy.deepcopy(model)
    try:
        removed = merge_layers(merged, [(low, high)])
        assert removed == [21, 22] and merged.config.num_hidden_layers == 26
        got = dict(decoder_layers(merged)[low].named_parameters())
        for n in names:
            assert torch.equal(got[n], expected[n]), n
        assert torch.equal(decoder_layers(merged)[low].input_layernorm.weight, norm)
        assert not torch.equal(got["self_attn.q_proj.bias"], params[0]["self_attn.q_proj.bias"])
    finally:
        del merged

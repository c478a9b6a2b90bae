"""Perplexity: each token scored once, float32 log-softmax, equal to a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from compress.evaluate.perplexity import make_windows, perplexity
from conftest import tiny_model

TOKENS = torch.randint(1, 320, (70,), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("n, seq_len, stride", [(70, 16, 5), (70, 16, 1), (16, 16, 16), (17, 16, 8), (70, 16, 15)])
def test_overlapping_windows_score_every_token_but_the_first_exactly_once(n, seq_len, stride):
    scored = []
    for w in make_windows(n, seq_len, stride):
        assert 0 <= w.begin < w.target_from <= w.end <= n and w.end - w.begin <= seq_len
        scored += range(w.target_from, w.end)
    assert scored == list(range(1, n))


def test_non_overlapping_windows_skip_each_window_start():
    """stride == seq_len: the first token of a window has no context in it and is not scored."""
    scored = [t for w in make_windows(70, 16, 16) for t in range(w.target_from, w.end)]
    assert scored == [t for t in range(70) if t % 16 != 0]


def direct_nll(model, tokens, seq_len) -> float:
    """Independent: transformers' own loss per non-overlapping window, weighted by its targets."""
    total, count = 0.0, 0
    for begin in range(0, tokens.numel(), seq_len):
        chunk = tokens[begin : begin + seq_len][None]
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(chunk, labels=chunk).loss.item()
        total += loss * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return total / count


def test_non_overlapping_perplexity_equals_model_loss():
    model = tiny_model("llama", 3)
    result = perplexity(model, TOKENS, seq_len=16, batch_size=3, progress=False)
    # Non-overlapping windows score 69 - 4 first tokens of the later windows = 65 tokens.
    assert result.tokens == 65
    assert result.ppl == pytest.approx(math.exp(direct_nll(model, TOKENS, 16)), rel=1e-5)


def test_batch_size_does_not_change_the_result():
    model = tiny_model("llama", 3)
    one = perplexity(model, TOKENS, seq_len=16, stride=8, batch_size=1, progress=False)
    many = perplexity(model, TOKENS, seq_len=16, stride=8, batch_size=7, progress=False)
    assert one.tokens == many.tokens == 69
    assert one.nll == pytest.approx(many.nll, rel=1e-6)


def test_bfloat16_model_is_scored_with_float32_log_softmax():
    model = tiny_model("llama", 3).to(torch.bfloat16)
    result = perplexity(model, TOKENS, seq_len=16, progress=False)
    assert math.isfinite(result.ppl) and 100 < result.ppl < 2000  # random model: near vocab size 320


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "gpt_neox"])
def test_layerwise_perplexity_equals_full_model_perplexity(arch):
    model = tiny_model(arch, 3)
    full = perplexity(model, TOKENS, seq_len=16, stride=8, batch_size=3, progress=False)
    lw = perplexity(model, TOKENS, seq_len=16, stride=8, batch_size=3, progress=False,
                    layerwise=True, device=torch.device("cpu"))
    assert (lw.tokens, lw.ppl) == (full.tokens, pytest.approx(full.ppl, rel=1e-6))


def test_layerwise_perplexity_applies_gemma2_logit_softcapping():
    import transformers as tf

    from conftest import TINY

    torch.manual_seed(0)
    model = tf.Gemma2ForCausalLM(tf.Gemma2Config(num_hidden_layers=2, head_dim=16,
                                                 final_logit_softcapping=0.5, **TINY)).eval()
    full = perplexity(model, TOKENS, seq_len=16, progress=False)
    lw = perplexity(model, TOKENS, seq_len=16, progress=False, layerwise=True, device=torch.device("cpu"))
    assert lw.ppl == pytest.approx(full.ppl, rel=1e-6)


# -- bos_per_window: [BOS] + seq_len - 1 text tokens, the BOS never scored ---------------------

BOS = 0  # the tiny models' bos_token_id


@pytest.mark.parametrize("n, seq_len, stride", [(70, 16, 15), (70, 16, 5), (15, 16, 15), (16, 16, 15)])
def test_bos_windows_score_every_text_token_exactly_once(n, seq_len, stride):
    windows = make_windows(n, seq_len, stride, bos=True)
    scored = [t for w in windows for t in range(w.target_from, w.end)]
    assert scored == list(range(n))  # token 0 and each window's first token too: the BOS is their context
    assert all(w.bos and w.end - w.begin <= seq_len - 1 for w in windows)


def test_default_bos_windows_are_contiguous_and_non_overlapping():
    windows = make_windows(70, 16, 15, bos=True)
    assert [(w.begin, w.end) for w in windows] == [(0, 15), (15, 30), (30, 45), (45, 60), (60, 70)]


def test_bos_stride_may_not_exceed_seq_len_minus_one():
    with pytest.raises(ValueError, match=r"stride must be in 1..seq_len - 1 \(15\), got 16"):
        make_windows(70, 16, 16, bos=True)


def direct_bos_nll(model, tokens, seq_len) -> float:
    """Independent: transformers' loss on [BOS] + each chunk of seq_len - 1 tokens (labels = input:
    the loss shifts, so it scores the chunk's tokens and never the BOS)."""
    total, count = 0.0, 0
    for begin in range(0, tokens.numel(), seq_len - 1):
        chunk = torch.cat([torch.tensor([BOS]), tokens[begin : begin + seq_len - 1]])[None]
        with torch.no_grad():
            loss = model(chunk, labels=chunk).loss.item()
        total += loss * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return total / count


def test_bos_per_window_perplexity_equals_model_loss_over_all_text_tokens():
    model = tiny_model("llama", 3)
    seen = []
    result = perplexity(model, TOKENS, seq_len=16, batch_size=2, progress=False, bos=BOS,
                        observe=lambda logp, targets: seen.append(targets))
    assert (result.tokens, result.stride) == (70, 15)  # every text token scored; windows of 1 + 15
    assert torch.cat(seen).tolist() == TOKENS.tolist()  # the targets are the text, in order, no BOS
    assert result.ppl == pytest.approx(math.exp(direct_bos_nll(model, TOKENS, 16)), rel=1e-5)
    plain = perplexity(model, TOKENS, seq_len=16, progress=False)
    assert plain.tokens == 65 and plain.ppl != pytest.approx(result.ppl, rel=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_layerwise_bos_perplexity_equals_full(arch):
    model = tiny_model(arch, 3)
    full = perplexity(model, TOKENS, seq_len=16, stride=7, batch_size=3, progress=False, bos=BOS)
    lw = perplexity(model, TOKENS, seq_len=16, stride=7, batch_size=3, progress=False, bos=BOS,
                    layerwise=True, device=torch.device("cpu"))
    assert full.tokens == lw.tokens == 70
    assert lw.ppl == pytest.approx(full.ppl, rel=1e-6)

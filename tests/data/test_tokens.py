"""Calibration windows: seeded random offsets (default) or ShortGPT's consecutive strides; a BOS
before every window (bos_per_window) or a chat-template wrapping (chat_template)."""

from __future__ import annotations

import pytest
import torch

from compress.data.tokens import bos_token_id, calibration_batches, calibration_windows, chat_windows, window_starts
from compress.errors import CompressError

STREAM = torch.arange(100, 110 + 37)  # 47 known tokens: 100, 101, ...


def test_strided_windows_are_consecutive_from_the_start():
    batches = calibration_batches(STREAM, samples=5, seq_len=8, seed=123, batch_size=2, sampling="strided")
    assert [b["input_ids"].shape for b in batches] == [(2, 8), (2, 8), (1, 8)]
    windows = torch.cat([b["input_ids"] for b in batches])
    assert windows.tolist() == [list(range(100 + 8 * i, 108 + 8 * i)) for i in range(5)]
    assert all(bool(b["attention_mask"].eq(1).all()) for b in batches)


def test_strided_ignores_the_seed_and_random_depends_on_it():
    assert window_starts(47, 5, 8, 0, "strided") == window_starts(47, 5, 8, 9, "strided") == [0, 8, 16, 24, 32]
    assert window_starts(47, 5, 8, 0, "random") != window_starts(47, 5, 8, 9, "random")


def test_random_windows_are_the_seeded_draw():
    starts = torch.randint(0, 47 - 8, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    windows = torch.cat([b["input_ids"] for b in calibration_batches(STREAM, 6, 8, 4, 4)])
    assert windows.tolist() == [STREAM[s:s + 8].tolist() for s in starts]


def test_strided_needs_samples_times_seq_len_tokens():
    assert window_starts(40, 5, 8, 0, "strided")[-1] == 32  # exactly enough
    with pytest.raises(CompressError, match=r"calibration text has 39 tokens; sampling: strided needs "
                                            r"samples x seq_len = 5 x 8 = 40: give more text"):
        window_starts(39, 5, 8, 0, "strided")


# -- bos_per_window: [BOS] + seq_len - 1 stream tokens ---------------------------------------

BOS = 7


def test_bos_windows_start_with_bos_and_cover_the_text_contiguously_in_order():
    windows = calibration_windows(STREAM, samples=5, seq_len=8, seed=0, sampling="strided", bos=BOS)
    assert windows.shape == (5, 8)
    assert windows[:, 0].tolist() == [BOS] * 5
    assert torch.cat(list(windows[:, 1:])).tolist() == STREAM[:35].tolist()  # 5 x 7 text tokens, no gap


def test_random_bos_windows_draw_offsets_over_seq_len_minus_one():
    starts = torch.randint(0, 47 - 7, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    windows = calibration_windows(STREAM, 6, 8, 4, "random", bos=BOS)
    assert windows.tolist() == [[BOS, *STREAM[s:s + 7].tolist()] for s in starts]


def test_strided_bos_windows_need_samples_times_seq_len_minus_one_tokens():
    assert window_starts(35, 5, 8, 0, "strided", bos=True) == [0, 7, 14, 21, 28]
    with pytest.raises(CompressError, match=r"calibration text has 34 tokens; sampling: strided needs "
                                            r"samples x \(seq_len - 1\) = 5 x 7 = 35: give more text"):
        window_starts(34, 5, 8, 0, "strided", bos=True)


def test_a_tokenizer_without_bos_is_refused_naming_the_key(tiny_tokenizer):
    with pytest.raises(CompressError) as e:
        bos_token_id(tiny_tokenizer, "evaluate.perplexity")
    assert str(e.value) == ("evaluate.perplexity.bos_per_window: true, but the tokenizer has no BOS token "
                            "(bos_token_id is None); set bos_per_window: false")


def test_a_tokenizer_without_chat_template_is_refused_naming_the_key(tiny_tokenizer):
    with pytest.raises(CompressError, match=r"^stages\[1\]\.gptq\.calibration\.chat_template: true, but the "
                                            r"tokenizer has no chat template .*set chat_template: false"):
        chat_windows(tiny_tokenizer, STREAM[:16].reshape(2, 8), 8, key="stages[1].gptq.calibration")

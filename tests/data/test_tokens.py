"""Calibration windows: seeded random offsets (default) or ShortGPT's consecutive strides."""

from __future__ import annotations

import pytest
import torch

from compress.data.tokens import calibration_batches, window_starts
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

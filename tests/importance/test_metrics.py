"""Layer importance metrics against independent computations from raw hidden states."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from compress.data.tokens import pad_batch
from compress.importance import lowest, score_layers
from compress.importance.ppl_drop import calibration_nll
from compress.surgery import remove_layers
from conftest import tiny_model

GEN = torch.Generator().manual_seed(3)
IDS = torch.randint(1, 320, (3, 10), generator=GEN)
FULL = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}]


def raw_hidden_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Inputs/outputs of every decoder layer from output_hidden_states, with the final norm made
    the identity so the last entry is the last layer's raw output."""
    m = copy.deepcopy(model)
    m.model.norm = nn.Identity()
    with torch.no_grad():
        return list(m(ids, output_hidden_states=True).hidden_states)


def reference(model, sequences: list[torch.Tensor], per_token) -> list[float]:
    """Token-weighted mean of per_token(x_in, x_out) over unpadded sequences run one at a time."""
    n = model.config.num_hidden_layers
    sums, count = [0.0] * n, 0
    for seq in sequences:
        hs = raw_hidden_states(model, seq[None])
        for i in range(n):
            sums[i] += float(per_token(hs[i][0].double(), hs[i + 1][0].double()).sum())
        count += seq.numel()
    return [s / count for s in sums]


def cos(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_bi_equals_one_minus_mean_cosine_of_raw_hidden_states():
    model = tiny_model("llama", 5)
    ref = [1 - c for c in reference(model, list(IDS), cos)]
    got = score_layers(model, "bi", FULL, progress=False)
    assert got == pytest.approx(ref, abs=1e-5)


def test_bi_ignores_padding_and_weights_by_tokens():
    model = tiny_model("qwen3", 5)
    seqs = [IDS[0, :10], IDS[1, :4], IDS[2, :7]]
    batch = pad_batch([s.tolist() for s in seqs], pad_id=0)
    ref = [1 - c for c in reference(model, seqs, cos)]
    got = score_layers(model, "bi", [batch], progress=False)
    assert got == pytest.approx(ref, abs=1e-5)


def test_output_hidden_states_last_entry_is_after_the_final_norm():
    """Why BI uses hooks: taken from output_hidden_states as-is, the last layer's BI is wrong."""
    model = tiny_model("llama", 5)
    with torch.no_grad():
        hs = model(IDS, output_hidden_states=True).hidden_states
    naive_last = 1 - float(cos(hs[-2].double(), hs[-1].double()).mean())
    hooked_last = score_layers(model, "bi", FULL, progress=False)[-1]
    assert abs(naive_last - hooked_last) > 1e-3


def test_angular_and_relative_magnitude_match_their_formulas():
    model = tiny_model("llama", 4)
    ang = reference(model, list(IDS), lambda a, b: torch.arccos(cos(a, b).clamp(-1, 1)) / math.pi)
    rm = reference(model, list(IDS), lambda a, b: (b - a).norm(dim=-1) / b.norm(dim=-1))
    assert score_layers(model, "angular_layer", FULL, progress=False) == pytest.approx(ang, abs=1e-5)
    assert score_layers(model, "relative_magnitude", FULL, progress=False) == pytest.approx(rm, abs=1e-5)


def test_ppl_drop_equals_nll_increase_of_the_model_without_that_layer():
    model = tiny_model("llama", 4)
    base = calibration_nll(model, FULL)
    got = score_layers(model, "ppl_drop", FULL, progress=False)
    for i in range(4):
        pruned = copy.deepcopy(model)
        remove_layers(pruned, [i])
        assert got[i] == pytest.approx(calibration_nll(pruned, FULL) - base, abs=1e-6)


def test_order_baselines_and_lowest():
    model = tiny_model("llama", 4)
    assert lowest(score_layers(model, "sequential", [], progress=False), 2) == [0, 1]
    assert lowest(score_layers(model, "reverse", [], progress=False), 2) == [3, 2]
    assert lowest([0.3, 0.1, 0.1, 0.5], 3) == [1, 2, 0]

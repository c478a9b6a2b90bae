"""angular_block (Gromov et al. 2024) against raw output_hidden_states, on both execution paths."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from compress.data.tokens import pad_batch
from compress.importance import score_layers
from compress.importance.angular_block import (angular_block_distances, best_block, block_angular_distances,
                                               last_token_states)
from conftest import ARCHS, tiny_model

GEN = torch.Generator().manual_seed(11)
SEQS = [torch.randint(1, 320, (n,), generator=GEN) for n in (10, 4, 7, 9)]
BATCHES = [pad_batch([s.tolist() for s in SEQS[:3]], 0), pad_batch([SEQS[3].tolist()], 0)]  # padded + not


def raw_last_token_boundaries(model, seq: torch.Tensor) -> list[torch.Tensor]:
    """x^0 .. x^L at the last token of one unpadded sequence: output_hidden_states[0..L-1] are the
    layer inputs; its last entry is after the final norm, so x^L is the norm's input (a pre-hook)."""
    seen = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        hs = model(seq[None], output_hidden_states=True).hidden_states
    handle.remove()
    n = model.config.num_hidden_layers
    return [h[0, -1].double() for h in hs[:n]] + [seen["x"][0, -1].double()]


def reference_distances(model, seqs: list[torch.Tensor], n: int) -> list[float]:
    per_seq = [raw_last_token_boundaries(model, s) for s in seqs]
    out = []
    for start in range(model.config.num_hidden_layers - n + 1):
        ds = [math.acos(max(-1.0, min(1.0, float(torch.nn.functional.cosine_similarity(x[start], x[start + n], dim=0)))))
              / math.pi for x in per_seq]
        out.append(sum(ds) / len(ds))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_distances_and_chosen_block_equal_raw_hidden_states(n):
    model = tiny_model("llama", 6)
    ref = reference_distances(model, SEQS, n)
    got = angular_block_distances(model, BATCHES, n, progress=False)
    assert len(got) == 6 - n + 1
    assert got == pytest.approx(ref, abs=1e-5)
    ordered = sorted(ref)
    assert len(ordered) == 1 or ordered[1] - ordered[0] > 1e-4  # the reference's choice is unambiguous
    assert best_block(got) == ref.index(ordered[0])


def test_last_block_uses_the_output_before_the_final_norm():
    """With output_hidden_states' last entry (after the norm), d(x^{L-n}, x^L) would differ."""
    model = tiny_model("llama", 4)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(0.1, 3.0, model.config.hidden_size))
        hs = model(SEQS[0][None], output_hidden_states=True).hidden_states
    naive = math.acos(float(torch.nn.functional.cosine_similarity(hs[2][0, -1], hs[4][0, -1], dim=0))) / math.pi
    got = angular_block_distances(model, [pad_batch([SEQS[0].tolist()], 0)], 2, progress=False)[-1]
    assert got == pytest.approx(reference_distances(model, SEQS[:1], 2)[-1], abs=1e-5)
    assert abs(got - naive) > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_layerwise_equals_full(arch):
    model = tiny_model(arch, 5)
    full = angular_block_distances(model, BATCHES, 2, progress=False)
    layerwise = angular_block_distances(model, BATCHES, 2, progress=False, layerwise_on=torch.device("cpu"))
    assert layerwise == pytest.approx(full, abs=1e-5)


def test_block_distances_of_known_angles():
    # 2 samples in the plane; boundary l at angle l*10 deg (sample 0) and l*20 deg (sample 1)
    angles = torch.tensor([[l * 10.0, l * 20.0] for l in range(4)]) * math.pi / 180
    states = torch.stack([angles.cos(), angles.sin()], dim=-1) * torch.tensor([1.0, 3.0])[None, :, None]
    assert block_angular_distances(states, 1) == pytest.approx([15 / 180] * 3, abs=1e-6)
    assert block_angular_distances(states, 3) == pytest.approx([45 / 180], abs=1e-6)
    with pytest.raises(ValueError, match="block size n=4 must be between 1 and 3"):
        block_angular_distances(states, 4)


def test_best_block_takes_the_lowest_distance_and_the_lower_start_on_ties():
    assert best_block([0.3, 0.1, 0.2]) == 1
    assert best_block([0.2, 0.1, 0.1]) == 1


def test_last_token_skips_padding_on_either_side():
    x = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])  # right-padded, left-padded
    assert last_token_states(x, mask).flatten().tolist() == [1.0, 7.0]
    assert last_token_states(x, torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]])).flatten().tolist() == [4.0]


def test_score_layers_refuses_block_metric_and_maps_the_old_angular_name(caplog):
    model = tiny_model("llama", 3)
    with pytest.raises(ValueError, match="angular_block scores blocks of n layers, not single layers"):
        score_layers(model, "angular_block", BATCHES, progress=False)
    with caplog.at_level(logging.INFO, logger="compress"):
        old = score_layers(model, "angular", BATCHES, progress=False)
    assert "'angular' is the per-layer angular distance (mean over all tokens), now named 'angular_layer'" \
        in caplog.text
    assert old == score_layers(model, "angular_layer", BATCHES, progress=False)

"""Stage layer_removal with metric angular_block: one contiguous block, recorded, removed exactly."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from pydantic import ValidationError

from compress.data.tokens import pad_batch
from compress.importance.angular_block import angular_block_distances, best_block
from compress.stages.base import StageContext
from compress.stages.layer_removal import LayerRemoval, LayerRemovalConfig
from compress.surgery import skip_layers
from conftest import tiny_model

GEN = torch.Generator().manual_seed(5)
CAL = [pad_batch([torch.randint(1, 320, (n,), generator=GEN).tolist() for n in (12, 6, 9)], 0)]
IDS = torch.randint(1, 320, (2, 11), generator=GEN)


def ctx(n: int) -> StageContext:
    return StageContext(CAL, None, torch.device("cpu"), list(range(10, 10 + n)), logging.getLogger("t"),
                        progress=False)


@pytest.mark.parametrize("arch, execution", [("llama", "full"), ("qwen3", "layerwise")])
def test_angular_block_removes_the_recorded_block_and_equals_skipping_it(arch, execution):
    model = tiny_model(arch, 6)
    original = copy.deepcopy(model)
    distances = angular_block_distances(original, CAL, 3, progress=False)
    first = best_block(distances)
    stage = LayerRemoval(LayerRemovalConfig(metric="angular_block", remove=3, execution=execution))
    record = stage.apply(model, ctx(6))
    assert record.details["block"] == [first, first + 3]
    assert record.details["block_distances"] == pytest.approx(distances, abs=1e-6)
    assert record.removed_layers == [first, first + 1, first + 2]
    assert record.details["removed_original"] == [10 + first, 11 + first, 12 + first]
    assert record.details["metric"] == "angular_block" and record.details["scores"] is None
    assert model.config.num_hidden_layers == 3
    with torch.no_grad(), skip_layers(original, [first, first + 1, first + 2]):
        expected = original(IDS).logits
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_fraction_sets_the_block_size():
    model = tiny_model("llama", 6)
    record = LayerRemoval(LayerRemovalConfig(metric="angular_block", fraction=0.34)).apply(model, ctx(6))
    assert len(record.details["block_distances"]) == 6 - 2 + 1
    assert record.details["block"][1] - record.details["block"][0] == 2


def test_angular_block_with_an_explicit_list_is_refused():
    with pytest.raises(ValidationError, match="`metric` has no effect with an explicit `layers` list"):
        LayerRemovalConfig(metric="angular_block", layers=[1, 2])


def test_old_angular_name_records_the_per_layer_metric():
    model = tiny_model("llama", 4)
    record = LayerRemoval(LayerRemovalConfig(metric="angular", remove=1)).apply(model, ctx(4))
    assert record.details["metric"] == "angular_layer"
    assert "by angular_layer" in record.summary

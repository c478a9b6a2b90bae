"""Stage ``width_pruning``: remove the least important MLP intermediate channels, the same number
in every layer so ``intermediate_size`` stays one number (a standard config).

Sample yaml::

    - width_pruning: {fraction: 0.25}          # or remove: 384 channels per layer

Importance: mean |activation| entering down_proj x the norm of down_proj's column
(compress/importance/channels.py), on the calibration data.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from compress.importance.channels import channel_scores
from compress.layerwise import layerwise_target
from compress.stages.base import ModelFacts, StageConfig, StageContext, StageRecord
from compress.surgery import WIDTH_TYPES, remove_channels


class WidthPruningConfig(StageConfig):
    remove: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0.0, lt=1.0)
    execution: Literal["auto", "full", "layerwise"] = "auto"  # as in layer_removal

    @model_validator(mode="after")
    def _one_amount(self):
        if (self.remove is None) == (self.fraction is None):
            raise ValueError("give exactly one of remove, fraction")
        return self


class WidthPruning:
    name: ClassVar[str] = "width_pruning"
    Config: ClassVar = WidthPruningConfig
    needs_calibration: ClassVar[bool] = True
    changes_depth: ClassVar[bool] = False
    quantizes: ClassVar[bool] = False

    def __init__(self, config: WidthPruningConfig) -> None:
        self.config = config

    def count(self, width: int) -> int:
        return self.config.remove if self.config.remove is not None else int(round(self.config.fraction * width))

    def check(self, facts: ModelFacts) -> list[str]:
        if facts.model_type not in WIDTH_TYPES:
            return [f"model type {facts.model_type!r} is not supported; supported: {list(WIDTH_TYPES)}"]
        if facts.quantized:
            return ["the model is quantized; prune width before quantization"]
        width, key = facts.intermediate_size, "remove" if self.config.remove is not None else "fraction"
        k = self.count(width)
        if not 0 < k < width:
            return [f"{key}: would leave {width - k} of {width} MLP channels; allowed to remove 1..{width - 1}"]
        return []

    def apply(self, model, ctx: StageContext) -> StageRecord:
        start = time.perf_counter()
        width = model.config.intermediate_size
        k = self.count(width)
        scores = channel_scores(model, ctx.calibration, layerwise_target(model, ctx.device, self.config.execution))
        drop = [sorted(s.argsort(stable=True)[:k].tolist()) for s in scores]
        remove_channels(model, drop)
        return StageRecord(
            stage=self.name,
            summary=f"MLP width {width} -> {width - k} in every layer (activation x weight importance)",
            details={"removed_channels_per_layer": k},
            replay={"channels": drop},
            wall_s=time.perf_counter() - start,
        )

    def replay(self, model, record: dict[str, Any]) -> None:
        remove_channels(model, record["channels"])

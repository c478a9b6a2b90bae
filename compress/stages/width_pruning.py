"""Stage ``width_pruning``: remove the least important MLP intermediate channels, the same number
in every layer so ``intermediate_size`` stays one number (a standard config).

Sample yaml::

    - width_pruning: {fraction: 0.25}          # or remove: 384 channels per layer
    - width_pruning: {fraction: 0.25, multiple_of: 1}   # exactly round(0.25 x width) channels

Importance: mean |activation| entering down_proj x the norm of down_proj's column
(compress/importance/channels.py), on the calibration data.

:param remove: channels to remove per layer (at most; see ``multiple_of``).
:param fraction: share of the channels instead, rounded to the nearest count.
:param multiple_of: the kept width is rounded *up* to a multiple of this (fewer channels removed
    than asked, never more), default 128: the kept width is down_proj's input, which every GPTQ
    group size (32, 64, 128) must divide and vLLM's Marlin kernel needs as a multiple of 128
    (gate/up outputs a multiple of 64). Llama-2-7B 11008 x 0.75 = 8256 (= 64.5 x 128) keeps 8320.
    ``1`` keeps exactly the asked count.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from compress.errors import CompressError
from compress.importance.channels import channel_scores
from compress.layerwise import layerwise_target
from compress.stages.base import ModelFacts, StageConfig, StageContext, StageRecord
from compress.surgery import WIDTH_TYPES, remove_channels


class WidthPruningConfig(StageConfig):
    remove: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0.0, lt=1.0)
    multiple_of: int = Field(128, ge=1)  # kept width rounded up to a multiple (down_proj in_features)
    execution: Literal["auto", "full", "layerwise"] = "auto"  # as in layer_removal

    @model_validator(mode="after")
    def _one_amount(self):
        if (self.remove is None) == (self.fraction is None):
            raise ValueError("give exactly one of remove, fraction")
        return self


def kept_width(width: int, remove: int, multiple_of: int) -> int:
    """Channels kept when ``remove`` of ``width`` are asked: width - remove rounded up to a multiple
    of ``multiple_of``, at most ``width`` (so at most ``remove`` go)."""
    return min(width, -(-(width - remove) // multiple_of) * multiple_of)


class WidthPruning:
    name: ClassVar[str] = "width_pruning"
    Config: ClassVar = WidthPruningConfig
    needs_calibration: ClassVar[bool] = True
    changes_depth: ClassVar[bool] = False
    quantizes: ClassVar[bool] = False

    def __init__(self, config: WidthPruningConfig) -> None:
        self.config = config

    def count(self, width: int) -> int:
        """Channels asked for (before ``multiple_of``)."""
        return self.config.remove if self.config.remove is not None else int(round(self.config.fraction * width))

    def removed(self, width: int) -> int:
        """Channels removed: the asked count less what keeping a multiple of ``multiple_of`` needs."""
        return width - kept_width(width, self.count(width), self.config.multiple_of)

    def check(self, facts: ModelFacts) -> list[str]:
        if facts.model_type not in WIDTH_TYPES:
            return [f"model type {facts.model_type!r} is not supported; supported: {list(WIDTH_TYPES)}"]
        if facts.quantized:
            return ["the model is quantized; prune width before quantization"]
        width, key = facts.intermediate_size, "remove" if self.config.remove is not None else "fraction"
        k = self.count(width)
        if not 0 < k < width:
            return [f"{key}: would leave {width - k} of {width} MLP channels; allowed to remove 1..{width - 1}"]
        return self._rounding_problems(width)

    def _rounding_problems(self, width: int) -> list[str]:
        if self.removed(width):
            return []
        k, m = self.count(width), self.config.multiple_of
        key = "remove" if self.config.remove is not None else "fraction"
        most = (width - 1) // m * m  # the widest multiple of m that still removes something
        fix = (f"remove at least {width - most} channels, or " if most else "") + \
            "lower multiple_of (1 removes exactly the asked count)"
        return [f"{key}: removing {k} of {width} MLP channels leaves {width - k}, which multiple_of: {m} "
                f"rounds up to {width} (nothing removed); {fix}"]

    def facts_after(self, facts: ModelFacts) -> ModelFacts:
        width = facts.intermediate_size
        return facts if width is None else replace(facts, intermediate_size=width - self.removed(width))

    def apply(self, model, ctx: StageContext) -> StageRecord:
        start = time.perf_counter()
        width, m = model.config.intermediate_size, self.config.multiple_of
        asked, k = self.count(width), self.removed(width)
        problems = self._rounding_problems(width)
        if problems:  # the recipe check refuses this first; direct callers get the same words
            raise CompressError(f"width_pruning.{problems[0]}")
        if k != asked:
            ctx.log.info("width_pruning: removing %d channels instead of %d so the kept width %d is a "
                         "multiple of %d (multiple_of)", k, asked, width - k, m)
        scores = channel_scores(model, ctx.calibration, layerwise_target(model, ctx.device, self.config.execution))
        drop = [sorted(s.argsort(stable=True)[:k].tolist()) for s in scores]
        remove_channels(model, drop)
        return StageRecord(
            stage=self.name,
            summary=f"MLP width {width} -> {width - k} in every layer (activation x weight importance"
                    + (f"; {asked} asked, kept width rounded up to a multiple of {m})" if k != asked else ")"),
            details={"removed_channels_per_layer": k, "requested_channels_per_layer": asked,
                     "multiple_of": m, "intermediate_size": width - k},
            replay={"channels": drop},
            wall_s=time.perf_counter() - start,
        )

    def replay(self, model, record: dict[str, Any]) -> None:
        remove_channels(model, record["channels"])

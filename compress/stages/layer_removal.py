"""Stage ``layer_removal``: score decoder layers and delete the least important ones (ShortGPT,
Men et al. 2024, arXiv 2403.03853).

Sample yaml::

    - layer_removal: {metric: bi, remove: 9}       # or fraction: 0.27, or layers: [27, 26, 25]
    - layer_removal: {metric: angular_block, remove: 9}   # Gromov et al.: one contiguous block

:param metric: how layers are scored (default ``bi``); lowest score is removed first. One of
    bi, angular_layer (old name: angular), relative_magnitude, ppl_drop, sequential, reverse; or
    angular_block (Gromov et al. 2024, arXiv 2403.17887): removes the block of ``remove`` consecutive
    layers [l, l+n) whose input and output differ least in angle at the last token of each sample.
:param remove: how many layers to remove.
:param fraction: share of layers to remove, rounded to the nearest count (0.27 x 32 -> 9).
:param layers: explicit layer indices to remove (no scoring; calibration not needed).
:param execution: ``auto`` (default: layer by layer when the model's weights are not on the run's
    device, e.g. kept on the CPU because they do not fit the GPU), ``full`` or ``layerwise``.
    Both give the same scores.
"""

from __future__ import annotations

from dataclasses import replace
import time
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from compress.importance import (ALIASES, BLOCK_METRICS, METRICS, lowest, metric_needs_calibration,
                                 score_layers)
from compress.importance.angular_block import angular_block_distances, best_block
from compress.layerwise import layerwise_target
from compress.stages.base import ModelFacts, StageConfig, StageContext, StageRecord
from compress.surgery import remove_layers
from compress.work_cache import tensor_digest


class LayerRemovalConfig(StageConfig):
    metric: Literal[tuple(METRICS)] | None = None  # type: ignore[valid-type]
    remove: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0.0, lt=1.0)
    layers: list[int] | None = Field(None, min_length=1)
    execution: Literal["auto", "full", "layerwise"] = "auto"

    @model_validator(mode="after")
    def _one_amount(self):
        given = [k for k in ("remove", "fraction", "layers") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of remove, fraction, layers (got {given or 'none'})")
        if self.layers is not None and self.metric is not None:
            raise ValueError("`metric` has no effect with an explicit `layers` list; drop one of them")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ValueError(f"layers must be >= 0 (got {self.layers})")
        if self.execution == "layerwise" and self.metric == "ppl_drop":
            raise ValueError("metric ppl_drop needs full forward passes; use execution: full or auto")
        return self


class LayerRemoval:
    name: ClassVar[str] = "layer_removal"
    Config: ClassVar = LayerRemovalConfig
    changes_depth: ClassVar[bool] = True
    quantizes: ClassVar[bool] = False

    def __init__(self, config: LayerRemovalConfig) -> None:
        self.config = config
        metric = config.metric or "bi"
        self.metric = ALIASES.get(metric, metric)  # score_layers logs the rename when it scores

    @property
    def needs_calibration(self) -> bool:
        return self.config.layers is None and metric_needs_calibration(self.metric)

    def layerwise_device(self, model, device):
        """The device to run layer by layer on, or None for the full-model path."""
        if self.metric == "ppl_drop" and self.config.execution == "auto":
            return None
        return layerwise_target(model, device, self.config.execution)

    def count(self, num_layers: int) -> int:
        if self.config.layers is not None:
            return len(self.config.layers)
        if self.config.fraction is not None:
            return int(round(self.config.fraction * num_layers))
        return int(self.config.remove)

    def layers_removed(self, num_layers: int) -> int:
        return self.count(num_layers)

    def facts_after(self, facts: ModelFacts) -> ModelFacts:
        return replace(facts, num_layers=facts.num_layers - self.layers_removed(facts.num_layers))

    def check(self, facts: ModelFacts) -> list[str]:
        n, errors = facts.num_layers, []
        if facts.quantized:
            errors.append("the model is quantized; remove layers before quantization")
        if self.config.layers is not None:
            bad = [i for i in self.config.layers if i >= n]
            if bad:
                errors.append(f"layers: {bad} out of range; the model has {n} layers here (0..{n - 1})")
            if len(set(self.config.layers)) != len(self.config.layers):
                errors.append(f"layers: repeated indices in {self.config.layers}")
        key = next(k for k in ("remove", "fraction", "layers") if getattr(self.config, k) is not None)
        k = self.count(n)
        if k >= n:
            errors.append(f"{key}: would remove {k} of {n} layers; at least one must remain (max {n - 1})")
        if k == 0:
            errors.append(f"fraction: {self.config.fraction} of {n} layers rounds to 0 layers")
        return errors

    def remove_block(self, model, ctx: StageContext) -> tuple[list[int], dict[str, Any]]:
        """angular_block: the n consecutive layers [l*, l*+n) with the lowest d(x^l, x^{l+n})."""
        n = self.count(model.config.num_hidden_layers)
        ctx.log.info("angular distance of every block of %d layers on %d calibration batches (%s)",
                     n, len(ctx.calibration), ctx.device)
        distances = angular_block_distances(model, ctx.calibration, n, progress=ctx.progress,
                                            layerwise_on=self.layerwise_device(model, ctx.device))
        first = best_block(distances)
        return list(range(first, first + n)), {"block_distances": distances, "block": [first, first + n]}

    def apply(self, model, ctx: StageContext) -> StageRecord:
        start = time.perf_counter()
        num_layers = model.config.num_hidden_layers
        extra: dict[str, Any] = {}
        if self.config.layers is not None:
            scores, chosen = None, sorted(self.config.layers)
        elif self.metric in BLOCK_METRICS:
            scores = None
            chosen, extra = self.remove_block(model, ctx)
        else:
            ctx.log.info("scoring %d layers with %s on %d calibration batches (%s)",
                         num_layers, self.metric, len(ctx.calibration), ctx.device)
            on = self.layerwise_device(model, ctx.device)
            compute = lambda: score_layers(model, self.config.metric or self.metric,  # noqa: E731
                                           ctx.calibration, progress=ctx.progress, layerwise_on=on)
            # in a sweep, every `remove: k` of one (model, calibration, metric) shares one scoring
            scores = compute() if ctx.cache is None else ctx.cache.json(
                "layer_scores", {"metric": self.metric, "layerwise_on": str(on),
                                 "calibration": tensor_digest(ctx.calibration)}, compute)
            chosen = lowest(scores, self.count(num_layers))
        original = [ctx.original_layer_ids[i] for i in chosen]
        remove_layers(model, chosen)
        by = "list" if self.config.layers is not None else self.metric
        return StageRecord(
            stage=self.name,
            summary=f"removed {len(chosen)} of {num_layers} layers by {by}: original indices {original}",
            details={"metric": "explicit" if by == "list" else by, "scores": scores,
                     "removal_order": chosen, "removed_original": original, **extra},
            replay={"remove": sorted(chosen)},
            removed_layers=sorted(chosen),
            wall_s=time.perf_counter() - start,
        )

    def replay(self, model, record: dict[str, Any]) -> None:
        remove_layers(model, record["remove"])

"""Per-layer importance metrics. Every metric returns one score per decoder layer, and for every
metric the *lowest* score marks the layer to remove first."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from compress.importance.angular import AngularDistance
from compress.importance.bi import BlockInfluence
from compress.importance.capture import capture_layer_statistics
from compress.importance.order import reverse_scores, sequential_scores
from compress.importance.ppl_drop import ppl_drop_scores
from compress.importance.relative_magnitude import RelativeMagnitude
from compress.layerwise import run_layerwise
from compress.surgery import decoder_layers

ACTIVATION_METRICS = {cls.name: cls for cls in (BlockInfluence, AngularDistance, RelativeMagnitude)}
ORDER_METRICS: dict[str, Callable[[int], list[float]]] = {
    "sequential": sequential_scores,
    "reverse": reverse_scores,
}
BLOCK_METRICS = ("angular_block",)  # score blocks of n consecutive layers, not single layers
ALIASES = {"angular": "angular_layer"}  # old name of the per-layer angular distance
METRICS = sorted([*ACTIVATION_METRICS, *ORDER_METRICS, "ppl_drop", *BLOCK_METRICS, *ALIASES])
DESCRIPTIONS = {
    "bi": "Block Influence, 1 - mean cos(layer input, layer output) (ShortGPT)",
    "angular_layer": "mean over all tokens of arccos(cos)/pi between layer input and output",
    "angular_block": "arccos(cos)/pi between the inputs of layers l and l+n at the last token "
                     "(Gromov et al. 2024); the block [l, l+n) with the lowest is removed",
    "relative_magnitude": "mean ||f(x)|| / ||x + f(x)|| (Samragh et al. 2023)",
    "sequential": "baseline: remove the first layers first",
    "reverse": "baseline: remove the last layers first",
    "ppl_drop": "calibration NLL increase when the layer alone is skipped",
}


log = logging.getLogger("compress")


def canonical_metric(metric: str) -> str:
    """The metric's current name (``angular`` -> ``angular_layer``), logging the rename."""
    if metric in ALIASES:
        log.info("metric %r is the per-layer angular distance (mean over all tokens), now named %r; "
                 "Gromov et al.'s block method is 'angular_block'", metric, ALIASES[metric])
    return ALIASES.get(metric, metric)


def metric_needs_calibration(metric: str) -> bool:
    return metric not in ORDER_METRICS


def score_layers(model, metric: str, batches: list[dict[str, torch.Tensor]],
                 progress: bool = True, layerwise_on: torch.device | None = None) -> list[float]:
    """One score per decoder layer of ``model`` (current numbering); lowest = least important.

    ``layerwise_on``: run layer by layer on that device (see compress.layerwise) instead of one
    full forward per batch; the scores are the same, peak accelerator memory is one layer."""
    metric = canonical_metric(metric)
    num_layers = len(decoder_layers(model))
    if metric in BLOCK_METRICS:
        raise ValueError(f"{metric} scores blocks of n layers, not single layers: "
                         "use compress.importance.angular_block.angular_block_distances")
    if metric in ORDER_METRICS:
        return ORDER_METRICS[metric](num_layers)
    if metric == "ppl_drop":
        if layerwise_on is not None:
            raise ValueError("ppl_drop needs full forward passes; it has no layer-wise mode")
        return ppl_drop_scores(model, batches, progress)
    if metric not in ACTIVATION_METRICS:
        raise ValueError(f"unknown metric {metric!r}; supported: {METRICS}")
    stat = ACTIVATION_METRICS[metric](num_layers)
    if layerwise_on is not None:
        run_layerwise(model, batches, stat.update, layerwise_on, progress=progress)
    else:
        capture_layer_statistics(model, batches, [stat], progress)
    return stat.scores()


def lowest(scores: list[float], count: int) -> list[int]:
    """Indices of the ``count`` lowest scores, lowest first (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))[:count]

"""MLP channel importance: mean |a_c| over non-padding tokens of the input to down_proj (the
gated activation) times the norm of down_proj's column c, i.e. the typical size of channel c's
contribution to the residual stream (activation-based, as Wanda / LLM-Pruner-style criteria).
Low score = removed first. Returns one (intermediate_size,) tensor per layer."""

from __future__ import annotations

import torch

from compress.importance.taps import tap_module_inputs
from compress.surgery import decoder_layers


@torch.no_grad()
def channel_scores(model, batches: list[dict[str, torch.Tensor]],
                   layerwise_on: torch.device | None = None) -> list[torch.Tensor]:
    layers = decoder_layers(model)
    sums = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    counts = [0.0] * len(layers)

    def reduce(i: int, x: torch.Tensor, mask: torch.Tensor) -> None:
        keep = mask.to(x.device).bool()
        sums[i] += x.float().abs()[keep].double().sum(0).cpu()
        counts[i] += float(keep.sum())

    tap_module_inputs(model, batches, lambda layer: layer.mlp.down_proj, reduce, layerwise_on)
    col_norms = [layer.mlp.down_proj.weight.float().norm(dim=0).double().cpu() for layer in layers]
    return [(s / c * n).float() for s, c, n in zip(sums, counts, col_norms)]

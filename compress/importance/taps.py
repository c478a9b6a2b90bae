"""Per-layer statistics of a submodule's input (o_proj, down_proj), on either execution path.

A forward pre-hook notes the submodule's input while its decoder layer runs; the layer's
statistic update (called right after the layer, with the batch's padding mask, by the full-model
capture or by the layer-wise engine) consumes it. So head and channel importance use the same two
paths as the layer metrics, with the same results."""

from __future__ import annotations

from collections.abc import Callable

import torch

from compress.importance.capture import capture_layer_statistics
from compress.layerwise import run_layerwise
from compress.surgery import decoder_layers

Reduce = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, module input (B,T,F), mask (B,T))


class _Tap:
    def __init__(self, reduce: Reduce) -> None:
        self.reduce, self.pending = reduce, {}

    def update(self, layer: int, x_in, x_out, mask: torch.Tensor) -> None:
        self.reduce(layer, self.pending.pop(layer), mask)


@torch.no_grad()
def tap_module_inputs(model, batches, module_of: Callable, reduce: Reduce,
                      layerwise_on: torch.device | None = None) -> None:
    """Call ``reduce(layer, input of module_of(layer), mask)`` for every layer and batch."""
    tap = _Tap(reduce)

    def hook_for(i: int):
        def hook(module, args):
            tap.pending[i] = args[0]
        return hook

    handles = [module_of(layer).register_forward_pre_hook(hook_for(i))
               for i, layer in enumerate(decoder_layers(model))]
    try:
        if layerwise_on is not None:
            run_layerwise(model, batches, tap.update, layerwise_on, progress=False)
        else:
            capture_layer_statistics(model, batches, [tap], progress=False)
    finally:
        for h in handles:
            h.remove()

"""Feed every decoder layer's (input, output) hidden states to per-layer statistics.

Forward hooks on the decoder layers see exactly what each layer receives and returns (the model's
own masks and rotary embeddings included), so nothing about the architecture is re-implemented.
Only the base model runs (no LM head): the vocabulary projection is not needed for layer scores.
"""

from __future__ import annotations

from typing import Protocol

import torch
from tqdm.auto import tqdm

from compress.faults import crash_point
from compress.surgery import decoder_layers


class LayerStatistic(Protocol):
    def update(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None: ...

    def scores(self) -> list[float]: ...


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_layer_statistics(model, batches: list[dict[str, torch.Tensor]],
                             statistics: list[LayerStatistic], progress: bool = True) -> None:
    """Run ``batches`` through ``model``; every statistic sees each layer's (input, output, mask)."""
    device = next(model.parameters()).device
    current_mask: list[torch.Tensor] = []

    def hook_for(index: int):
        def hook(module, args, kwargs, output):
            x_in, x_out = _hidden_in(args, kwargs), _hidden_out(output)
            for stat in statistics:
                stat.update(index, x_in, x_out, current_mask[0])
        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True)
               for i, layer in enumerate(decoder_layers(model))]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="scoring layers", unit="batch", disable=not progress):
            current_mask[:] = [batch["attention_mask"].to(device)]
            model.base_model(input_ids=batch["input_ids"].to(device),
                             attention_mask=current_mask[0], use_cache=False)
            crash_point("scoring")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

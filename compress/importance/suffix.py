"""Final hidden states of a model changed only from layer ``start`` up, running only those layers.

SLM's search measures many merged models that all keep the original layers below their lowest
merged window. The original model's input to every decoder layer is recorded once (one layer-wise
pass, with the keyword arguments each layer gets from the model's own forward:
compress.layerwise.layer_inputs); a merged model's final hidden states then come from layer
``start``'s recorded input through the current layers ``start..L-1`` and the final norm. Layer i
gets the same input tensor and arguments the full forward would give it, so the values are those
of ``final_hidden_states`` (the tests check equality, not closeness), at the cost of the layers
above ``start`` only.
"""

from __future__ import annotations

import torch

from compress.importance.similarity import _per_sample
from compress.layerwise import layer_inputs
from compress.surgery import decoder_layers, final_norm

MAX_CACHE_BYTES = 2 * 2**30  # above this the caller measures with full forwards instead


def cache_bytes(model, batches: list[dict[str, torch.Tensor]]) -> int:
    """Bytes of every layer's recorded input for ``batches`` (what ``SuffixRunner`` keeps)."""
    p = next(model.parameters())
    tokens = sum(b["input_ids"].numel() for b in batches)
    return len(decoder_layers(model)) * tokens * model.config.hidden_size * p.element_size()


def _call(layer, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class SuffixRunner:
    """``runner(start)``: final hidden states (as ``final_hidden_states``) of the model as it is now,
    given that its layers below ``start`` are those it had when the runner was built."""

    @torch.no_grad()
    def __init__(self, model, batches: list[dict[str, torch.Tensor]]) -> None:
        self.model, self.batches = model, batches
        self.device = next(model.parameters()).device
        hidden, self.calls = layer_inputs(model, batches, self.device)
        self.masks = [b["attention_mask"].to(self.device).bool() for b in batches]
        self.inputs: list[list[torch.Tensor]] = []  # [layer][batch]
        for i, layer in enumerate(decoder_layers(model)):
            self.inputs.append(hidden)
            hidden = [_call(layer, h, self.calls[i][b]) for b, h in enumerate(hidden)]
        self.layer_calls = 0  # decoder layers run by __call__ (all batches count once)

    @torch.no_grad()
    def __call__(self, start: int) -> list[torch.Tensor]:
        layers = decoder_layers(self.model)
        hidden = list(self.inputs[start])
        for i in range(start, len(layers)):
            hidden = [_call(layers[i], h, self.calls[i][b]) for b, h in enumerate(hidden)]
            self.layer_calls += 1
        norm = final_norm(self.model)
        out = []
        for h, mask in zip(hidden, self.masks):
            out.extend(_per_sample(norm(h), mask))
        return out

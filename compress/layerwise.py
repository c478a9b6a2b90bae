"""Layer-by-layer execution: push calibration batches through one decoder layer at a time.

Peak accelerator memory is one decoder layer + the embeddings + the calibration activations (kept
on the CPU between layers with ``offload=True``), not the whole model, so a 70B model scores on
one GPU. What each layer receives (attention masks per layer type, rotary position embeddings,
position ids) is taken from the model's own forward: the decoder layers are temporarily replaced
by recorders that note their arguments and pass the hidden states through, so nothing about the
architecture is re-implemented. Layer i then runs on exactly the inputs the full model would give
it, and results equal the full-model path (tests pin this).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.surgery import decoder_layers

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the keyword arguments it is called with."""

    def __init__(self, calls: list[dict[str, Any]]) -> None:
        super().__init__()
        self.calls = calls

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        assert not args, "decoder layers are called with keyword arguments after hidden_states"
        self.calls.append(kwargs)
        return hidden_states


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@torch.no_grad()
def layer_inputs(model, batches: list[dict[str, torch.Tensor]], device: torch.device):
    """Hidden states entering layer 0 and, per layer, the keyword arguments each batch brings.

    Returns (hidden: list per batch, kwargs: list per layer of list per batch). Only the base
    model's modules outside the decoder layers (embeddings, rotary, final norm) are moved to
    ``device``; the LM head is not needed and stays where it is (unless tied to the embeddings).
    """
    layers = decoder_layers(model)
    calls: list[list[dict[str, Any]]] = [[] for _ in layers]
    originals = list(layers)
    hidden: list[torch.Tensor] = []
    capture = {}

    def grab(module, args, kwargs):
        capture["x"] = args[0] if args else kwargs["hidden_states"]

    try:
        for i in range(len(layers)):
            layers[i] = _Recorder(calls[i])
        model.base_model.to(device)  # embeddings, rotary, final norm: the decoder layers are recorders now
        handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        for batch in batches:
            model.base_model(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device), use_cache=False)
            hidden.append(capture.pop("x"))
        handle.remove()
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return hidden, calls


@torch.no_grad()
def run_layerwise(model, batches: list[dict[str, torch.Tensor]], on_layer: LayerCallback | None,
                  device: torch.device, offload: bool = True, progress: bool = True) -> list[torch.Tensor]:
    """Run ``batches`` through the decoder one layer at a time on ``device``.

    ``on_layer(i, x_in, x_out, mask)`` sees every layer's input and output for every batch. The
    model's decoder layers stay where they were (e.g. on the CPU) except the one running. Returns
    the last layer's output for every batch (before the final norm), on the CPU if ``offload``.
    """
    layers = decoder_layers(model)
    home = next(layers[0].parameters()).device
    was_training = model.training
    model.eval()
    hidden, calls = layer_inputs(model, batches, device)
    store = torch.device("cpu") if offload else device
    hidden = [h.to(store) for h in hidden]
    masks = [b["attention_mask"].to(device) for b in batches]
    for i in tqdm(range(len(layers)), desc="layer-wise", unit="layer", disable=not progress):
        layer = layers[i].to(device)
        for b in range(len(batches)):
            x_in = hidden[b].to(device)
            out = layer(x_in, **_to(calls[i][b], device))
            x_out = out[0] if isinstance(out, tuple) else out
            if on_layer is not None:
                on_layer(i, x_in, x_out, masks[b])
            hidden[b] = x_out.to(store)
        layers[i] = layer.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model.base_model.to(home)  # leave the model where it was
    model.train(was_training)
    return hidden


def layerwise_target(model, device: torch.device, execution: str) -> torch.device | None:
    """Where to run layer by layer, or None for the full-model path. ``auto``: layer by layer when
    the model's weights are not on ``device`` (kept in CPU memory because they do not fit it)."""
    if execution == "auto":
        execution = "full" if next(model.parameters()).device == device else "layerwise"
    return device if execution == "layerwise" else None

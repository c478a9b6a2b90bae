"""MLP channel importance: mean |a_c| over non-padding tokens of the input to down_proj (the
gated activation) times the norm of down_proj's column c, i.e. the typical size of channel c's
contribution to the residual stream (activation-based, as Wanda / LLM-Pruner-style criteria).
Low score = removed first. Returns one (intermediate_size,) tensor per layer."""

from __future__ import annotations

import torch

from compress.surgery import decoder_layers


@torch.no_grad()
def channel_scores(model, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    layers = decoder_layers(model)
    sums = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    count = torch.zeros((), dtype=torch.float64)
    mask: list[torch.Tensor] = []

    def hook_for(i: int):
        def hook(module, args):
            sums[i] += args[0].float().abs()[mask[0].bool()].double().sum(0).cpu()
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"].to(device)]
            model.base_model(input_ids=batch["input_ids"].to(device), attention_mask=mask[0], use_cache=False)
            count += mask[0].sum().double().cpu()
    finally:
        for h in handles:
            h.remove()
    col_norms = [layer.mlp.down_proj.weight.float().norm(dim=0).double().cpu() for layer in layers]
    return [(s / count * n).float() for s, n in zip(sums, col_norms)]

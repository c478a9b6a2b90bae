"""Attention-head importance on calibration data (cf. ShortGPT Sec. 4.2; Michel et al. 2019,
"Are Sixteen Heads Really Better than One?", arXiv 1905.10650).

* ``norm``: mean over non-padding tokens of ||W_o[:, head] @ attn_out[head]||, the size of each
  head's contribution to the residual stream (read from the input of o_proj with a pre-hook);
* ``ablation``: calibration NLL increase when that head's output is zeroed in every layer... per
  layer: one head of one layer at a time (L x H forward passes).
Low score = removed first. Returns a (layers, heads) tensor.
"""

from __future__ import annotations

import torch

from compress.importance.ppl_drop import calibration_nll
from compress.surgery import decoder_layers


def _head_dim(model) -> int:
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@torch.no_grad()
def head_norm_scores(model, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    layers = decoder_layers(model)
    n_heads, d = model.config.num_attention_heads, _head_dim(model)
    sums = torch.zeros(len(layers), n_heads, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    mask: list[torch.Tensor] = []

    def hook_for(i: int):
        def hook(module, args):
            x = args[0].float()  # (B, T, H*d)
            w = module.weight.float().view(module.out_features, n_heads, d)  # (hidden, H, d)
            contrib = torch.einsum("bthd,ohd->btho", x.view(*x.shape[:2], n_heads, d), w).norm(dim=-1)
            sums[i] += contrib[mask[0].bool()].double().sum(0).cpu()
        return hook

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"].to(device)]
            model.base_model(input_ids=batch["input_ids"].to(device), attention_mask=mask[0], use_cache=False)
            count += mask[0].sum().double().cpu()
    finally:
        for h in handles:
            h.remove()
    return (sums / count).float()


def head_ablation_scores(model, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    layers = decoder_layers(model)
    n_heads, d = model.config.num_attention_heads, _head_dim(model)
    base = calibration_nll(model, batches)
    scores = torch.zeros(len(layers), n_heads)
    for i, layer in enumerate(layers):
        for h in range(n_heads):
            def zero(module, args, h=h):
                x = args[0].clone()
                x[..., h * d:(h + 1) * d] = 0
                return (x,)
            handle = layer.self_attn.o_proj.register_forward_pre_hook(zero)
            try:
                scores[i, h] = calibration_nll(model, batches) - base
            finally:
                handle.remove()
    return scores


def head_scores(model, batches: list[dict[str, torch.Tensor]], metric: str = "norm") -> torch.Tensor:
    """(layers, heads) importance; ``metric``: norm | ablation."""
    if metric == "norm":
        return head_norm_scores(model, batches)
    if metric == "ablation":
        return head_ablation_scores(model, batches)
    raise ValueError(f"unknown head metric {metric!r}; supported: ['ablation', 'norm']")

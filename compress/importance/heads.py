"""Attention-head importance on calibration data (cf. ShortGPT Sec. 4.2; Michel et al. 2019,
"Are Sixteen Heads Really Better than One?", arXiv 1905.10650).

* ``norm``: mean over non-padding tokens of ||W_o[:, head] @ attn_out[head]||, the size of each
  head's contribution to the residual stream (read from the input of o_proj with a pre-hook);
* ``ablation``: calibration NLL increase when that head's output alone is zeroed (one head of one
  layer at a time: L x H forward passes).
Low score = removed first. Returns a (layers, heads) tensor.
"""

from __future__ import annotations

import torch

from compress.importance.ppl_drop import calibration_nll
from compress.importance.taps import tap_module_inputs
from compress.surgery import decoder_layers


def _head_dim(model) -> int:
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@torch.no_grad()
def head_norm_scores(model, batches: list[dict[str, torch.Tensor]],
                     layerwise_on: torch.device | None = None) -> torch.Tensor:
    layers = decoder_layers(model)
    n_heads, d = model.config.num_attention_heads, _head_dim(model)
    sums = torch.zeros(len(layers), n_heads, dtype=torch.float64)
    counts = [0.0] * len(layers)

    def reduce(i: int, x: torch.Tensor, mask: torch.Tensor) -> None:
        o_proj = layers[i].self_attn.o_proj
        w = o_proj.weight.float().view(o_proj.out_features, n_heads, d).to(x.device)  # (hidden, H, d)
        contrib = torch.einsum("bthd,ohd->btho", x.float().view(*x.shape[:2], n_heads, d), w).norm(dim=-1)
        keep = mask.to(x.device).bool()
        sums[i] += contrib[keep].double().sum(0).cpu()
        counts[i] += float(keep.sum())

    tap_module_inputs(model, batches, lambda layer: layer.self_attn.o_proj, reduce, layerwise_on)
    return (sums / torch.tensor(counts, dtype=torch.float64)[:, None]).float()


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


def head_scores(model, batches: list[dict[str, torch.Tensor]], metric: str = "norm",
                layerwise_on: torch.device | None = None) -> torch.Tensor:
    """(layers, heads) importance; ``metric``: norm | ablation (ablation needs full passes)."""
    if metric == "norm":
        return head_norm_scores(model, batches, layerwise_on)
    if layerwise_on is not None:
        raise ValueError("head ablation needs full forward passes; it has no layer-wise mode")
    if metric == "ablation":
        return head_ablation_scores(model, batches)
    raise ValueError(f"unknown head metric {metric!r}; supported: ['ablation', 'norm']")

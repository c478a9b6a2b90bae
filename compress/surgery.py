"""Architecture-aware model edits: remove decoder layers and keep the config consistent.

Architecture differences are data (one table below), the edit is one generic loop. After
``remove_layers`` the model is a plain ``transformers`` model again: ``save_pretrained`` writes a
checkpoint that ``from_pretrained`` loads with no code of ours, and the KV cache (built from
``config.layer_types`` / ``num_hidden_layers``) lines up with the renumbered ``layer_idx``. The
per-layer config fields (attention types, MoE layers, pattern scalars) are updated by
``compress.layer_fields``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError
from compress.layer_fields import check_layer_fields, update_layer_fields


@dataclass(frozen=True)
class LayerLayout:
    """Where an architecture keeps its decoder layers."""

    layers_path: str  # attribute path from the *ForCausalLM model to the ModuleList
    final_norm_path: str = "model.norm"  # applied to the last layer's output before the LM head


_DECODER = LayerLayout("model.layers")

# model_type -> layout. Anything not listed is refused with the list of supported types.
LAYOUTS: dict[str, LayerLayout] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "qwen2_moe": _DECODER,
    "qwen3_moe": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "gemma3_text": _DECODER,
    "phi3": _DECODER,
    "smollm3": _DECODER,
    "olmo2": _DECODER,
    "gpt_neox": LayerLayout("gpt_neox.layers", final_norm_path="gpt_neox.final_layer_norm"),
}


def layout_for(config) -> LayerLayout:
    """The layer layout of a model config, or a CompressError listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise CompressError(
            f"model_type {model_type!r} is not supported for layer surgery; "
            f"supported: {sorted(LAYOUTS)}"
        )
    return LAYOUTS[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's ModuleList of decoder layers."""
    obj: object = model
    for name in layout_for(model.config).layers_path.split("."):
        obj = getattr(obj, name)
    assert isinstance(obj, nn.ModuleList)
    return obj


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the LM head."""
    obj: object = model
    for name in layout_for(model.config).final_norm_path.split("."):
        obj = getattr(obj, name)
    return obj


def _set_decoder_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    *parents, last = layout_for(model.config).layers_path.split(".")
    obj: object = model
    for name in parents:
        obj = getattr(obj, name)
    setattr(obj, last, layers)


def check_layer_indices(indices: list[int], num_layers: int, keep_one: bool = True) -> list[int]:
    """Validate indices of layers to remove; returns them sorted. Raises CompressError."""
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise CompressError(f"layer indices must be integers, got {bad}")
    out_of_range = [i for i in indices if i < 0 or i >= num_layers]
    if out_of_range:
        raise CompressError(
            f"layer indices {out_of_range} are out of range: the model has {num_layers} layers "
            f"(valid: 0..{num_layers - 1})"
        )
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise CompressError(f"layer indices {repeated} are repeated; list each layer once")
    if keep_one and len(indices) >= num_layers:
        raise CompressError(
            f"cannot remove {len(indices)} of {num_layers} layers: at least one must remain"
        )
    return sorted(indices)


def _renumber(layer: nn.Module, new_idx: int) -> None:
    # Attention modules (and some decoder layers) carry layer_idx for the KV cache.
    for module in layer.modules():
        if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
            module.layer_idx = new_idx


def remove_layers(model: nn.Module, indices: list[int]) -> list[int]:
    """Remove decoder layers ``indices`` (current numbering) from ``model`` in place.

    Rebuilds the ModuleList, renumbers every ``layer_idx``, updates the per-layer config fields
    (``compress.layer_fields``) and sets ``num_hidden_layers``. Returns the kept indices (old numbering).
    """
    layers = decoder_layers(model)
    remove = set(check_layer_indices(list(indices), len(layers)))
    keep = [i for i in range(len(layers)) if i not in remove]
    check_layer_fields(model.config)
    new_layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(new_layers):
        _renumber(layer, new_idx)
    _set_decoder_layers(model, new_layers)
    update_layer_fields(model.config, keep)
    return keep


class _SkippedLayer(nn.Module):
    """Stands in for a decoder layer and passes the hidden states through (identity residual)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class skip_layers:
    """Context manager: run the model with some decoder layers replaced by the identity.

    Used by the perplexity-drop metric. The model is unchanged afterwards. Only valid without a
    KV cache (the skipped layers write nothing to it).
    """

    def __init__(self, model: nn.Module, indices: list[int]) -> None:
        self.layers = decoder_layers(model)
        self.indices = check_layer_indices(list(indices), len(self.layers), keep_one=False)
        self.saved: dict[int, nn.Module] = {}

    def __enter__(self) -> None:
        for i in self.indices:
            self.saved[i] = self.layers[i]
            self.layers[i] = _SkippedLayer()

    def __exit__(self, *exc) -> None:
        for i, layer in self.saved.items():
            self.layers[i] = layer


# ---- width: attention heads and MLP channels ------------------------------------------------------
# Architectures with separate q/k/v/o and gate/up/down projections (the Llama family).
WIDTH_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "smollm3")


def _check_width_type(config) -> None:
    if config.model_type not in WIDTH_TYPES:
        raise CompressError(f"head/width pruning supports model types {list(WIDTH_TYPES)}; "
                            f"got {config.model_type!r} (fused projections are not sliced)")


def _slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> None:
    """Keep only ``keep`` indices of a Linear's output (dim 0) or input (dim 1) features, in place."""
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.index_select(dim, keep.to(linear.weight.device)).clone())
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, keep.to(linear.bias.device)).clone())
    if dim == 0:
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def remove_heads(model: nn.Module, query_heads: list[list[int]], kv_heads: list[list[int]] | None = None) -> None:
    """Remove query heads ``query_heads[i]`` (and KV heads ``kv_heads[i]``) from layer i, in place.

    Every layer must end with the same head counts, and every kept KV group with the same number
    of query heads, so the config stays standard (num_attention_heads % num_key_value_heads == 0).
    Removing a KV head needs all of its query heads removed. ``config.head_dim`` is set explicitly
    so the head size is unchanged."""
    config = model.config
    _check_width_type(config)
    layers = decoder_layers(model)
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_q
    kv_heads = kv_heads or [[] for _ in layers]
    if len(query_heads) != len(layers) or len(kv_heads) != len(layers):
        raise CompressError(f"give heads to remove for each of the {len(layers)} layers")
    shapes = {_kept_heads(q, kv, n_q, n_kv)[2] for q, kv in zip(query_heads, kv_heads)}
    if len(shapes) != 1:
        raise CompressError(f"every layer must keep the same head counts; got (query, kv) {sorted(shapes)}")
    for layer, drop_q, drop_kv in zip(layers, query_heads, kv_heads):
        keep_q, keep_kv, (new_q, new_kv) = _kept_heads(drop_q, drop_kv, n_q, n_kv)
        attn = layer.self_attn
        _slice_linear(attn.q_proj, _head_rows(keep_q, head_dim), 0)
        _slice_linear(attn.o_proj, _head_rows(keep_q, head_dim), 1)
        _slice_linear(attn.k_proj, _head_rows(keep_kv, head_dim), 0)
        _slice_linear(attn.v_proj, _head_rows(keep_kv, head_dim), 0)
        _slice_qk_norms(attn, keep_q, keep_kv, n_q, n_kv, head_dim)
        attn.num_key_value_groups = new_q // new_kv
        attn.head_dim = head_dim
    config.head_dim = head_dim
    config.num_attention_heads, config.num_key_value_heads = shapes.pop()


def _slice_qk_norms(attn: nn.Module, keep_q: list[int], keep_kv: list[int], n_q: int, n_kv: int,
                    head_dim: int) -> None:
    """Slice q_norm/k_norm weights that span all heads (OLMo2: heads x head_dim wide) to the kept
    heads; per-head norms (Qwen3, Gemma3: head_dim wide) need nothing.

    A whole-width RMSNorm takes its statistic over every head, so after slicing the kept heads are
    normalized by the RMS of the kept heads only: the pruned model is not the original with heads
    zeroed, but an approximation like any head pruning (exact when no head is removed)."""
    for name, keep, heads in (("q_norm", keep_q, n_q), ("k_norm", keep_kv, n_kv)):
        norm = getattr(attn, name, None)
        weight = getattr(norm, "weight", None)
        if weight is None or weight.shape[0] == head_dim:
            continue
        if weight.shape != (heads * head_dim,):
            raise CompressError(f"{name} weight has shape {tuple(weight.shape)}; expected ({head_dim},) "
                                f"per head or ({heads * head_dim},) over {heads} heads")
        rows = _head_rows(keep, head_dim).to(weight.device)
        norm.weight = nn.Parameter(weight.detach().index_select(0, rows).clone())


def _kept_heads(drop_q, drop_kv, n_q: int, n_kv: int):
    """(kept query heads, kept KV heads, (count q, count kv)) for one layer; CompressError if the
    result would break grouped-query attention."""
    per_group = n_q // n_kv
    drop, drop_kv = set(drop_q), set(drop_kv)
    if any(not 0 <= h < n_q for h in drop) or any(not 0 <= g < n_kv for g in drop_kv):
        raise CompressError(f"head indices out of range (query 0..{n_q - 1}, kv 0..{n_kv - 1})")
    for g in drop_kv:
        if not set(range(g * per_group, (g + 1) * per_group)) <= drop:
            raise CompressError(f"removing KV head {g} needs its query heads "
                                f"{list(range(g * per_group, (g + 1) * per_group))} removed too")
    kept_groups = [g for g in range(n_kv) if g not in drop_kv]
    counts = {sum(h not in drop for h in range(g * per_group, (g + 1) * per_group)) for g in kept_groups}
    if not kept_groups or len(counts) != 1 or 0 in counts:
        raise CompressError(f"every kept KV group must keep the same, non-zero number of query heads "
                            f"({n_q} query heads in {n_kv} groups of {per_group}); got {sorted(drop)}")
    keep_q = [h for h in range(n_q) if h not in drop]
    return keep_q, kept_groups, (len(keep_q), len(kept_groups))


def remove_channels(model: nn.Module, channels: list[list[int]]) -> None:
    """Remove MLP intermediate channels, ``channels[i]`` from layer i, the same count in every
    layer so ``intermediate_size`` stays one number; slices gate/up (rows) and down (columns)."""
    config = model.config
    _check_width_type(config)
    layers = decoder_layers(model)
    width = config.intermediate_size
    if len(channels) != len(layers) or len({len(set(c)) for c in channels}) != 1:
        raise CompressError("give the same number of distinct channels to remove for every layer")
    n = len(set(channels[0]))
    if not 0 < n < width or any(not 0 <= c < width for cs in channels for c in cs):
        raise CompressError(f"channels to remove must be 1..{width - 1} indices in 0..{width - 1}")
    for layer, drop in zip(layers, channels):
        keep = torch.tensor([c for c in range(width) if c not in set(drop)])
        _slice_linear(layer.mlp.gate_proj, keep, 0)
        _slice_linear(layer.mlp.up_proj, keep, 0)
        _slice_linear(layer.mlp.down_proj, keep, 1)
    config.intermediate_size = width - n


# ---- layer merging (SLM) --------------------------------------------------------------------------
def _merge_params(layer: nn.Module) -> dict[str, nn.Parameter]:
    """Weights and biases of the attention and MLP projections of a decoder layer (not norms)."""
    out = {}
    for block in ("self_attn", "mlp"):
        for name, module in getattr(layer, block).named_modules():
            if isinstance(module, nn.Linear):
                for pname, p in module.named_parameters(recurse=False):
                    out[f"{block}.{name}.{pname}"] = p
    return out


@torch.no_grad()
def merged_weights(layers: nn.ModuleList, low: int, high: int, rule: str) -> dict[str, torch.Tensor]:
    """Projection weights of layers low..high merged into one layer (SLM, arXiv 2502.19159).

    ``delta_sum`` (the paper's rule): θ = θ_low + Σ_{j=low+1..high} (θ_j − θ_low).
    ``top``: what the released reference code computes by updating θ_low in place while summing
    (each step subtracts the already-updated weights), which leaves θ_high."""
    base = _merge_params(layers[low])
    if rule == "top":
        return {k: v.detach().clone() for k, v in _merge_params(layers[high]).items()}
    if rule != "delta_sum":
        raise ValueError(f"merge rule must be delta_sum or top, got {rule!r}")
    merged = {k: v.detach().clone().float() for k, v in base.items()}
    for j in range(low + 1, high + 1):
        for k, p in _merge_params(layers[j]).items():
            merged[k] += p.detach().float() - base[k].detach().float()
    return {k: v.to(base[k].dtype) for k, v in merged.items()}


def _assign(layer: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = _merge_params(layer)
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)


class merged_view:
    """Context manager: the model behaves as if ``windows`` [(low, high), ...] were merged (layer low
    holds the merged weights, low+1..high are skipped); everything is restored on exit."""

    def __init__(self, model: nn.Module, windows: list[tuple[int, int]], rule: str) -> None:
        self.model, self.windows, self.rule = model, windows, rule
        self.saved: list[tuple[int, dict[str, torch.Tensor]]] = []

    def __enter__(self) -> None:
        layers = decoder_layers(self.model)
        merged = [(low, merged_weights(layers, low, high, self.rule)) for low, high in self.windows]
        for low, weights in merged:
            self.saved.append((low, {k: p.detach().clone() for k, p in _merge_params(layers[low]).items()}))
            _assign(layers[low], weights)
        self.skip = skip_layers(self.model, [j for low, high in self.windows for j in range(low + 1, high + 1)])
        self.skip.__enter__()

    def __exit__(self, *exc) -> None:
        self.skip.__exit__(*exc)
        layers = decoder_layers(self.model)
        for low, weights in self.saved:
            _assign(layers[low], weights)


def merge_layers(model: nn.Module, windows: list[tuple[int, int]], rule: str = "delta_sum") -> list[int]:
    """Merge each window (low, high) into layer low and remove low+1..high, in place. Windows are
    disjoint, in current numbering. Returns the removed indices (current numbering)."""
    layers = decoder_layers(model)
    check_layer_fields(model.config)
    for low, high in sorted(windows, reverse=True):
        if not 0 <= low < high < len(layers):
            raise CompressError(f"merge window ({low}, {high}) is not within 0..{len(layers) - 1} with low < high")
        _assign(layers[low], merged_weights(layers, low, high, rule))
    removed = sorted(j for low, high in windows for j in range(low + 1, high + 1))
    remove_layers(model, removed)
    return removed

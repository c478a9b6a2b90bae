"""Which weights the heal stage trains: LoRA adapters (peft) or the weights themselves, on the
chosen linear modules of the chosen decoder layers; and folding LoRA back into the weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.errors import CompressError
from compress.surgery import decoder_layers, layout_for


def layers_next_to_removed(original_ids: list[int], original_layers: int | None = None) -> list[int]:
    """Current indices of the layers that sit beside a removed one: where consecutive kept original
    indices jump (and the ends, when the first or last original layers went)."""
    near = set()
    for i, (a, b) in enumerate(zip(original_ids, original_ids[1:])):
        if b - a > 1:
            near.update((i, i + 1))
    if original_ids and original_ids[0] > 0:
        near.add(0)
    if original_ids and original_layers is not None and original_ids[-1] < original_layers - 1:
        near.add(len(original_ids) - 1)
    return sorted(near)


def chosen_layers(layers: str | list[int], num_layers: int, original_ids: list[int],
                  original_layers: int | None) -> list[int]:
    """``all``, ``next_to_removed`` or explicit current indices -> sorted current indices."""
    if layers == "all":
        return list(range(num_layers))
    if layers == "next_to_removed":
        found = layers_next_to_removed(original_ids, original_layers)
        if not found:
            raise CompressError("heal.layers: next_to_removed, but no layer was removed before this stage "
                                "(width or head pruning keep every layer); use `layers: all` or a list")
        return found
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise CompressError(f"heal.layers: {bad} out of range; the model has {num_layers} layers here "
                            f"(0..{num_layers - 1})")
    return sorted(set(layers))


def target_names(model: nn.Module, layers: list[int], modules: list[str]) -> list[str]:
    """Full module names (``model.layers.3.self_attn.q_proj``) of the ``modules`` linears in ``layers``."""
    prefix = layout_for(model.config).layers_path
    stack = decoder_layers(model)
    names, seen = [], set()
    for i in layers:
        for name, mod in stack[i].named_modules():
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in modules:
                names.append(f"{prefix}.{i}.{name}")
                seen.add(name.rsplit(".", 1)[-1])
    missing = [m for m in modules if m not in seen]
    if missing:
        found = sorted({n.rsplit(".", 1)[-1] for n, m in stack[0].named_modules() if isinstance(m, nn.Linear)})
        raise CompressError(f"heal.target_modules: {missing} are not linear modules of this model's layers; "
                            f"its layers have {found}")
    return names


def wrap_lora(model: nn.Module, names: list[str], rank: int, alpha: float, dropout: float) -> nn.Module:
    """``model`` with LoRA adapters on ``names`` (peft); only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise CompressError("heal.method: lora needs peft (`pip install 'compress[heal]'`, or peft>=0.21,<0.22); "
                            "or use `method: full`") from None

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    return get_peft_model(model, config)


def unfreeze(model: nn.Module, names: list[str]) -> None:
    """Train the weights (and biases) of modules ``names``; freeze everything else."""
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        modules[name].requires_grad_(True)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (what a heal checkpoint keeps of the model)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, Any]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain transformers model with the adapters folded into the weights (peft merge_and_unload)."""
    merged = model.merge_and_unload()
    merged.requires_grad_(False)
    return merged

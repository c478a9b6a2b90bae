"""Per-layer config fields after decoder layers are removed (or merged away).

Every loader must give each kept layer the attention type (sliding or full, and with it the RoPE
base: gemma3 keys ``rope_parameters`` by attention type) and the MLP kind (dense or MoE) it had.
Loaders read that from different fields, so all of them are updated:

* per-layer lists, sliced to the kept layers: ``layer_types`` (transformers >= 4.53; vLLM's gemma3,
  llama, ... read it too) and ``no_rope_layers`` (smollm3);
* pattern scalars the lists are derived from where a config has no list, and which some loaders
  read alone:

  - ``sliding_window_pattern`` p (gemma3_text: layer i is full iff (i + 1) % p == 0; vLLM's gemma3
    before it read ``layer_types``): kept if it still describes the kept layers, else the smallest
    p that does, else **dropped** (no value can; ``layer_types`` is then the only description);
  - ``max_window_layers`` m (qwen2/qwen3: layers >= m slide when sliding is on; vLLM's qwen2 asserts
    m == num_hidden_layers when layers mix): renumbered to the number of kept layers below m;
  - ``decoder_sparse_step`` + ``mlp_only_layers`` (qwen2_moe/qwen3_moe: layer i is MoE iff i is not
    in ``mlp_only_layers`` and (i + 1) % step == 0, in transformers and vLLM alike): kept if they
    still describe the kept layers, else step 1 and the explicit list of dense layers.

Any other list-valued field with "layer" in its name is refused before anything changes.
"""

from __future__ import annotations

import logging

from compress.errors import CompressError

log = logging.getLogger("compress")

S, F = "sliding_attention", "full_attention"
LISTS = ("layer_types", "no_rope_layers")  # one entry per layer
HANDLED = (*LISTS, "mlp_only_layers")


def check_layer_fields(config) -> None:
    """CompressError for a per-layer looking list this module does not update, or a per-layer list
    whose length is not the layer count (checked before a model is changed)."""
    n = config.num_hidden_layers
    for name, value in config.to_dict().items():
        if "layer" in name and isinstance(value, list) and name not in HANDLED:
            raise CompressError(
                f"config.{name} looks like a per-layer field (a list of {len(value)} for {n} layers) "
                f"that compress does not know how to update for {config.model_type}; layer removal "
                "would leave it stale. Remove the field from config.json if it is unused, or report "
                "the model type")
    for name in LISTS:
        values = getattr(config, name, None)
        if values is not None and len(values) != n:
            raise CompressError(f"config.{name} has {len(values)} entries but num_hidden_layers is {n}")


def moe_kinds(config) -> list[bool] | None:
    """Per layer: is its MLP a mixture of experts? None for models without the MoE fields."""
    step = getattr(config, "decoder_sparse_step", None)
    if step is None:
        return None
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    experts = getattr(config, "num_experts", 0) or 0
    return [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(config.num_hidden_layers)]


def period_types(p: int, n: int) -> list[str]:
    """gemma3's ``sliding_window_pattern``: every p-th layer is full attention."""
    return [F if (i + 1) % p == 0 else S for i in range(n)]


def threshold_types(config, m: int, n: int) -> list[str]:
    """``max_window_layers`` as transformers derives ``layer_types`` from it."""
    if config.model_type in ("qwen2_moe",):
        on = bool(getattr(config, "use_sliding_window", False))
        return [S if on and (i + 1) % 2 and i < m else F for i in range(n)]
    on = getattr(config, "sliding_window", None) is not None
    return [S if on and i >= m else F for i in range(n)]


def update_layer_fields(config, keep: list[int]) -> None:
    """Make every per-layer field of ``config`` describe only the layers ``keep`` (in place)."""
    check_layer_fields(config)
    kinds = moe_kinds(config)
    for name in LISTS:
        if getattr(config, name, None) is not None:
            setattr(config, name, [getattr(config, name)[i] for i in keep])
    threshold = getattr(config, "max_window_layers", None)
    config.num_hidden_layers = len(keep)
    if kinds is not None:
        _fit_moe(config, keep, [kinds[i] for i in keep])
    types = getattr(config, "layer_types", None)
    if types is not None and threshold is not None:
        _fit_threshold(config, keep, threshold, types)
    if types is not None:
        _fit_period(config, types)


def _fit_moe(config, keep: list[int], kinds: list[bool]) -> None:
    new_index = {old: new for new, old in enumerate(keep)}
    config.mlp_only_layers = [new_index[i] for i in (config.mlp_only_layers or []) if i in new_index]
    if moe_kinds(config) != kinds:
        config.decoder_sparse_step = 1
        config.mlp_only_layers = [i for i, moe in enumerate(kinds) if not moe]


def _fit_threshold(config, keep: list[int], m: int, types: list[str]) -> None:
    config.max_window_layers = sum(1 for i in keep if i < m)
    if threshold_types(config, config.max_window_layers, len(types)) != types:
        log.warning("config.max_window_layers cannot describe the kept layers' attention types %s; "
                    "loaders that ignore config.layer_types will get them wrong", types)


def _fit_period(config, types: list[str]) -> None:
    names = [n for n in ("sliding_window_pattern", "_sliding_window_pattern") if hasattr(config, n)]
    if not names:
        return
    current = getattr(config, names[0])
    tries = [current] if isinstance(current, int) and current >= 1 else []
    fits = [p for p in [*tries, *range(1, len(types) + 2)] if period_types(p, len(types)) == types]
    for name in names:
        if fits:
            setattr(config, name, fits[0])
        else:
            delattr(config, name)
    if not fits:
        log.warning("no sliding_window_pattern describes the kept layers' attention types %s: the "
                    "field is dropped and config.layer_types is their only description", types)

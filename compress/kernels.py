"""Which layers of a GPTQ checkpoint vLLM runs through its Marlin kernel, from shapes alone.

vLLM serves ``quant_method: gptq`` checkpoints on CUDA as ``gptq_marlin`` when the config allows it,
then picks a kernel per linear layer; a layer Marlin cannot take runs on a slower kernel. The rules
below transcribe vLLM for one GPU (tensor-parallel size 1, so each partition is the whole layer):

* config, ``vllm/model_executor/layers/quantization/gptq_marlin.py``:
  ``GPTQMarlinConfig.TYPE_MAP`` holds only ``(4, sym)`` and ``(8, sym)``; ``desc_act`` with
  ``group_size == -1`` is dropped ("the same as act_order == False").
* ``vllm/model_executor/layers/quantization/utils/marlin_utils.py``:
  ``MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128]``; ``verify_marlin_supports_shape``
  (``check_marlin_supports_shape``): ``out % GPTQ_MARLIN_MIN_THREAD_N (64)``,
  ``in % GPTQ_MARLIN_MIN_THREAD_K (128)``, and ``in % group_size`` when ``group_size < in``.
* ``vllm/model_executor/kernels/linear/mixed_precision/marlin.py``
  ``MarlinLinearKernel.can_implement``: since vLLM PR #45295 (June 2026) tile misalignment is fixed
  by zero-padding (``marlin_padded_nk``), so without act-order only ``in % group_size`` remains;
  act-order (``has_g_idx``) keeps the strict shape check. ``tile_padding=False`` gives the rules
  of releases before that PR (the strict check for every layer).

Shapes are ``(out_features, in_features)`` of the layers as vLLM builds them: it fuses
``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj`` (``vllm_linears``).
"""

from __future__ import annotations

MIN_THREAD_N = 64  # GPTQ_MARLIN_MIN_THREAD_N
MIN_THREAD_K = 128  # GPTQ_MARLIN_MIN_THREAD_K
GROUP_SIZES = (-1, 32, 64, 128)  # MARLIN_SUPPORTED_GROUP_SIZES
BITS = (4, 8)  # GPTQMarlinConfig.TYPE_MAP, symmetric only
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

Shape = tuple[int, int]  # (out_features, in_features)


def vllm_linears(linears: dict[str, Shape]) -> dict[str, Shape]:
    """The layers as vLLM builds them: parts listed in ``FUSED`` that share their input become one
    layer whose outputs are the parts' outputs stacked (in the order first seen)."""
    out: dict[str, Shape] = {}
    for name, shape in linears.items():
        parent, _, leaf = name.rpartition(".")
        fused = next((f for f, parts in FUSED.items() if leaf in parts), None)
        siblings = [f"{parent}.{p}" if parent else p for p in FUSED.get(fused, ())]
        if fused is None or not all(s in linears and linears[s][1] == shape[1] for s in siblings):
            out[name] = shape
            continue
        key = f"{parent}.{fused}" if parent else fused
        o, i = out.get(key, (0, shape[1]))
        out[key] = (o + shape[0], i)
    return out


def marlin_config_problem(bits: int, group_size: int, sym: bool) -> str | None:
    """Why no layer can run on GPTQ Marlin with these settings, or None."""
    if bits not in BITS or not sym:
        return f"GPTQ Marlin takes 4- or 8-bit symmetric weights (got bits {bits}, sym {sym})"
    if group_size not in GROUP_SIZES:
        return f"GPTQ Marlin takes group_size -1, 32, 64 or 128 (got {group_size})"
    return None


def marlin_layer_problem(shape: Shape, group_size: int, desc_act: bool, tile_padding: bool = True) -> str | None:
    """Why one layer of ``shape`` falls back from Marlin (settings already Marlin's), or None."""
    n, k = shape
    act_order = desc_act and group_size != -1
    if act_order or not tile_padding:
        if n % MIN_THREAD_N:
            return f"out_features {n} is not a multiple of {MIN_THREAD_N} (Marlin min_thread_n)"
        if k % MIN_THREAD_K:
            return f"in_features {k} is not a multiple of {MIN_THREAD_K} (Marlin min_thread_k)"
    if group_size != -1 and group_size < k and k % group_size:
        return f"in_features {k} is not a multiple of group_size {group_size}"
    return None


def marlin_problems(linears: dict[str, Shape], bits: int, group_size: int, desc_act: bool, sym: bool,
                    tile_padding: bool = True) -> list[str]:
    """The layers vLLM would not run on Marlin, each with the reason; [] when all of them run on it."""
    config = marlin_config_problem(bits, group_size, sym)
    if config is not None:
        return [f"all {len(linears)} layers: {config}"]
    return [f"{name} (out {n}, in {k}): {why}" for name, (n, k) in linears.items()
            if (why := marlin_layer_problem((n, k), group_size, desc_act, tile_padding)) is not None]

"""Pure checks of a model's files: config.json's shape keys, what loading the weights reported,
and the memory a calibration set needs. Each returns problems (strings); callers raise.

Why: transformers fills a missing config key with its class default (``hidden_size`` 4096,
``num_hidden_layers`` 32) and a tensor missing from the checkpoint with random values, and goes
on; a config value of the wrong type or shape is a traceback deep inside it.
"""

from __future__ import annotations

import re
from typing import Any

REQUIRED_INTS = ("num_hidden_layers", "hidden_size", "num_attention_heads")
OPTIONAL_INTS = ("num_key_value_heads", "intermediate_size", "max_position_embeddings", "vocab_size", "head_dim")
SHOWN = 5  # tensor names listed in an error; the rest are counted


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def config_problems(raw: dict[str, Any], attribute_map: dict[str, str] | None = None) -> list[str]:
    """Problems with the shape keys of a raw config.json dict (as written, before any defaults).
    ``attribute_map``: the config class's aliases (canonical name -> name stored in the file)."""
    aliases = attribute_map or {}

    def get(key: str) -> tuple[bool, Any]:
        for name in (key, aliases.get(key, key)):
            if name in raw:
                return True, raw[name]
        return False, None

    problems, values = [], {}
    for key in (*REQUIRED_INTS, *OPTIONAL_INTS):
        present, value = get(key)
        if not present or (value is None and key in OPTIONAL_INTS):
            if key in REQUIRED_INTS:
                problems.append(f"{key} is missing (transformers would silently use its default)")
            continue
        if not _positive_int(value):
            problems.append(f"{key} must be a positive integer (got {value!r})")
            continue
        values[key] = value
    hidden, heads, kv = (values.get(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    if hidden and heads and "head_dim" not in values and hidden % heads:
        problems.append(f"num_attention_heads ({heads}) must divide hidden_size ({hidden}), "
                        "unless config.json gives head_dim")
    if heads and kv and heads % kv:
        problems.append(f"num_key_value_heads ({kv}) must divide num_attention_heads ({heads})")
    return problems


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def listed(keys, shown: int = SHOWN) -> str:
    """``a, b, c and 7 more``: the first few names in natural order, then a count."""
    keys = sorted(keys, key=_natural)
    head = ", ".join(keys[:shown])
    return head + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_count_hint(missing: set[str], num_layers: int) -> str:
    """If exactly the layers from some index on are missing: what the checkpoint holds instead."""
    layers = {int(m.group(1)) for k in missing if (m := _LAYER.search(k))}
    if not layers or layers != set(range(min(layers), num_layers)) or min(layers) == 0:
        return ""
    return (f" config.json says num_hidden_layers: {num_layers}, but the weights hold layers "
            f"0..{min(layers) - 1} only; set num_hidden_layers: {min(layers)}.")


def loading_problems(info: dict[str, Any], num_layers: int) -> str | None:
    """What ``from_pretrained(..., output_loading_info=True)`` reported, as one sentence (None: all
    tensors of the model came from the checkpoint, with the shapes config.json implies)."""
    parts, hint = [], ""
    missing = set(info.get("missing_keys") or ())
    if missing:
        parts.append(f"{len(missing)} tensor(s) the config asks for are not in the checkpoint "
                     f"({listed(missing)}) and would be filled with random values")
        hint = layer_count_hint(missing, num_layers)
    unexpected = set(info.get("unexpected_keys") or ())
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) in the checkpoint are not part of the model "
                     f"config.json describes ({listed(unexpected)})")
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: _natural(m[0]))
    if mismatched:
        shapes = ", ".join(f"{name} is {list(ckpt)} in the checkpoint, config.json implies {list(model)}"
                           for name, ckpt, model in mismatched[:SHOWN])
        more = f" and {len(mismatched) - SHOWN} more" if len(mismatched) > SHOWN else ""
        parts.append(f"{len(mismatched)} tensor(s) have another shape ({shapes}{more})")
    errors = [e.splitlines()[0] for e in info.get("error_msgs") or () if e]
    if errors:
        parts.append(f"loading reported: {'; '.join(errors[:SHOWN])}")
    if not parts:
        return None
    return "; ".join(parts) + "." + hint


TOKEN_ID_BYTES = 8  # int64 input_ids
ACTIVATION_BYTES = 4  # float32 hidden state per channel


def calibration_bytes(samples: int, seq_len: int, hidden_size: int | None) -> int:
    """Memory a calibration set takes: its token ids plus one float32 hidden state per token (the
    layer-wise path and layer_merge hold the hidden states of all samples at once)."""
    per_token = TOKEN_ID_BYTES + ACTIVATION_BYTES * (hidden_size or 0)
    return samples * seq_len * per_token


def positions_problem(key: str, tokens: int, max_positions: int | None) -> str | None:
    """``key`` asks for sequences of ``tokens``; the model was built for ``max_positions``."""
    if max_positions is None or tokens <= max_positions:
        return None
    return (f"{key}: {tokens} tokens is longer than the model's max_position_embeddings ({max_positions}); "
            f"use {max_positions} or less (positions past it were never trained, quality collapses)")


def memory_problem(key: str, samples: int, seq_len: int, hidden_size: int | None,
                   available: int | None) -> str | None:
    """``key`` asks for ``samples`` x ``seq_len`` calibration tokens; do they fit ``available`` bytes?"""
    need = calibration_bytes(samples, seq_len, hidden_size)
    if available is None or need <= available:
        return None
    return (f"{key}: {samples} samples x {seq_len} tokens need about {need / 2**30:.1f} GiB "
            f"(token ids + a float32 hidden state of {hidden_size or 0} values per token), but "
            f"{available / 2**30:.1f} GiB of memory is available; lower samples or seq_len")


def layer_count_problem(tensor_names, num_layers: int) -> str | None:
    """config.json's num_hidden_layers against the decoder layers the checkpoint's tensors name
    (``...layers.<i>....``); None when they agree or the names hold no layer index."""
    held = sorted({int(m.group(1)) for name in tensor_names if (m := _LAYER.search(f".{name}"))})
    if not held or held == list(range(num_layers)):
        return None
    if held != list(range(len(held))):
        return (f"config.json says num_hidden_layers: {num_layers}, but the weights hold layers {held}; "
                f"layer indices must run 0..{num_layers - 1} (is the checkpoint incomplete?)")
    return (f"config.json says num_hidden_layers: {num_layers}, but the weights hold layers 0..{held[-1]} "
            f"({len(held)} layers); set num_hidden_layers: {len(held)} if these weights are the model")

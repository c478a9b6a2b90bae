"""Stage ``head_pruning``: remove the least important attention heads, the same number in every
layer and every KV group, so the result is a standard config (GQA intact, head size unchanged).

Sample yaml::

    - head_pruning: {metric: norm, remove: 3}            # 3 query heads per layer (1 per KV group of 3)
    - head_pruning: {metric: norm, remove: 1, kv_groups: true}   # 1 whole KV group per layer

:param metric: ``norm`` (size of each head's contribution through o_proj) or ``ablation``
    (calibration NLL increase when the head is zeroed; L x H forward passes).
:param remove: query heads to remove per layer (a multiple of the KV head count), or with
    ``kv_groups: true`` the number of whole KV groups (with their query heads) per layer.
:param fraction: share of query heads (or KV groups) per layer instead of ``remove``.
:param multiple_of: the kept query width (kept query heads x head_dim: q_proj's output, o_proj's
    input) must be a multiple of this, default 128 (every GPTQ group size divides it; vLLM's Marlin
    needs in_features % 128). The check refuses other counts and lists those that fit, instead of
    rounding as ``width_pruning`` does: a head is head_dim channels, so rounding would change the
    removal by whole heads per KV group. With head_dim 128 (Llama-2, Qwen3) every count fits; with
    head_dim 64 the kept head count must be even. ``1`` allows any count.

OLMo2's q_norm/k_norm span all heads (heads x head_dim): they are sliced with the kept heads, so the
kept heads are normalized over the kept heads only (see ``surgery._slice_qk_norms``). The recipe
check warns where an engine cannot load the result (``HEAD_DIM_FROM_HIDDEN``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from compress.errors import CompressError
from compress.importance.heads import head_scores
from compress.layerwise import layerwise_target
from compress.stages.base import ModelFacts, StageConfig, StageContext, StageRecord
from compress.surgery import WIDTH_TYPES, remove_heads


# vLLM's attention for these model types sets head_dim = hidden_size // num_attention_heads and
# never reads config.head_dim (vllm/model_executor/models/qwen2.py ``Qwen2Attention``, olmo2.py).
HEAD_DIM_FROM_HIDDEN = {"qwen2": "", "olmo2": " (and sizes q_norm by hidden_size)"}


class HeadPruningConfig(StageConfig):
    metric: Literal["norm", "ablation"] = "norm"
    remove: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0.0, lt=1.0)
    execution: Literal["auto", "full", "layerwise"] = "auto"  # as in layer_removal
    kv_groups: bool = False
    multiple_of: int = Field(128, ge=1)  # kept heads x head_dim (o_proj in_features) a multiple of it

    @model_validator(mode="after")
    def _one_amount(self):
        if (self.remove is None) == (self.fraction is None):
            raise ValueError("give exactly one of remove, fraction")
        return self


def _heads(facts: ModelFacts) -> tuple[int, int, int | None]:
    """(query heads, KV heads, head_dim) of ``facts``."""
    return facts.num_attention_heads, facts.num_key_value_heads or facts.num_attention_heads, facts.head_size()


class HeadPruning:
    name: ClassVar[str] = "head_pruning"
    Config: ClassVar = HeadPruningConfig
    needs_calibration: ClassVar[bool] = True
    changes_depth: ClassVar[bool] = False
    quantizes: ClassVar[bool] = False

    def __init__(self, config: HeadPruningConfig) -> None:
        self.config = config

    def count(self, total: int) -> int:
        return self.config.remove if self.config.remove is not None else int(round(self.config.fraction * total))

    def units(self, n_q: int, n_kv: int) -> tuple[int, int]:
        """(units removed, query heads per unit); a unit is one query head from every KV group, or
        with ``kv_groups`` one whole KV group."""
        return (self.count(n_kv), n_q // n_kv) if self.config.kv_groups else (self.count(n_q) // n_kv, n_kv)

    def check(self, facts: ModelFacts) -> list[str]:
        return self._count_problems(facts) or self._multiple_problems(*_heads(facts))

    def _multiple_problems(self, n_q: int, n_kv: int, hd: int | None) -> list[str]:
        m = self.config.multiple_of
        if hd is None:
            return []
        removed, unit = self.units(n_q, n_kv)
        if (n_q - removed * unit) * hd % m == 0:
            return []
        per = 1 if self.config.kv_groups else unit  # a unit in the recipe's count
        fits = [u * per for u in range(1, n_q // unit) if (n_q - u * unit) * hd % m == 0]
        key = "remove" if self.config.remove is not None else "fraction"
        return [f"{key}: leaves {n_q - removed * unit} query heads x head_dim {hd} = {(n_q - removed * unit) * hd} "
                f"(o_proj input), not a multiple of multiple_of: {m}; "
                + (f"use remove: {' or '.join(map(str, fits))}, or " if fits else "")
                + f"set multiple_of: {hd} (or 1: any count)"]

    def facts_after(self, facts: ModelFacts) -> ModelFacts:
        n_q, n_kv, hd = _heads(facts)
        removed, unit = self.units(n_q, n_kv)
        kv = n_kv - removed if self.config.kv_groups else n_kv
        return replace(facts, num_attention_heads=n_q - removed * unit, num_key_value_heads=kv, head_dim=hd)

    def _count_problems(self, facts: ModelFacts) -> list[str]:
        if facts.model_type not in WIDTH_TYPES:
            return [f"model type {facts.model_type!r} is not supported; supported: {list(WIDTH_TYPES)}"]
        if facts.quantized:
            return ["the model is quantized; prune heads before quantization"]
        n_q, n_kv = facts.num_attention_heads, facts.num_key_value_heads or facts.num_attention_heads
        key = "remove" if self.config.remove is not None else "fraction"
        if self.config.kv_groups:
            k = self.count(n_kv)
            if not 0 < k < n_kv:
                return [f"{key}: would remove {k} of {n_kv} KV groups; allowed 1..{n_kv - 1}"]
            return []
        k = self.count(n_q)
        if not 0 < k < n_q:
            return [f"{key}: would remove {k} of {n_q} query heads per layer; allowed 1..{n_q - 1}"]
        if k % n_kv or k // n_kv >= n_q // n_kv:
            return [f"{key}: {k} query heads cannot come equally from {n_kv} KV groups of {n_q // n_kv} "
                    f"(use a multiple of {n_kv} below {n_q}, or kv_groups: true)"]
        return []

    def warnings(self, facts: ModelFacts) -> list[str]:
        """Problems that do not stop the run: engines that will not load the pruned checkpoint."""
        t = facts.model_type
        if t not in HEAD_DIM_FROM_HIDDEN:
            return []
        return [f"a head-pruned {t} checkpoint does not load in vLLM: its {t} attention takes head_dim = "
                f"hidden_size // num_attention_heads and ignores config.head_dim{HEAD_DIM_FROM_HIDDEN[t]}, "
                "so the weight shapes do not match; transformers loads it (it reads config.head_dim)"]

    def choose(self, scores, n_q: int, n_kv: int) -> tuple[list[list[int]], list[list[int]]]:
        """Per layer: the lowest-scoring heads in each KV group (or the lowest-scoring groups)."""
        per_group, queries, kvs = n_q // n_kv, [], []
        for row in scores.tolist():
            groups = [list(range(g * per_group, (g + 1) * per_group)) for g in range(n_kv)]
            if self.config.kv_groups:
                worst = sorted(range(n_kv), key=lambda g: (sum(row[h] for h in groups[g]), g))[: self.count(n_kv)]
                kvs.append(sorted(worst))
                queries.append(sorted(h for g in worst for h in groups[g]))
            else:
                r = self.count(n_q) // n_kv
                queries.append(sorted(h for g in groups for h in sorted(g, key=lambda h: (row[h], h))[:r]))
                kvs.append([])
        return queries, kvs

    def apply(self, model, ctx: StageContext) -> StageRecord:
        start = time.perf_counter()
        c = model.config
        n_q, n_kv = c.num_attention_heads, c.num_key_value_heads
        problems = self._multiple_problems(n_q, n_kv, getattr(c, "head_dim", None) or c.hidden_size // n_q)
        if problems:  # the recipe check refuses this first; direct callers get the same words
            raise CompressError(f"head_pruning.{problems[0]}")
        ctx.log.info("scoring %d heads x %d layers with %s", n_q, c.num_hidden_layers, self.config.metric)
        scores = head_scores(model, ctx.calibration, self.config.metric,
                             layerwise_target(model, ctx.device, "full" if self.config.metric == "ablation"
                                              else self.config.execution))
        queries, kvs = self.choose(scores, n_q, n_kv)
        remove_heads(model, queries, kvs)
        kept_width = c.num_attention_heads * c.head_dim
        return StageRecord(
            stage=self.name,
            summary=f"heads per layer {n_q}/{n_kv} -> {c.num_attention_heads}/{c.num_key_value_heads} "
                    f"(query/KV) by {self.config.metric}",
            details={"metric": self.config.metric, "multiple_of": self.config.multiple_of,
                     "kept_query_width": kept_width,  # o_proj in_features, a multiple of multiple_of
                     "head_scores": scores.tolist(),
                     "removed_query_heads": queries, "removed_kv_heads": kvs},
            replay={"query_heads": queries, "kv_heads": kvs},
            wall_s=time.perf_counter() - start,
        )

    def replay(self, model, record: dict[str, Any]) -> None:
        remove_heads(model, record["query_heads"], record["kv_heads"])

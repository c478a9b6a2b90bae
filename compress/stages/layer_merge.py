"""Stage ``layer_merge``: sliding layer merging (SLM, arXiv 2502.19159).

Walk from the top of the network down (the last layer is never touched) with a window
[low, high] of consecutive layers: merge the window into one layer and compare the merged model's
final hidden states with the original's on the calibration text; while the similarity stays above
the threshold, extend the window down; when it falls below, commit the previous window (if it held
more than one layer) and start a new window right below it. Merge rule as the paper states it:
θ = θ_low + Σ_{j≠low} (θ_j − θ_low) over the attention and MLP projections; norms stay the low
layer's. ``merge_rule: top`` reproduces the released code, whose in-place update leaves θ_high.

Cost: one forward per candidate window (merge state). With ``remove`` the threshold is bisected,
one walk per step; the walks share a memo of the similarity of every merge state measured (walks at
nearby thresholds retrace each other), and on the full-model path each state runs only from its
lowest merged layer up, from the original model's recorded layer inputs (compress.importance.suffix;
skipped when those inputs would exceed 2 GiB). Both are exact: the same windows as measuring
every state afresh with a full forward (tests/stages/test_layer_merge.py).

Reference code: 920927/SLM-a-sliding-layer-merging-method ``SLM.py`` (``cal_sim`` and the
``while low_lay >= 0`` loop): 10 samples x 128 tokens, threshold 0.72 on ``sample_cosine``.

Sample yaml::

    - layer_merge: {threshold: 0.72}                 # the reference's threshold (sample_cosine)
    - layer_merge: {remove: 7, similarity: cka}      # search the threshold that removes 7 layers

:param threshold: similarity a merged window must keep (0..1); its meaning depends on ``similarity``.
:param remove: instead of a threshold, the number of layers to remove (threshold found by bisection).
:param similarity: ``sample_cosine`` (default; per sample, cosine of the flattened tokens x hidden
    final hidden states, mean over samples: the reference code's measure, for which 0.72 was
    chosen), ``token_cosine`` (mean per-token cosine) or ``cka`` (linear CKA, the paper's analysis).
:param walk: ``paper`` (default; a window is kept while similarity >= threshold, and the last
    window is committed even when it reaches layer 0) or ``reference`` (the released loop exactly:
    similarity > threshold, and a window that grows past layer 0 ends the walk uncommitted).
:param merge_rule: ``delta_sum`` (the paper) or ``top`` (the reference code's effective rule).
:param calibration: ``same`` (the recipe's windows) or its own ``{path|dataset, samples, seq_len}``;
    the reference code uses 10 samples x 128 tokens, and the search runs the model once per
    candidate window, so a small set keeps it fast.
"""

from __future__ import annotations

from dataclasses import replace
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from tqdm.auto import tqdm

from compress.data.sources import CalibrationConfig
from compress.importance.similarity import SIMILARITIES, final_hidden_states
from compress.importance.suffix import MAX_CACHE_BYTES, SuffixRunner, cache_bytes
from compress.layerwise import layerwise_target
from compress.stages.base import ModelFacts, StageConfig, StageContext, StageRecord
from compress.surgery import decoder_layers, merge_layers, merged_view


class LayerMergeConfig(StageConfig):
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    remove: int | None = Field(None, ge=1)
    similarity: Literal["sample_cosine", "token_cosine", "cka"] = "sample_cosine"
    walk: Literal["paper", "reference"] = "paper"
    merge_rule: Literal["delta_sum", "top"] = "delta_sum"
    search_steps: int = Field(14, ge=1, le=40)
    execution: Literal["auto", "full", "layerwise"] = "auto"  # as in layer_removal
    calibration: Literal["same"] | CalibrationConfig = "same"  # reference: 10 samples x 128 tokens

    @model_validator(mode="after")
    def _one_target(self):
        if (self.threshold is None) == (self.remove is None):
            raise ValueError("give exactly one of threshold (e.g. 0.72) or remove (layers to remove)")
        return self


MergeState = tuple[tuple[int, int], ...]


def slm_windows(model, batches, reference, threshold: float, similarity: str, rule: str,
                layerwise_on=None, walk: str = "paper",
                on_try: Callable[[], Any] | None = None,
                memo: dict[MergeState, float] | None = None,
                suffix: SuffixRunner | None = None) -> list[tuple[int, int]]:
    """The windows SLM commits at ``threshold`` (current layer numbering, top window first).

    ``walk="reference"`` follows the released loop: a window grows while similarity > threshold
    (not >=), and when it grows past layer 0 the loop ends without committing it. ``on_try`` is
    called after every candidate window is measured (progress). ``memo`` maps a merge state (the
    committed windows plus the candidate, in walk order) to its similarity: a state already in it
    is not run again, and each measured one is added, so walks at other thresholds over the same
    model, batches, reference, similarity and rule (one ``remove`` search) share their
    measurements. The walk is the same with or without it (the stored value is the measured one).
    ``suffix`` (built on the unmerged model and ``batches``): each merged model runs only from its
    lowest merged layer up, from the recorded inputs (same values as the full forward)."""
    measure = SIMILARITIES[similarity]
    committed: list[tuple[int, int]] = []
    high = len(decoder_layers(model)) - 2  # the last layer is never merged
    while high > 0:
        low = high  # the window [low, high] kept the similarity
        while low - 1 >= 0:
            state = (*committed, (low - 1, high))
            s = memo.get(state) if memo is not None else None
            if s is None:
                with merged_view(model, list(state), rule):
                    hidden = (suffix(min(lo for lo, _ in state)) if suffix is not None
                              else final_hidden_states(model, batches, layerwise_on))
                    s = measure(reference, hidden)
                if memo is not None:
                    memo[state] = s
                if on_try is not None:
                    on_try()
            if (s <= threshold) if walk == "reference" else (s < threshold):
                break
            low -= 1
        if low == 0 and walk == "reference":
            break  # the reference's `while low_lay >= 0` exits here: [0, high] is never merged
        if low < high:
            committed.append((low, high))
        high = low - 1
    return committed


def removed_count(windows: list[tuple[int, int]]) -> int:
    return sum(high - low for low, high in windows)


class LayerMerge:
    name: ClassVar[str] = "layer_merge"
    Config: ClassVar = LayerMergeConfig
    needs_calibration: ClassVar[bool] = True
    changes_depth: ClassVar[bool] = True
    quantizes: ClassVar[bool] = False

    def __init__(self, config: LayerMergeConfig) -> None:
        self.config = config

    def layers_removed(self, num_layers: int) -> int:
        return self.config.remove or 0  # with a threshold the count is known only after the walk

    def facts_after(self, facts: ModelFacts) -> ModelFacts:
        return replace(facts, num_layers=facts.num_layers - self.layers_removed(facts.num_layers))

    def check(self, facts: ModelFacts) -> list[str]:
        if facts.quantized:
            return ["the model is quantized; merge layers before quantization"]
        if self.config.remove is not None and self.config.remove > facts.num_layers - 2:
            return [f"remove: {self.config.remove} of {facts.num_layers} layers; SLM never merges the "
                    f"last layer and keeps one per window (max {facts.num_layers - 2})"]
        return []

    def search(self, model, batches, reference, log, where=None, bar=None,
               memo: dict[MergeState, float] | None = None,
               suffix: SuffixRunner | None = None) -> tuple[float, list[tuple[int, int]]]:
        """Bisect the threshold so that SLM removes ``remove`` layers (closest from below if exact
        is not reachable). The walks share one ``memo`` (see ``slm_windows``): a merge state met by
        an earlier walk is not run again; pass ``{}`` to read how many states were measured."""
        c = self.config
        lo, hi, best = 0.0, 1.0, (1.0, [])
        tick = bar.update if bar is not None else None
        memo = {} if memo is None else memo  # one search: same model, batches, reference, measure, rule
        for step in range(c.search_steps):
            mid = (lo + hi) / 2
            if bar is not None:
                bar.set_description(f"layer_merge search step {step + 1}/{c.search_steps}, threshold {mid:.5f}")
            windows = slm_windows(model, batches, reference, mid, c.similarity, c.merge_rule, where,
                                  c.walk, tick, memo, suffix)
            n = removed_count(windows)
            log.info("layer_merge: threshold %.5f removes %d layers (%d merge states measured so far)",
                     mid, n, len(memo))
            if bar is not None:
                bar.set_postfix(removes=n, target=c.remove)
            if n <= c.remove and n >= removed_count(best[1]):
                best = (mid, windows)
            if n == c.remove:
                break
            lo, hi = (mid, hi) if n > c.remove else (lo, mid)
        return best

    def apply(self, model, ctx: StageContext) -> StageRecord:
        start = time.perf_counter()
        c = self.config
        num_layers = len(decoder_layers(model))
        where = layerwise_target(model, ctx.device, c.execution)
        reference = final_hidden_states(model, ctx.calibration, where)
        suffix = (SuffixRunner(model, ctx.calibration)
                  if where is None and cache_bytes(model, ctx.calibration) <= MAX_CACHE_BYTES else None)
        memo: dict[MergeState, float] = {}
        with tqdm(desc="layer_merge", unit="window", disable=not ctx.progress) as bar:
            if c.threshold is not None:
                threshold = c.threshold
                windows = slm_windows(model, ctx.calibration, reference, threshold, c.similarity,
                                      c.merge_rule, where, c.walk, bar.update, memo, suffix)
            else:
                threshold, windows = self.search(model, ctx.calibration, reference, ctx.log, where, bar, memo,
                                                 suffix)
        removed = merge_layers(model, windows, c.merge_rule)
        groups = [[ctx.original_layer_ids[j] for j in range(low, high + 1)] for low, high in sorted(windows)]
        return StageRecord(
            stage=self.name,
            summary=f"merged {len(windows)} window(s) {groups} (original indices): {num_layers} -> "
                    f"{num_layers - len(removed)} layers, {c.similarity} {'>' if c.walk == 'reference' else '>='} "
                    f"{threshold:.4f}, {c.merge_rule}, {c.walk} walk",
            details={"threshold": threshold, "similarity": c.similarity, "walk": c.walk, "merge_rule": c.merge_rule,
                     "windows": sorted(windows), "merged_groups_original": groups,
                     "merge_states_measured": len(memo),
                     "decoder_layers_run": suffix.layer_calls if suffix is not None else None},
            replay={"windows": sorted(windows), "rule": c.merge_rule},
            removed_layers=removed,
            wall_s=time.perf_counter() - start,
        )

    def replay(self, model, record: dict[str, Any]) -> None:
        merge_layers(model, [tuple(w) for w in record["windows"]], record["rule"])

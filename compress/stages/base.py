"""The one small interface every stage implements.

A stage is a class with a ``name`` (its YAML key), a pydantic ``Config`` (strict: unknown keys are
errors), capability flags the recipe check reads, two pure methods the recipe check calls before
any weights load:

* ``check(facts) -> list[str]``: what is wrong with this stage for a model of these shapes;
* ``facts_after(facts) -> ModelFacts``: the shapes after the stage (fewer layers, heads, channels),
  which the next stage is checked against;

and two methods that do the work:

* ``apply(model, ctx) -> StageRecord``: change the model in place and say what changed;
* ``replay(model, record)``: redo a completed stage from its record without recomputing scores
  (used when a crashed run resumes).

Optional: ``replayable = False`` (a stage too costly to redo, e.g. quantization: the pipeline then
always writes its checkpoint and resumes by loading it), ``save(model, folder)`` and
``load(folder, device) -> model`` when ``save_pretrained``/``from_pretrained`` are not the way, and
``warnings(facts) -> list[str]``: problems that do not stop the run (the recipe check logs them and
``compress validate`` prints them), e.g. an engine that will not load the result.

Stages never evaluate, never save and never parse YAML: the pipeline does that.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    """Base for every stage's typed config: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


SHAPES = ("num_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size")


@dataclass
class ModelFacts:
    """What the recipe check knows about the model before loading any weights (from config.json),
    or, for a later stage, about the model the earlier stages leave (``facts_after``)."""

    model_type: str
    num_layers: int
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    quantized: bool = False
    hidden_size: int | None = None
    max_position_embeddings: int | None = None  # longest sequence the model was built for
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (the config's own rule)
    shaped_by: dict[str, str] = field(default_factory=dict)  # shape field -> recipe key of the stage that set it

    def head_size(self) -> int | None:
        if self.head_dim is not None:
            return self.head_dim
        if self.hidden_size and self.num_attention_heads:
            return self.hidden_size // self.num_attention_heads
        return None

    def linear_inputs(self) -> dict[str, tuple[int | None, str]]:
        """in_features of every decoder-layer linear, with where it comes from (Llama layout:
        q/k/v/gate/up read the hidden state, o_proj the heads, down_proj the MLP channels)."""
        hidden, head = self.hidden_size, self.head_size()
        heads = self.num_attention_heads * head if self.num_attention_heads and head else None
        return {
            "q_proj, k_proj, v_proj, gate_proj, up_proj": (hidden, "hidden_size"),
            "o_proj": (heads, f"{self.num_attention_heads} heads x head_dim {head}"
                       + self._by("num_attention_heads")),
            "down_proj": (self.intermediate_size, "intermediate_size" + self._by("intermediate_size")),
        }

    def _by(self, key: str) -> str:
        return f" after {self.shaped_by[key]}" if key in self.shaped_by else ""


def facts_after_stage(before: ModelFacts, after: ModelFacts, key: str) -> ModelFacts:
    """``after`` with ``shaped_by`` naming ``key`` (e.g. ``stages[0].width_pruning``) for every
    shape the stage changed."""
    changed = {f: key for f in SHAPES if getattr(before, f) != getattr(after, f)}
    return replace(after, shaped_by={**before.shaped_by, **changed})


@dataclass
class StageContext:
    """What a stage may use besides the model: calibration batches, tokenizer, device, logger."""

    calibration: list[dict[str, torch.Tensor]]  # each: input_ids (B, T), attention_mask (B, T)
    tokenizer: Any
    device: torch.device
    original_layer_ids: list[int]  # current layer index -> index in the input model
    log: Any
    progress: bool = True  # show progress bars
    teacher: Any = None  # heal: the teacher's baseline-logits store on its windows (fidelity.BaselineStore)
    work_folder: Any = None  # a folder of the run where the stage may keep resume state (Path), or None
    original_num_layers: int | None = None  # layers of the input model (before any stage)
    cache: Any = None  # a sweep's shared work (compress.work_cache.WorkCache, scoped to this model state) or None


@dataclass
class StageRecord:
    """What a stage did. ``replay`` holds what ``Stage.replay`` needs to redo it exactly."""

    stage: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    replay: dict[str, Any] = field(default_factory=dict)
    removed_layers: list[int] = field(default_factory=list)  # current indices before the stage
    wall_s: float = 0.0
    new_model: Any = field(default=None, repr=False)  # set when the stage built a new model object

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "new_model"}


class Stage(Protocol):
    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    needs_calibration: ClassVar[bool]
    changes_depth: ClassVar[bool]  # removes or merges decoder layers
    quantizes: ClassVar[bool]  # after it, weights are no longer float: nothing may change them

    def __init__(self, config: StageConfig) -> None: ...

    def check(self, facts: ModelFacts) -> list[str]:
        """Errors that depend on the model's shape (key path relative to the stage, message)."""
        ...

    def facts_after(self, facts: ModelFacts) -> ModelFacts:
        """The shapes after this stage (called only when ``check(facts)`` found nothing)."""
        ...

    def apply(self, model: torch.nn.Module, ctx: StageContext) -> StageRecord: ...

    def replay(self, model: torch.nn.Module, record: dict[str, Any]) -> None: ...

"""The one small interface every stage implements.

A stage is a class with a ``name`` (its YAML key), a pydantic ``Config`` (strict: unknown keys are
errors), capability flags the recipe check reads, and two methods:

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

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    """Base for every stage's typed config: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class ModelFacts:
    """What the recipe check knows about the model before loading any weights (from config.json)."""

    model_type: str
    num_layers: int
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    quantized: bool = False
    hidden_size: int | None = None
    max_position_embeddings: int | None = None  # longest sequence the model was built for


@dataclass
class StageContext:
    """What a stage may use besides the model: calibration batches, tokenizer, device, logger."""

    calibration: list[dict[str, torch.Tensor]]  # each: input_ids (B, T), attention_mask (B, T)
    tokenizer: Any
    device: torch.device
    original_layer_ids: list[int]  # current layer index -> index in the input model
    log: Any
    progress: bool = True  # show progress bars


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

    def apply(self, model: torch.nn.Module, ctx: StageContext) -> StageRecord: ...

    def replay(self, model: torch.nn.Module, record: dict[str, Any]) -> None: ...

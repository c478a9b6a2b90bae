"""Stage registry: YAML name -> class. Adding a stage is one file and one line here."""

from __future__ import annotations

from compress.stages.bnb4 import BnB4
from compress.stages.gguf import GGUF
from compress.stages.gptq import GPTQ
from compress.stages.head_pruning import HeadPruning
from compress.stages.heal import Heal
from compress.stages.layer_merge import LayerMerge
from compress.stages.layer_removal import LayerRemoval
from compress.stages.width_pruning import WidthPruning

STAGES = {
    LayerRemoval.name: LayerRemoval,
    LayerMerge.name: LayerMerge,
    HeadPruning.name: HeadPruning,
    WidthPruning.name: WidthPruning,
    Heal.name: Heal,
    BnB4.name: BnB4,
    GPTQ.name: GPTQ,
    GGUF.name: GGUF,
}

# Stages the recipe schema knows but this version cannot run yet: a clear error, never a skip.
UNAVAILABLE: dict[str, str] = {}

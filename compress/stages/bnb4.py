"""Stage ``bnb4``: bitsandbytes 4-bit weights (NF4 or FP4; Dettmers et al. 2023, QLoRA,
arXiv 2305.14314) through transformers' ``BitsAndBytesConfig``.

Sample yaml::

    - bnb4: {quant_type: nf4, double_quant: true, compute_dtype: bfloat16}

The float model is written to a temporary folder (safetensors) and loaded back with the
quantization config, which is how transformers quantizes; the result serializes as a 4-bit
checkpoint that ``from_pretrained`` reloads (quantization_config in config.json). Runs on CUDA and,
with bitsandbytes >= 0.48, on the CPU. Needs ``pip install bitsandbytes`` (extra ``quant``).
"""

from __future__ import annotations

from dataclasses import replace
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from compress.errors import CompressError
from compress.quiet import auto_model_class, quiet_backends, quiet_import
from compress.stages.base import ModelFacts, StageConfig, StageContext, StageRecord

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class BnB4Config(StageConfig):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"
    skip_modules: list[str] = ["lm_head"]


def _bnb_version() -> str:
    """bitsandbytes, imported only when the stage runs (its missing-kernel notices kept quiet)."""
    try:
        bitsandbytes = quiet_import("bitsandbytes")
    except ImportError:
        raise CompressError("stage bnb4 needs bitsandbytes: pip install -e '.[quant]' "
                            "(or pip install 'bitsandbytes>=0.48')") from None
    return bitsandbytes.__version__


class BnB4:
    """Not replayable, so the pipeline writes the checkpoint right after ``apply``, before any
    forward pass: with bitsandbytes 0.50.2 on the CPU, a forward pass rewrites the double-quant
    state (``nested_absmax``) in place, and a checkpoint saved after it reloads to slightly
    different logits (~4e-3); saved before, the reload is exact (tests pin both)."""

    name: ClassVar[str] = "bnb4"
    Config: ClassVar = BnB4Config
    needs_calibration: ClassVar[bool] = False
    changes_depth: ClassVar[bool] = False
    quantizes: ClassVar[bool] = True
    replayable: ClassVar[bool] = False  # resumes from its checkpoint

    def __init__(self, config: BnB4Config) -> None:
        self.config = config

    def check(self, facts: ModelFacts) -> list[str]:
        if facts.quantized:
            return ["the input model is already quantized; bnb4 needs float weights"]
        return []  # bitsandbytes quantizes the flattened weight in blocks: any layer width works

    def facts_after(self, facts: ModelFacts) -> ModelFacts:
        return replace(facts, quantized=True)

    def quantization_config(self):
        from transformers import BitsAndBytesConfig

        c = self.config
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=c.quant_type,
                                  bnb_4bit_use_double_quant=c.double_quant,
                                  bnb_4bit_compute_dtype=DTYPES[c.compute_dtype],
                                  llm_int8_skip_modules=list(c.skip_modules))

    def apply(self, model, ctx: StageContext) -> StageRecord:
        start = time.perf_counter()
        version = _bnb_version()
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        tmp = Path(tempfile.mkdtemp(prefix="compress-bnb4-"))
        try:
            model.save_pretrained(tmp)
            ctx.log.info("bnb4: quantizing to %s (double quant %s, compute %s) on %s",
                         self.config.quant_type, self.config.double_quant, self.config.compute_dtype, device)
            with quiet_backends():
                quantized = auto_model_class().from_pretrained(
                    tmp, quantization_config=self.quantization_config(), dtype=dtype,
                    device_map=str(device)).eval()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        c = self.config
        return StageRecord(
            stage=self.name,
            summary=f"bitsandbytes 4-bit {c.quant_type}, double quant {c.double_quant}, compute {c.compute_dtype}",
            details={"backend": f"bitsandbytes {version}", "quant_type": c.quant_type, "bits": 4,
                     "double_quant": c.double_quant, "compute_dtype": c.compute_dtype,
                     "skip_modules": list(c.skip_modules)},
            new_model=quantized,
            wall_s=time.perf_counter() - start,
        )

    def replay(self, model, record: dict[str, Any]) -> None:
        raise AssertionError("bnb4 is not replayable: the pipeline reloads its checkpoint")

    @staticmethod
    def load(folder: Path, device):
        _bnb_version()
        from compress.model_io import load_quantized  # lazy: model_io imports the stage registry

        return load_quantized(folder, device)

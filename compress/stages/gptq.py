"""Stage ``gptq``: GPTQ weight quantization (Frantar et al. 2022, arXiv 2210.17323) through
GPTQModel, the maintained successor of AutoGPTQ that transformers and optimum call for GPTQ.

Sample yaml::

    - gptq: {bits: 4, group_size: 128, desc_act: false, sym: true, damp_percent: 0.01}

The float model (already pruned by earlier stages) is written to a temporary folder, GPTQModel
loads and quantizes it with the recipe's calibration batches and saves it with its own ``save``
(``checkpoint_format: gptq``, the v1 layout vLLM and TGI load; transformers' and optimum's own
save paths were seen writing ``gptq_v2`` metadata). The in-memory model used for evaluation is
loaded back from exactly those files, and the checkpoint is a copy of them, so what is evaluated
is what ships. Needs ``pip install -e '.[gptq]'`` (gptqmodel + optimum).

:param bits: 2, 3, 4 or 8.
:param group_size: -1 (per channel), 32, 64 or 128.
:param desc_act: quantize columns in order of decreasing activation (act-order).
:param sym: symmetric quantization.
:param damp_percent: Hessian dampening, fraction of the mean diagonal (``percdamp``).
:param samples: use only the first N calibration windows (default: all of them).
:param calibration: ``same`` (the recipe's calibration windows) or its own
    ``{path|dataset, samples, seq_len, seed}``.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
import os
import shutil
import sys
import tempfile
import weakref
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from compress.data.sources import CalibrationConfig
from compress.errors import CompressError
from compress.quiet import auto_model_class, quiet_backends, quiet_import
from compress.stages.base import ModelFacts, StageConfig, StageContext, StageRecord

GPTQ_FILES = ("config.json", "quantize_config.json", "generation_config.json")


class GPTQConfig(StageConfig):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Literal[-1, 32, 64, 128] = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = Field(0.01, gt=0.0, lt=1.0)
    samples: int | None = Field(None, ge=1)
    calibration: Literal["same"] | CalibrationConfig = "same"  # or its own text, samples, seq_len
    format: Literal["gptq"] = "gptq"


def _backend():
    """GPTQModel, imported only when the stage runs (its banner and torchao's notices kept quiet)."""
    try:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
        gptqmodel = quiet_import("gptqmodel")
    except ImportError:
        raise CompressError("stage gptq needs GPTQModel: pip install -e '.[gptq]' "
                            "(gptqmodel==7.6.0 and optimum)") from None
    return gptqmodel.__version__, gptqmodel.GPTQModel, gptqmodel.QuantizeConfig


def _layer_losses(folder: Path) -> dict[str, float]:
    """GPTQModel's per-module quantization loss log (quant_log.csv), if it wrote one."""
    import csv

    log = folder / "quant_log.csv"
    if not log.exists():
        return {}
    with log.open() as f:
        rows = list(csv.DictReader(f))
    key = next((k for k in (rows[0] if rows else {}) if "loss" in k.lower()), None)
    if key is None:
        return {}
    return {f"{r.get('layer', '?')}.{r.get('module', '?')}": float(r[key]) for r in rows if r.get(key)}


def _group_problems(g: int, facts: ModelFacts) -> list[str]:
    """group_size must divide every linear's in_features, as the earlier stages leave them: GPTQ
    quantizes each weight row in groups of ``g`` inputs and the int4 kernels need whole groups."""
    widths = facts.linear_inputs()  # layer kinds -> (in_features, where it comes from)
    bad = {kinds: (w, why) for kinds, (w, why) in widths.items() if w and g > 0 and w % g}
    if not bad:
        return []
    fits = [s for s in (128, 64, 32) if all(w % s == 0 for w, _ in widths.values() if w)]
    fix = f"use group_size: {fits[0]} or -1" if fits else "use group_size: -1"
    pruned = sorted({facts.shaped_by[shape] for kinds, shape in (("o_proj", "num_attention_heads"),
                                                                  ("down_proj", "intermediate_size"))
                     if kinds in bad and shape in facts.shaped_by})  # a pruning stage made that width
    fix += "".join(f", or set multiple_of: {g} on {stage}" for stage in pruned)
    listed = "; ".join(f"{kinds} in_features {w} ({why})" for kinds, (w, why) in bad.items())
    return [f"group_size: {g} does not divide {listed}; the int4 kernels need whole groups: {fix}"]


class GPTQ:
    name: ClassVar[str] = "gptq"
    Config: ClassVar = GPTQConfig
    needs_calibration: ClassVar[bool] = True
    changes_depth: ClassVar[bool] = False
    quantizes: ClassVar[bool] = True
    replayable: ClassVar[bool] = False  # resumes from its checkpoint

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config
        self._saved: Path | None = None  # GPTQModel's own output, copied by save()

    def check(self, facts: ModelFacts) -> list[str]:
        if facts.quantized:
            return ["the input model is already quantized; gptq needs float weights"]
        return _group_problems(self.config.group_size, facts)

    def facts_after(self, facts: ModelFacts) -> ModelFacts:
        return replace(facts, quantized=True)

    def apply(self, model, ctx: StageContext) -> StageRecord:
        start = time.perf_counter()
        version, GPTQModel, QuantizeConfig = _backend()
        c = self.config
        device = next(model.parameters()).device
        batches = ctx.calibration[: c.samples] if c.samples else ctx.calibration
        calibration = [{"input_ids": row[None], "attention_mask": mask[None]}
                       for b in batches for row, mask in zip(b["input_ids"], b["attention_mask"])]
        work = Path(tempfile.mkdtemp(prefix="compress-gptq-"))
        model.save_pretrained(work / "float")
        ctx.tokenizer.save_pretrained(work / "float")
        ctx.log.info("gptq: %d-bit, group %d, desc_act %s, sym %s, damp %.3f on %d calibration windows (%s, GPTQModel %s)",
                     c.bits, c.group_size, c.desc_act, c.sym, c.damp_percent, len(calibration), device, version)
        quant = QuantizeConfig(bits=c.bits, group_size=c.group_size, desc_act=c.desc_act, sym=c.sym,
                               damp_percent=c.damp_percent)
        # GPTQModel draws its progress bars on stdout, where `compress run` prints the stage table
        with quiet_backends(), contextlib.redirect_stdout(sys.stderr):
            gm = GPTQModel.load(str(work / "float"), quant, device=str(device))
            gm.quantize(calibration, batch_size=1)
            gm.save(str(work / "gptq"))
            del gm
            shutil.rmtree(work / "float", ignore_errors=True)
            # the temporary folder goes once save() has copied it, or at the latest when the process exits
            self._cleanup = weakref.finalize(self, shutil.rmtree, work, True)
            self._saved = work / "gptq"
            quantized = auto_model_class().from_pretrained(self._saved, device_map=str(device)).eval()
        losses = _layer_losses(self._saved)
        return StageRecord(
            stage=self.name,
            summary=f"GPTQ {c.bits}-bit, group {c.group_size}, desc_act {c.desc_act}, sym {c.sym} "
                    f"on {len(calibration)} windows (GPTQModel {version})",
            details={"backend": f"gptqmodel {version}", "bits": c.bits, "group_size": c.group_size,
                     "desc_act": c.desc_act, "sym": c.sym, "damp_percent": c.damp_percent,
                     "calibration_windows": len(calibration), "checkpoint_format": "gptq",
                     "module_losses": losses},
            new_model=quantized,
            wall_s=time.perf_counter() - start,
        )

    def save(self, model, folder: Path) -> None:
        """Copy GPTQModel's own output (weights, config with quantization_config, quantize_config)."""
        if self._saved is None:
            raise CompressError("gptq: nothing to save; the stage has not quantized a model in this process")
        for path in self._saved.iterdir():
            if path.is_file() and not path.name.startswith("tokenizer") and path.name != "quant_log.csv":
                shutil.copy2(path, Path(folder) / path.name)
        self._saved = None  # copied: the checkpoint is the only copy now
        self._cleanup()

    def replay(self, model, record: dict[str, Any]) -> None:
        raise AssertionError("gptq is not replayable: the pipeline reloads its checkpoint")

    @staticmethod
    def load(folder: Path, device):
        _backend()
        from compress.model_io import load_quantized  # lazy: model_io imports the stage registry

        return load_quantized(folder, device)

"""Stage ``gptq``: GPTQ weight quantization (Frantar et al. 2022, arXiv 2210.17323) through
GPTQModel, the maintained successor of AutoGPTQ that transformers and optimum call for GPTQ.

Sample yaml::

    - gptq: {bits: 4, group_size: 128, desc_act: false, act_group_aware: false, sym: true, damp_percent: 0.01}

The float model (already pruned by earlier stages) is written to a temporary folder, GPTQModel
loads and quantizes it with the recipe's calibration batches and saves it with its own ``save``
(``checkpoint_format: gptq``, the v1 layout vLLM and TGI load; transformers' and optimum's own
save paths were seen writing ``gptq_v2`` metadata). The in-memory model used for evaluation is
loaded back from exactly those files, and the checkpoint is a copy of them, so what is evaluated
is what ships. Machine-local paths GPTQModel writes into config.json / quantize_config.json
(``meta.offload_to_disk_path``, a temporary folder) are dropped. The record says which layers vLLM
would run through its Marlin kernel (``compress/kernels.py``). Needs ``pip install -e '.[gptq]'``
(gptqmodel + optimum).

:param bits: 2, 3, 4 or 8.
:param group_size: -1 (per channel), 32, 64 or 128.
:param desc_act: quantize columns in order of decreasing activation (act-order).
:param act_group_aware: GPTQModel's group-aware reordering (GAR; its default, off here): classic
    GPTQ as in the paper and AutoGPTQ when false. Needs groups (not ``group_size: -1``) and no
    ``desc_act``.
:param sym: symmetric quantization; must be true: the v1 ``gptq`` format stores zero points minus
    one, which GPTQModel undoes on reload but vLLM's v1 path does not (optimum: "gptq(v1) can only
    support sym=True"), so asymmetric v1 checkpoints are mis-dequantized there.
:param damp_percent: Hessian dampening, fraction of the mean diagonal (``percdamp``).
:param samples: use only the first N calibration windows (default: all of them).
:param calibration: ``same`` (the recipe's calibration windows) or its own
    ``{path|dataset, samples, seq_len, seed}``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
import os
import shutil
import sys
import tempfile
import weakref
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from compress.data.sources import CalibrationConfig
from compress.errors import CompressError
from compress.kernels import marlin_config_problem, marlin_problems, vllm_linears
from compress.quiet import auto_model_class, quiet_backends, quiet_import
from compress.stages.base import ModelFacts, StageConfig, StageContext, StageRecord

GPTQ_FILES = ("config.json", "quantize_config.json", "generation_config.json")


class GPTQConfig(StageConfig):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Literal[-1, 32, 64, 128] = 128
    desc_act: bool = False
    act_group_aware: bool = False  # GPTQModel turns it on unless told; classic GPTQ is off
    sym: bool = True
    damp_percent: float = Field(0.01, gt=0.0, lt=1.0)
    samples: int | None = Field(None, ge=1)
    calibration: Literal["same"] | CalibrationConfig = "same"  # or its own text, samples, seq_len
    format: Literal["gptq"] = "gptq"

    @field_validator("sym")
    @classmethod
    def _symmetric(cls, sym: bool) -> bool:
        if not sym:
            raise ValueError("false is not supported: the checkpoint is written in the v1 `gptq` format, "
                             "whose asymmetric zero points vLLM and other v1 readers mis-dequantize "
                             "(optimum: gptq v1 supports only sym=True); use sym: true")
        return sym

    @model_validator(mode="after")
    def _reordering(self):
        if self.act_group_aware and self.group_size == -1:
            raise ValueError("act_group_aware: true needs groups (group_size 32, 64 or 128); "
                             "with group_size: -1 use act_group_aware: false")
        if self.act_group_aware and self.desc_act:
            raise ValueError("act_group_aware: true and desc_act: true exclude each other (GPTQModel); choose one")
        return self


def _backend():
    """GPTQModel, imported only when the stage runs (its banner and torchao's notices kept quiet)."""
    try:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
        gptqmodel = quiet_import("gptqmodel")
    except ImportError:
        raise CompressError("stage gptq needs GPTQModel: pip install -e '.[gptq]' "
                            "(gptqmodel==7.6.0 and optimum)") from None
    return gptqmodel.__version__, gptqmodel.GPTQModel, gptqmodel.QuantizeConfig


def without_local_paths(value: Any, temp_dir: str) -> tuple[Any, list[str]]:
    """``value`` (parsed JSON) without the strings naming places on this machine (absolute paths,
    anything under ``temp_dir``): the dict entries and list items holding them are dropped.
    Also returns the dropped entries' key paths, e.g. ``quantization_config.meta.offload_to_disk_path``."""
    def local(v: Any) -> bool:
        return isinstance(v, str) and (v.startswith("/") or os.path.isabs(v) or temp_dir in v)

    if not isinstance(value, (dict, list)):
        return value, []
    kept, dropped = {}, []
    for k, v in (value.items() if isinstance(value, dict) else enumerate(value)):
        name = str(k) if isinstance(value, dict) else f"[{k}]"
        if local(v):
            dropped.append(name)
            continue
        kept[k], inner = without_local_paths(v, temp_dir)
        dropped += [f"{name}.{d}" for d in inner]
    return (kept if isinstance(value, dict) else list(kept.values())), dropped


def _strip_local_paths(folder: Path) -> list[str]:
    """Rewrite GPTQModel's JSON files in ``folder`` without machine-local paths; the dropped keys."""
    dropped = []
    for name in ("config.json", "quantize_config.json"):
        path = folder / name
        if path.exists():
            clean, gone = without_local_paths(json.loads(path.read_text()), tempfile.gettempdir())
            if gone:
                path.write_text(json.dumps(clean, indent=2) + "\n")
                dropped += [f"{name}:{key}" for key in gone]
    return dropped


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear layer GPTQ quantizes (all but the output head)."""
    head = model.get_output_embeddings()
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head}


def _marlin(model, c: GPTQConfig) -> tuple[str, dict[str, Any]]:
    """The summary phrase and record fields saying which layers vLLM runs through Marlin."""
    linears = vllm_linears(_linear_shapes(model))
    args = (linears, c.bits, c.group_size, c.desc_act, c.sym)
    fields = {}
    for key, padding in (("marlin", True), ("marlin_without_tile_padding", False)):
        problems = marlin_problems(*args, tile_padding=padding)
        fields[key] = problems or f"all {len(linears)} layers"
    problems = marlin_problems(*args)
    falls_back = len(linears) if marlin_config_problem(c.bits, c.group_size, c.sym) else len(problems)
    phrase = (f"vLLM Marlin: all {len(linears)} layers" if not problems else
              f"vLLM Marlin: {falls_back} of {len(linears)} layers fall back (details.marlin)")
    return phrase, fields


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


def _run_gptqmodel(GPTQModel, quant, work: Path, calibration: list[dict], device) -> list[str]:
    """GPTQModel quantizes ``work/float`` and saves ``work/gptq`` (the float copy then goes);
    returns the machine-local paths stripped from its JSON files."""
    # GPTQModel draws its progress bars on stdout, where `compress run` prints the stage table
    with quiet_backends(), contextlib.redirect_stdout(sys.stderr):
        gm = GPTQModel.load(str(work / "float"), quant, device=str(device))
        gm.quantize(calibration, batch_size=1)
        gm.save(str(work / "gptq"))
    del gm
    shutil.rmtree(work / "float", ignore_errors=True)
    return _strip_local_paths(work / "gptq")
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
        marlin, marlin_fields = _marlin(model, c)
        device = next(model.parameters()).device
        batches = ctx.calibration[: c.samples] if c.samples else ctx.calibration
        calibration = [{"input_ids": row[None], "attention_mask": mask[None]}
                       for b in batches for row, mask in zip(b["input_ids"], b["attention_mask"])]
        ctx.log.info("gptq: %d-bit, group %d, desc_act %s, act_group_aware %s, sym %s, damp %.3f on %d "
                     "calibration windows (%s, GPTQModel %s)", c.bits, c.group_size, c.desc_act,
                     c.act_group_aware, c.sym, c.damp_percent, len(calibration), device, version)
        quant = QuantizeConfig(bits=c.bits, group_size=c.group_size, desc_act=c.desc_act, sym=c.sym,
                               act_group_aware=c.act_group_aware, damp_percent=c.damp_percent)
        work = Path(tempfile.mkdtemp(prefix="compress-gptq-"))
        # the temporary folder goes once save() has copied it, when quantization fails, or at the
        # latest when the process exits
        self._cleanup = weakref.finalize(self, shutil.rmtree, work, True)
        try:
            model.save_pretrained(work / "float")
            ctx.tokenizer.save_pretrained(work / "float")
            stripped = _run_gptqmodel(GPTQModel, quant, work, calibration, device)
            self._saved = work / "gptq"
            with quiet_backends(), contextlib.redirect_stdout(sys.stderr):
                quantized = auto_model_class().from_pretrained(self._saved, device_map=str(device)).eval()
        except BaseException:
            self._saved = None
            self._cleanup()
            raise
        losses = _layer_losses(self._saved)
        return StageRecord(
            stage=self.name,
            summary=f"GPTQ {c.bits}-bit, group {c.group_size}, desc_act {c.desc_act}, act_group_aware "
                    f"{c.act_group_aware}, sym {c.sym} on {len(calibration)} windows (GPTQModel {version}); {marlin}",
            details={"backend": f"gptqmodel {version}", "bits": c.bits, "group_size": c.group_size,
                     "desc_act": c.desc_act, "act_group_aware": c.act_group_aware, "sym": c.sym,
                     "damp_percent": c.damp_percent, "calibration_windows": len(calibration),
                     "checkpoint_format": "gptq", **marlin_fields, "stripped_local_paths": stripped,
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

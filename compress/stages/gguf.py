"""Stage ``gguf``: the model so far as a GGUF file, made by llama.cpp's own converter and quantizer
(compress.gguf.export), optionally with an importance matrix from the recipe's calibration windows
(llama.cpp's llama-imatrix). It must be the last stage, after float stages only (a GPTQ or bnb4 model
cannot be converted: the GGUF quantizer replaces them).

Sample yaml::

    - gguf: {quant: q4_k_m, imatrix: true}

Its checkpoint (``checkpoints/gguf/``, always written) holds the float model the converter read (so that
``compress verify --engine llamacpp`` has its reference beside it), ``model-<quant>.gguf`` and the GGUF's
``.compress.json``; the provenance (compress.json) records the stage's details (quant, importance matrix,
file size). The row's metrics are computed by llama.cpp on the GGUF file (compress.gguf.evaluate).
Needs the llama.cpp environment: ``bash scripts/gguf-env.sh``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from compress.faults import crash_point
from compress.stages.base import ModelFacts, StageConfig, StageContext, StageRecord

Quant = Literal["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q4_k_m", "q4_k_s", "q4_0",
                "q3_k_m", "q3_k_s", "q3_k_l", "q2_k", "iq4_xs", "iq4_nl"]


class GGUFStageConfig(StageConfig):
    quant: Quant = "q4_k_m"
    imatrix: bool = False  # importance matrix from the recipe's calibration (or this stage's own)


def gguf_name(quant: str) -> str:
    return f"model-{quant}.gguf"


class GGUF:
    name: ClassVar[str] = "gguf"
    Config: ClassVar = GGUFStageConfig
    changes_depth: ClassVar[bool] = False
    quantizes: ClassVar[bool] = True  # nothing may come after it
    replayable: ClassVar[bool] = False  # resumes from its checkpoint
    always_save: ClassVar[bool] = True

    def __init__(self, config: GGUFStageConfig) -> None:
        self.config = config
        self.needs_calibration = config.imatrix
        self._work: Path | None = None

    def check(self, facts: ModelFacts) -> list[str]:
        from compress.gguf.env import missing_reason

        errors = []
        if facts.quantized:
            errors.append("comes after a quantization stage (gptq/bnb4); llama.cpp converts float weights and its "
                          "quantizer (quant: q4_k_m, ...) replaces them: drop that stage or put gguf in its place")
        if self.config.imatrix and self.config.quant in ("f32", "f16", "bf16"):
            errors.append(f"imatrix: an importance matrix steers quantization; quant {self.config.quant} is not "
                          "quantized (use q4_k_m, q5_k_m, ...)")
        why = missing_reason()
        if why is not None:
            errors.append(why)
        return errors

    def facts_after(self, facts: ModelFacts) -> ModelFacts:
        return replace(facts, quantized=True)

    def apply(self, model, ctx: StageContext) -> StageRecord:
        from compress.gguf.calibration import window_texts
        from compress.gguf.export import export_gguf  # its refusals (check_exportable) come before any work

        start = time.perf_counter()
        # in the run folder when it has one (the float model and the GGUF then move into the checkpoint by
        # rename in save(), not a second write), else a temporary folder
        if ctx.work_folder is not None:
            Path(ctx.work_folder).mkdir(parents=True, exist_ok=True)
            for stale in Path(ctx.work_folder).glob("compress-gguf-*"):  # a killed try's files (GBs on big models)
                shutil.rmtree(stale, ignore_errors=True)
        self._work = Path(tempfile.mkdtemp(prefix="compress-gguf-", dir=ctx.work_folder))
        try:
            source = self._work / "source"
            model.save_pretrained(source)
            ctx.tokenizer.save_pretrained(source)
            texts = window_texts(ctx.tokenizer, ctx.calibration) if self.config.imatrix else None
            seq_len = int(ctx.calibration[0]["input_ids"].shape[1]) if texts else 512
            info = {"data": "the recipe's calibration windows, decoded to text", "windows": len(texts)} if texts else None
            done = export_gguf(source, self.config.quant, self._work / gguf_name(self.config.quant),
                               imatrix_text=texts, imatrix_info=info, imatrix_ctx=seq_len)
        except BaseException:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
            raise
        rec = done.record
        summary = f"GGUF {self.config.quant} by llama.cpp" + (" with an importance matrix" if rec["imatrix"] else "")
        return StageRecord(stage=self.name, summary=summary,
                           details={"file": gguf_name(self.config.quant), "quant": self.config.quant,
                                    "gguf_bytes": done.bytes, "imatrix": rec["imatrix"], "tools": rec["tools"]},
                           wall_s=time.perf_counter() - start)

    def save(self, model, folder: Path) -> None:
        """The float model the converter read (its files, moved: the same weights as ``model``), the GGUF file
        and its sidecar (source: this folder)."""
        from compress.gguf.export import sidecar

        assert self._work is not None, "gguf.save runs right after apply"
        for f in (self._work / "source").iterdir():
            shutil.move(str(f), folder / f.name)
        name = gguf_name(self.config.quant)
        shutil.move(str(self._work / name), folder / name)
        record = json.loads(sidecar(self._work / name).read_text())
        record["source"]["folder"] = "."  # relative to the GGUF file: the float model beside it
        sidecar(folder / name).write_text(json.dumps(record, indent=2))
        shutil.rmtree(self._work, ignore_errors=True)
        self._work = None

    def measure(self, pipeline, step: str, folder: Path, model, tokenizer) -> dict[str, Any]:
        """The row, from llama.cpp on the GGUF file: its size, and if the recipe evaluates this step, perplexity
        on the same windows as the HF rows (with KL / top-1 against the baseline store), prefill and decode
        speed. MMLU and lm-eval tasks are not run on a GGUF (noted in the row)."""
        from compress.evaluate.suite import size_metrics
        from compress.gguf import evaluate as gguf_eval

        start = time.perf_counter()
        path = folder / gguf_name(self.config.quant)
        size = size_metrics(model)
        gguf_bytes = path.stat().st_size
        metrics: dict[str, Any] = {"layers": size["layers"], "params": size["params"], "weight_bytes": gguf_bytes,
                                   "bits_per_param": 8 * gguf_bytes / size["params"], "engine": "llama.cpp",
                                   "gguf_quant": self.config.quant}
        ev = pipeline.recipe.evaluate
        if ev.perplexity is not None and pipeline.should_evaluate(step):
            observer = pipeline.fidelity_observer(step, model, tokenizer)
            ppl = ev.perplexity
            metrics.update(gguf_eval.gguf_perplexity(path, pipeline.eval_tokens(tokenizer), ppl.seq_len, ppl.stride,
                                                     tokenizer.bos_token_id if ppl.bos_per_window else None,
                                                     observe=observer))
            metrics["ppl_data"] = "llama.cpp on the same windows"
            if observer is not None:
                metrics.update({**observer.metrics(), "fidelity_top_k": ev.fidelity.top_k})
            crash_point("evaluation")  # as the HF rows': a perplexity evaluation finished, not yet stored
        if ev.efficiency is not None and pipeline.should_evaluate(step):
            metrics.update(gguf_eval.gguf_speed(path, ev.efficiency.prompt_tokens, ev.efficiency.new_tokens,
                                                ev.efficiency.repeats))
        if (ev.mmlu is not None or ev.tasks is not None) and pipeline.should_evaluate(step):
            metrics["tasks_skipped"] = "MMLU / lm-eval tasks are not run on a GGUF file"
        metrics["eval_wall_s"] = time.perf_counter() - start
        return metrics

    @staticmethod
    def load(folder: Path, device):
        """On resume: the float model beside the GGUF (what the converter read)."""
        from compress.model_io import load_model

        model, _ = load_model(str(folder), dtype="auto", device=device)
        return model

    def replay(self, model, record: dict[str, Any]) -> None:
        raise AssertionError("gguf is not replayable: the pipeline reloads its checkpoint")

"""Run a recipe: load, evaluate the baseline, then each stage -> evaluate -> save, and report.

Everything a run produces lives in the recipe's ``output`` folder::

    run.json                 which recipe (fingerprint) and input model (identity) it belongs to
    state/NN-<step>.json     one file per finished step: what a resumed run skips
    checkpoints/<stage>/     loadable checkpoints (written atomically)
    report.json, report.md, plots/*.png

Re-running the same recipe on the same model files resumes: finished stages are replayed from their
records (layer removal: the recorded indices, no re-scoring), finished evaluations and checkpoints are
reused. Which folders a run may write and replace: compress.run_folder.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress import __version__
from compress.data.calibration import calibration_data, calibration_description
from compress.data.sources import CalibrationConfig
from compress.data.tokens import bos_token_id, require_chat_template
from compress.errors import CompressError
from compress.faults import crash_point
from compress.evaluate.fidelity import BaselineStore, FidelityKey, FidelityMeter, StoreWriter, evaluation_fingerprint
from compress.evaluate.memory import disk_bytes
from compress.evaluate.perplexity import make_windows
from compress.evaluate.suite import (efficiency_metrics, mmlu_metrics, mmlu_questions, perplexity_description,
                                     perplexity_metrics, perplexity_tokens, size_metrics)
from compress.evaluate.tasks import run_tasks, task_manager
from compress.model_io import (PROVENANCE, check_fits, check_fits_anywhere, load_model, model_facts, read_config, replace_dir,
                               resolve_device, resolve_dtype, save_checkpoint, source_info, write_atomic)
from compress.recipe import LAYERWISE_TASKS, Recipe, calibration_sets, check_against_model, load_recipe
from compress.report import write_report
from compress.run_folder import choose_work_folder, hold_run_lock, model_identity, start_run_folder
from compress.stages import STAGES
from compress.stages.base import StageContext
from compress.work_cache import WorkCache, file_stamp

log = logging.getLogger("compress")
STORE_FOLDER = "state/baseline-logits"  # the baseline's top-k log-probs on the perplexity text


def finish_fidelity(observer, top_k: int) -> dict[str, Any]:
    """Commit the store (baseline) and return the fidelity metrics of the pass just made."""
    if isinstance(observer, FidelityMeter):
        return {**observer.metrics(), "fidelity_top_k": top_k}
    observer.commit()  # the baseline's StoreWriter
    store = BaselineStore.open(observer.folder)
    log.info("baseline-logits store: %d positions x top-%d, %.1f MiB at %s", store.meta["positions"],
             top_k, store.nbytes() / 2**20, observer.folder)
    return {**observer.meter.metrics(), "fidelity_top_k": top_k, "fidelity_store_bytes": store.nbytes()}


def data_descriptions(recipe: Recipe) -> dict[str, str]:
    """Recipe key -> what the text and windows are (``wikitext/wikitext-2-raw-v1:test; ...``), for
    report.json: the source itself, whatever ``label`` the recipe gave it."""
    found = {key: calibration_description(cal) for key, cal in calibration_sets(recipe)}
    if recipe.evaluate.perplexity is not None:
        found["evaluate.perplexity"] = perplexity_description(recipe.evaluate.perplexity)
    return found


def check_tokenizer(recipe: Recipe, tokenizer) -> None:
    """Before any evaluation or stage: the tokenizer has the BOS / chat template the recipe's
    ``bos_per_window`` / ``chat_template`` need (CompressError naming the key otherwise)."""
    for key, cal in calibration_sets(recipe):
        if cal.bos_per_window:
            bos_token_id(tokenizer, key)
        if cal.chat_template:
            require_chat_template(tokenizer, key)
    if recipe.evaluate.perplexity is not None and recipe.evaluate.perplexity.bos_per_window:
        bos_token_id(tokenizer, "evaluate.perplexity")


def _data_files(source) -> list[Any]:
    """Size and mtime of a data source's local files (a changed file must not reuse cached work)."""
    found = [file_stamp(getattr(source, "path", None))]
    found += [file_stamp(f) for f in (getattr(source, "data_files", None) or [])]
    return [f for f in found if f]


def _versions() -> dict[str, str]:
    import transformers

    return {"compress": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def prepare_output(recipe: Recipe, overwrite: bool, identity: dict[str, Any]) -> Path:
    """The folder this run writes to (see compress.run_folder); the caller holds the run lock."""
    work = choose_work_folder(recipe.output, recipe.fingerprint(), identity, overwrite)
    start_run_folder(work, recipe.fingerprint(), recipe.path, identity)
    return work


@dataclass
class RunState:
    """What the run knows so far: one entry per step, in order."""

    folder: Path
    steps: list[dict[str, Any]] = field(default_factory=list)

    def path(self, index: int, name: str) -> Path:
        return self.folder / "state" / f"{index:02d}-{name}.json"

    def load(self, index: int, name: str) -> dict[str, Any] | None:
        p = self.path(index, name)
        return json.loads(p.read_text()) if p.exists() else None

    def store(self, index: int, name: str, entry: dict[str, Any]) -> None:
        write_atomic(self.path(index, name), json.dumps(entry, indent=2, default=str))

    def load_named(self, name: str) -> Any:
        """A run-level record (``state/<name>.json``), e.g. the serving checks; None if not written."""
        p = self.folder / "state" / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def store_named(self, name: str, value: Any) -> None:
        write_atomic(self.folder / "state" / f"{name}.json", json.dumps(value, indent=2, default=str))


class Pipeline:
    """One recipe run. ``run()`` returns the report dict."""

    def __init__(self, recipe: Recipe, overwrite: bool = False, progress: bool = True,
                 cache_folder: Path | None = None) -> None:
        """``cache_folder``: where a sweep keeps work shared between its runs (compress.work_cache:
        tokenized data, layer scores), or None (``compress run``: nothing shared)."""
        self.recipe, self.progress = recipe, progress
        self.config = read_config(recipe.model, recipe.revision, recipe.trust_remote_code)
        self.facts = model_facts(self.config)
        check_against_model(recipe, self.facts)
        self.device = resolve_device(recipe.device)
        self.dtype = resolve_dtype(recipe.dtype, self.config)
        self.layerwise = self.choose_layerwise()
        if self.layerwise and recipe.evaluate.tasks is not None:
            raise CompressError(f"{recipe.path}: evaluate.tasks: the weights do not fit {self.device}, so this "
                                f"would be a layer-wise run, and {LAYERWISE_TASKS}. Drop evaluate.tasks, use "
                                "`device_map: auto` (lm-eval runs accelerate-dispatched models), or run "
                                "`compress eval --tasks` on a saved checkpoint where it fits")
        # checks the task names (and builds lm-eval's task index) before any weights load
        self._tasks = task_manager(recipe.evaluate.tasks) if recipe.evaluate.tasks is not None else None
        if self.layerwise and any(getattr(STAGES[s.kind], "needs_teacher", False) for s in recipe.stages):
            raise CompressError(f"{recipe.path}: stages: heal trains the whole model, but the weights do not fit "
                                f"{self.device} (a layer-wise run); use `device_map: auto` or a larger device")
        self.source = source_info(recipe.model, recipe.model_is_local, recipe.revision, self.config)
        self.folder = prepare_output(recipe, overwrite, model_identity(self.source))
        self.final_folder = recipe.output
        self.state = RunState(self.folder)
        self._calibration: dict[str, list[dict[str, torch.Tensor]]] = {}
        self._eval_tokens: torch.Tensor | None = None
        self._mmlu = None
        self._teachers: dict[str, Any] = {}
        self.cache = None if cache_folder is None else WorkCache(Path(cache_folder), {
            "model": model_identity(self.source), "dtype": str(self.dtype), "device": str(self.device),
            "layerwise": self.layerwise})

    def choose_layerwise(self) -> bool:
        """Keep the weights in CPU memory and run layer by layer on the device? Yes if the recipe
        says so, or (auto) if they do not fit the device but fit the CPU memory."""
        recipe = self.recipe
        if recipe.device_map is not None:
            check_fits_anywhere(self.config, self.dtype, recipe.max_memory)
            return False
        if recipe.layerwise is True:
            check_fits(self.config, self.dtype, torch.device("cpu"))
            return True
        try:
            check_fits(self.config, self.dtype, self.device)
            return False
        except CompressError as too_big:
            if recipe.layerwise is False or self.device.type == "cpu":
                raise
            check_fits(self.config, self.dtype, torch.device("cpu"))
            log.warning("%s; weights stay in CPU memory and every pass runs one layer at a time on %s",
                        str(too_big).split(";")[0], self.device)
            return True

    # -- data ------------------------------------------------------------------------------
    def calibration(self, tokenizer, cal: CalibrationConfig | None = None,
                    key: str = "calibration") -> list[dict[str, torch.Tensor]]:
        """Calibration windows of the recipe (or of a stage's own ``calibration``, recipe key
        ``key``), built once each."""
        cal = cal or self.recipe.calibration
        cache_key = cal.model_dump_json()
        if cache_key not in self._calibration:
            make = lambda: calibration_data(tokenizer, cal, key)  # noqa: E731
            self._calibration[cache_key] = make() if self.cache is None else self.cache.tensors(
                "calibration", {"config": cal.model_dump(mode="json"), "files": _data_files(cal)}, make)
            log.info("calibration: %s", calibration_description(cal))
        return self._calibration[cache_key]

    # -- steps -----------------------------------------------------------------------------
    def measure(self, step: str, model, tokenizer) -> dict[str, Any]:
        """Size metrics always; the recipe's evaluations if it asks for them after ``step``."""
        start = time.perf_counter()
        metrics = size_metrics(model)
        evaluate = self.recipe.evaluate
        if evaluate.perplexity is not None and self.should_evaluate(step):
            observer = self.fidelity_observer(step, model, tokenizer)
            metrics.update(perplexity_metrics(model, self.eval_tokens(tokenizer), evaluate.perplexity,
                                              self.device, self.progress, layerwise=self.layerwise,
                                              observe=observer, bos=tokenizer.bos_token_id))
            if observer is not None:
                metrics.update(finish_fidelity(observer, evaluate.fidelity.top_k))
            crash_point("evaluation")
        if evaluate.mmlu is not None and self.should_evaluate(step):
            if self._mmlu is None:
                self._mmlu = mmlu_questions(evaluate.mmlu)
            metrics.update(mmlu_metrics(model, tokenizer, self._mmlu, evaluate.mmlu, self.progress))
        if evaluate.tasks is not None and self.should_evaluate(step):
            metrics.update(run_tasks(model, tokenizer, evaluate.tasks, self._tasks, self.progress))
        if evaluate.efficiency is not None and self.should_evaluate(step):
            if self.layerwise:  # latency of a model streamed layer by layer says nothing
                metrics["latency_skipped"] = "weights in CPU memory (layer-wise run); use `compress eval` where it fits"
            else:
                metrics.update(efficiency_metrics(model, evaluate.efficiency))
        metrics["eval_wall_s"] = time.perf_counter() - start
        return metrics

    def eval_tokens(self, tokenizer) -> torch.Tensor:
        if self._eval_tokens is None:
            ppl = self.recipe.evaluate.perplexity
            make = lambda: perplexity_tokens(tokenizer, ppl)  # noqa: E731
            self._eval_tokens = make() if self.cache is None else self.cache.tensors(
                "eval_tokens", {"config": ppl.model_dump(mode="json"), "files": _data_files(ppl)}, make)
        return self._eval_tokens

    def fidelity_observer(self, step: str, model, tokenizer):
        """Baseline: a writer of the baseline-logits store; later steps: a meter reading it."""
        evaluate = self.recipe.evaluate
        if evaluate.fidelity is None:
            return None
        ppl = evaluate.perplexity
        tokens = self.eval_tokens(tokenizer)
        bos = ppl.bos_per_window
        windows = make_windows(tokens.numel(), ppl.seq_len, ppl.stride or ppl.seq_len - bos, bos)
        key = FidelityKey(evaluate.fidelity.top_k, sum(w.end - w.target_from for w in windows),
                          evaluation_fingerprint(tokens, ppl.seq_len, ppl.stride, ppl.batch_size, bos))
        folder = self.folder / STORE_FOLDER
        if step == "baseline":
            vocab = model.get_output_embeddings().weight.shape[0]
            return StoreWriter(folder, key, vocab)
        store = BaselineStore.open(folder)
        if not store.matches(key):
            raise CompressError(f"{folder}: built for other evaluation settings ({store.meta}); delete "
                                "it and the state/00-baseline.json beside it, then run again")
        return FidelityMeter(store)

    def should_evaluate(self, name: str) -> bool:
        after = self.recipe.evaluate.after
        return name in after or (name != "baseline" and "every_stage" in after)

    def provenance(self, stage_name: str, records: list[dict[str, Any]], kept: list[int]) -> dict[str, Any]:
        original = (self.source.get("compress") or {}).get("original_num_layers", self.facts.num_layers)
        all_ids = list(range(original))
        return {
            "format": 1, "created_by": f"compress {__version__}", "stage": stage_name,
            "recipe": self.recipe.raw, "recipe_path": str(self.recipe.path),
            "recipe_fingerprint": self.recipe.fingerprint(), "source": self.source,
            "original_num_layers": original, "kept_layers": kept,
            "removed_layers": [i for i in all_ids if i not in kept],
            "stages": records, "versions": _versions(),
        }

    def run(self) -> dict[str, Any]:
        recipe = self.recipe
        home = torch.device("cpu") if self.layerwise else self.device
        model, tokenizer = load_model(recipe.model, dtype=self.dtype, device=home,
                                      revision=recipe.revision, trust_remote_code=recipe.trust_remote_code,
                                      device_map=recipe.device_map, allow_pickle=recipe.allow_pickle_weights,
                                      max_memory=recipe.max_memory)
        log.info("model %s: %s, %d layers, %s on %s%s", recipe.model, self.facts.model_type,
                 self.facts.num_layers, str(self.dtype).removeprefix("torch."), self.device,
                 " (layer by layer, weights in CPU memory)" if self.layerwise else "")
        check_tokenizer(recipe, tokenizer)
        rows, records = [self._baseline(model, tokenizer)], []
        layer_ids = self.input_layer_ids()
        self._teachers = self.teacher_stores(model, tokenizer)
        for index, spec in enumerate(recipe.stages, start=1):
            row, record, model = self._stage(index, spec, model, tokenizer, layer_ids, records)
            rows.append(row)
            records.append(record)
            write_report(self.folder, self._report(rows))
        self._verify()
        report = self._report(rows)
        write_report(self.folder, report)
        if self.folder != self.final_folder:
            replace_dir(self.folder, self.final_folder)
        return report

    def original_num_layers(self) -> int:
        return (self.source.get("compress") or {}).get("original_num_layers", self.facts.num_layers)

    def input_layer_ids(self) -> list[int]:
        """Original indices of the input's layers: 0..L-1, or those a compress checkpoint kept."""
        prior = self.source.get("compress") or {}
        kept = prior.get("kept_layers")
        if kept and len(kept) == self.facts.num_layers:
            return list(kept)
        return list(range(self.facts.num_layers))

    def teacher_stores(self, model, tokenizer) -> dict[str, Any]:
        """Stage name -> the teacher's store on its windows, for every heal stage not yet done: the
        model as loaded (before the first stage changes weights) computes them once, into
        state/teacher-<stage>/ (kept: a resumed run reuses a complete one)."""
        from compress.heal.teacher import build_teacher_store, windows_of

        stores = {}
        for index, spec in enumerate(self.recipe.stages, start=1):
            stage = STAGES[spec.kind]
            if not getattr(stage, "needs_teacher", False) or self.state.load(index, spec.name) is not None:
                continue
            own = spec.config.calibration
            key = f"stages[{index - 1}].{spec.kind}.calibration" if own else "calibration"
            windows = windows_of(self.calibration(tokenizer, own, key))
            folder = self.folder / "state" / f"teacher-{spec.name}"
            log.info("%s: teacher top-%d log-probs on %d windows -> %s", spec.name, spec.config.top_k,
                     windows.shape[0], folder)
            stores[spec.name] = build_teacher_store(model, windows, folder, spec.config.top_k, self.device,
                                                    spec.config.batch_size, self.progress)
        return stores

    def _baseline(self, model, tokenizer) -> dict[str, Any]:
        entry = self.state.load(0, "baseline")
        if entry is not None and self.recipe.evaluate.fidelity is not None \
                and not (self.folder / STORE_FOLDER / "meta.json").exists():
            log.info("resume: the baseline-logits store is missing; evaluating the baseline again")
            entry = None
        if entry is None:
            entry = {"step": "baseline", "metrics": self.measure("baseline", model, tokenizer)}
            self.state.store(0, "baseline", entry)
        else:
            log.info("resume: baseline evaluation already done")
        return {"step": "baseline", **entry["metrics"]}

    def _stage(self, index, spec, model, tokenizer, layer_ids, records):
        """Apply (or on resume, replay / reload) one stage, evaluate, save. -> (row, record, model)"""
        stage = STAGES[spec.kind](spec.config)
        replayable = getattr(stage, "replayable", True)
        entry = self.state.load(index, spec.name)
        if entry is None:
            log.info("stage %d/%d: %s", index, len(self.recipe.stages), spec.name)
            own = getattr(spec.config, "calibration", None)
            own = own if isinstance(own, CalibrationConfig) else None
            key = f"stages[{index - 1}].{spec.kind}.calibration" if own else "calibration"
            cal = self.calibration(tokenizer, own, key) if stage.needs_calibration else []
            ctx = StageContext(calibration=cal,
                               tokenizer=tokenizer, device=self.device,
                               original_layer_ids=list(layer_ids), log=log, progress=self.progress,
                               teacher=self._teachers.get(spec.name),
                               cache=None if self.cache is None else self.cache.scoped(
                                   layers=list(layer_ids), before=[[s.kind, s.config.model_dump(mode="json")]
                                                                   for s in self.recipe.stages[:index - 1]]),
                               work_folder=self.folder / "state" / f"{index:02d}-{spec.name}.work",
                               original_num_layers=self.original_num_layers())
            record = stage.apply(model, ctx)
            model = record.new_model if record.new_model is not None else model
            crash_point("stage")
            entry = {"step": spec.name, "kind": spec.kind, "record": record.to_json()}
            if stage.needs_calibration:  # what the windows were, whatever the recipe labelled them
                entry["record"]["calibration_data"] = calibration_description(own or self.recipe.calibration)
            if not replayable:  # its checkpoint is the resume point: write it before the record
                self._save(index, spec.name, stage, model, tokenizer,
                           [*records, {"name": spec.name, **entry["record"]}],
                           self._kept_after(layer_ids, entry), entry, store=False)
            self.state.store(index, spec.name, entry)
        elif replayable:
            log.info("resume: stage %s already done; replaying its record", spec.name)
            stage.replay(model, entry["record"]["replay"])
        else:
            log.info("resume: stage %s already done; loading its checkpoint", spec.name)
            model = self._load_stage_output(stage, self.folder / entry["checkpoint"])
        layer_ids[:] = self._kept_after(layer_ids, entry)
        if "metrics" not in entry:
            own = getattr(stage, "measure", None)  # gguf: measured by llama.cpp on its file
            entry["metrics"] = (own(self, spec.name, self.folder / entry["checkpoint"], model, tokenizer) if own
                                else self.measure(spec.name, model, tokenizer))
            self.state.store(index, spec.name, entry)
        record = {"name": spec.name, **entry["record"]}
        if spec.name in self.recipe.save:
            self._save(index, spec.name, stage, model, tokenizer, [*records, record], layer_ids, entry)
        row = {"step": spec.name, "summary": entry["record"]["summary"],
               "stage_wall_s": entry["record"]["wall_s"], **entry["metrics"]}
        if "checkpoint" in entry:
            row["checkpoint"], row["disk_bytes"] = entry["checkpoint"], entry["disk_bytes"]
        return row, record, model

    def _verify(self) -> None:
        """The recipe's ``verify:`` engines on every saved checkpoint, once (kept in state for a resume)."""
        if not self.recipe.verify:
            return
        if self.state.load_named("verify") is not None:
            log.info("resume: serving checks already done")
            return
        from compress.verify.verify import verify_saved

        self.state.store_named("verify", verify_saved(self.folder, self.recipe.save, self.recipe.verify))

    @staticmethod
    def _kept_after(layer_ids: list[int], entry) -> list[int]:
        removed = set(entry["record"]["removed_layers"])
        return [orig for i, orig in enumerate(layer_ids) if i not in removed]

    def _load_stage_output(self, stage, folder: Path):
        if hasattr(stage, "load"):
            return stage.load(folder, self.device)
        model, _ = load_model(str(folder), dtype=self.dtype, device=self.device)
        return model

    def _save(self, index, name, stage, model, tokenizer, records, layer_ids, entry, store=True) -> None:
        final = self.folder / "checkpoints" / name
        if "checkpoint" in entry and final.exists():
            log.info("resume: checkpoint %s already written", final)
            return
        save_checkpoint(model, tokenizer, final, self.provenance(name, records, list(layer_ids)),
                        saver=getattr(stage, "save", None))
        entry["checkpoint"] = str(final.relative_to(self.folder))
        entry["disk_bytes"] = disk_bytes(final)
        if store:
            self.state.store(index, name, entry)

    def _report(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        stages = []
        for i, spec in enumerate(self.recipe.stages, start=1):
            entry = self.state.load(i, spec.name)
            if entry:
                stages.append({"name": spec.name, **entry["record"]})
        total = len(self.recipe.stages) + 1
        return {
            "complete": len(rows) == total, "steps_done": len(rows), "steps_total": total,
            "recipe": str(self.recipe.path), "output": str(self.final_folder),
            "model": self.recipe.model, "source": self.source,
            "trust_remote_code": self.recipe.trust_remote_code,
            "data": data_descriptions(self.recipe),
            "paths": {"calibration": self.recipe.calibration.path if self.recipe.calibration else None,
                      "perplexity": (self.recipe.evaluate.perplexity.path
                                     if self.recipe.evaluate.perplexity else None)},
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "layerwise": self.layerwise,
            "rows": rows, "stages": stages, "versions": _versions(),
            "verify": self.state.load_named("verify"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        }


def run_recipe(path: str | Path, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Validate the recipe, run it, and return the report (also written to the output folder)."""
    recipe = load_recipe(path)
    with hold_run_lock(recipe.output):
        pipeline = Pipeline(recipe, overwrite=overwrite, progress=progress)
        try:
            return pipeline.run()
        except torch.OutOfMemoryError as e:
            raise CompressError(
                f"out of memory on {pipeline.device}: {str(e).splitlines()[0]}. Finished steps are kept: "
                "lower batch_size / seq_len / samples, or set `device_map: auto`, then run again to resume"
            ) from None


__all__ = ["run_recipe", "Pipeline", "PROVENANCE"]

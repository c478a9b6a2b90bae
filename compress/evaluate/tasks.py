"""lm-evaluation-harness tasks (arc_easy, hellaswag, your own YAML ...) on the in-memory model.

lm-eval's own task code runs: its ``TaskManager`` finds the task (built in, or a YAML file under
``include_path``), its ``simple_evaluate`` builds the prompts and scores them, through its Hugging
Face wrapper ``HFLM(pretrained=<the model>, tokenizer=...)`` around the model as it is in memory
(pruned, GPTQ or bnb4; no save and reload). The numbers are lm-eval's, exactly (tests pin it).

lm-eval is imported only when tasks are asked for (``pip install -e ".[tasks]"``); what it logs
and warns is kept out of our log; its progress bars stay. Each task's numeric metrics land in the
row as ``tasks.<task>.<metric>`` (``acc``, ``acc_stderr``, ``acc_norm``, ``acc_norm_stderr`` for
multiple-choice tasks; a filter other than ``none`` is kept as ``<metric>/<filter>``), with
``tasks.<task>.samples`` (documents scored) and ``tasks.<task>.num_fewshot``.

Sample yaml::

    evaluate:
      tasks: {names: [arc_easy, hellaswag], num_fewshot: 0, limit: 500, batch_size: 8}
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from compress.errors import CompressError
from compress.limits import MAX_COUNT, MAX_LIMIT
from compress.quiet import quiet_backends, quiet_import

log = logging.getLogger("compress")
INSTALL = 'lm-eval tasks need lm-evaluation-harness: pip install -e ".[tasks]" (lm-eval==0.4.13)'
FIND_NAMES = ("`lm-eval ls tasks` lists the built-in names; your own task YAML files go in a folder "
              "given as evaluate.tasks.include_path (compress eval --include-path)")
PREFIX = "tasks."
_COUNTS = ("samples", "num_fewshot")


class TasksConfig(BaseModel):
    """lm-eval tasks by name; ``num_fewshot`` None keeps each task's own default (lm-eval's rule:
    a task whose YAML says ``num_fewshot: 0`` stays zero-shot); ``limit``: documents per task;
    ``include_path``: a folder of your own task YAML files (relative to the recipe)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    names: list[str] = Field(min_length=1)
    num_fewshot: int | None = Field(None, ge=0, le=1000)
    limit: int | None = Field(None, ge=1, le=MAX_LIMIT)
    batch_size: int = Field(8, ge=1, le=MAX_COUNT)
    include_path: str | None = None

    @field_validator("names")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        bad = [n for n in names if not n.strip() or "," in n]
        if bad:
            raise ValueError(f"task names are non-empty and have no commas, got {bad}")
        if len(set(names)) != len(names):
            raise ValueError(f"a task is named twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
        return names


def _lm_eval():
    """lm_eval's modules, imported quietly; CompressError with the install line if it is absent."""
    try:
        with quiet_backends():
            return (quiet_import("lm_eval"), quiet_import("lm_eval.models.huggingface"),
                    quiet_import("lm_eval.tasks"))
    except ImportError as e:
        raise CompressError(f"{INSTALL} ({e})") from None


def task_manager(cfg: TasksConfig, key: str = "evaluate.tasks.names"):
    """lm-eval's TaskManager (its built-in tasks plus ``include_path``), with every name checked:
    CompressError (under ``key``) naming the unknown ones, close matches, and how to list valid names."""
    _, _, tasks_mod = _lm_eval()
    with quiet_backends():
        if cfg.include_path is not None:  # indexing lm-eval's ~15,000 built-in names takes seconds
            local = tasks_mod.TaskManager(include_path=cfg.include_path, include_defaults=False)
            if all(_plain_task(local, n) for n in cfg.names):
                return local
        manager = tasks_mod.TaskManager(include_path=cfg.include_path)
    known = set(manager.all_tasks)
    unknown = [n for n in cfg.names if n not in known]
    if unknown:
        hints = [f"{n!r} (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(n, known, 3))
                 else repr(n) for n in unknown]
        where = f" or in {cfg.include_path}" if cfg.include_path else ""
        raise CompressError(f"{key}: unknown lm-eval task(s) {', '.join(hints)}: not among "
                            f"lm-eval {_version()}'s tasks{where}. {FIND_NAMES}"
                            + (" (lm-eval skips a YAML file it cannot parse)" if cfg.include_path else ""))
    return manager


def _plain_task(manager, name: str) -> bool:
    """A task (not a group or tag, which may name built-in tasks) that ``manager`` indexes."""
    entry = manager.task_index.get(name)
    return entry is not None and entry.kind.name in ("TASK", "PY_TASK")


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


@contextlib.contextmanager
def _kept_rng() -> Iterator[None]:
    """lm-eval seeds Python's, numpy's and torch's global generators; put them back after."""
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _wrapper(model, tokenizer, batch_size: int, progress: bool):
    """lm-eval's HFLM around the model; a copy of the tokenizer (HFLM may set its pad token)."""
    _, hf, _ = _lm_eval()
    cls = hf.HFLM
    if not progress:
        class Quiet(hf.HFLM):  # HFLM's request loops take disable_tqdm; the evaluator never sets it
            def loglikelihood(self, requests, disable_tqdm=False):
                return super().loglikelihood(requests, disable_tqdm=True)

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                return super().loglikelihood_rolling(requests, disable_tqdm=True)

            def generate_until(self, requests, disable_tqdm=False):
                return super().generate_until(requests, disable_tqdm=True)
        cls = Quiet
    return cls(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)


def _metrics(entry: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "alias": ...}`` -> ``{"acc": 0.5}`` (numbers only; a filter
    other than ``none`` kept as ``metric/filter``; "N/A" stderr of a single document dropped)."""
    out = {}
    for key, value in entry.items():
        metric, _, filt = key.partition(",")
        if filt and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
    return out


def reported_tasks(results: dict[str, Any], names: list[str]) -> list[str]:
    """Which of lm-eval's result entries the row gets: each name asked for (a group with its own
    aggregate as itself, one without as its subtasks), then the tasks a tag expanded to."""
    per_task, groups = results["results"], results.get("group_subtasks", {})

    def expand(name: str) -> list[str]:
        if name in groups and not _metrics(per_task.get(name, {})):
            return [t for child in groups[name] for t in expand(child)]
        return [name] if name in per_task else []

    def below(name: str) -> set[str]:
        return {d for child in groups.get(name, []) for d in (child, *below(child))}

    chosen = list(dict.fromkeys(t for n in names for t in expand(n)))
    inside = {d for n in names for d in below(n)}
    return chosen + [t for t in per_task if t not in names and t not in inside and t not in chosen]


def task_rows(results: dict[str, Any], names: list[str]) -> dict[str, dict[str, float]]:
    """Per reported task (``reported_tasks``): its metrics, documents scored and shots."""
    out = {}
    for task in reported_tasks(results, names):
        metrics = _metrics(results["results"][task])
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        if samples is not None:
            metrics["samples"] = int(samples)
        shots = results.get("n-shot", {}).get(task)
        if isinstance(shots, int):
            metrics["num_fewshot"] = shots
        out[task] = metrics
    return out


def run_tasks(model, tokenizer, cfg: TasksConfig, manager, progress: bool = True) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on the model as it is: the flat row metrics (see the module
    docstring). ``manager``: from ``task_manager(cfg)``."""
    lm_eval, _, _ = _lm_eval()
    device = next(model.parameters()).device
    log.info("lm-eval %s: %s on %s (batch %d, %s-shot, limit %s)", _version(), ", ".join(cfg.names), device,
             cfg.batch_size, "task default" if cfg.num_fewshot is None else cfg.num_fewshot, cfg.limit)
    was_training = model.training
    try:
        with quiet_backends(), _kept_rng(), contextlib.redirect_stdout(sys.stderr):
            lm = _wrapper(model, tokenizer, cfg.batch_size, progress)
            results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.names), num_fewshot=cfg.num_fewshot,
                                              limit=cfg.limit, task_manager=manager, log_samples=False)
    finally:
        model.train(was_training)
    row: dict[str, Any] = {}
    for task, metrics in task_rows(results, cfg.names).items():
        log.info("lm-eval %s: %s", task, _summary(metrics))
        row.update({f"{PREFIX}{task}.{k}": v for k, v in metrics.items()})
    return row


def _summary(metrics: dict[str, float]) -> str:
    parts = [f"{k} {v:.4f}" + (f" ± {metrics[k + '_stderr']:.4f}" if k + "_stderr" in metrics else "")
             for k, v in metrics.items() if k not in _COUNTS and "_stderr" not in k]
    return ", ".join(parts) + f" ({metrics.get('samples', '?')} documents, {metrics.get('num_fewshot', '?')}-shot)"


def metric_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(row key, header) of every task metric the rows have, in first-seen order; stderr, deltas
    and the counts are not columns (the stderr shows in its metric's cell)."""
    seen: dict[str, str] = {}
    for row in rows:
        for key in row:
            if key.startswith(PREFIX) and key not in seen and not key.endswith("_delta_pct"):
                task, _, metric = key[len(PREFIX):].rpartition(".")
                if task and metric not in _COUNTS and "_stderr" not in metric:
                    seen[key] = f"{task} {metric}"
    return list(seen.items())


def stderr_key(key: str) -> str:
    """``tasks.arc_easy.acc`` -> ``tasks.arc_easy.acc_stderr`` (also for ``metric/filter``)."""
    head, _, metric = key.rpartition(".")
    name, slash, filt = metric.partition("/")
    return f"{head}.{name}_stderr{slash}{filt}"


LOWER_IS_BETTER = ("perplexity", "bits_per_byte")  # lm-eval's word_/byte_perplexity, bits_per_byte


def higher_is_better(key: str) -> bool:
    return not any(word in key.rpartition(".")[2] for word in LOWER_IS_BETTER)

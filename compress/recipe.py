"""Recipe: the YAML file a user writes, validated completely before any model is loaded.

``load_recipe(path)`` returns a typed ``Recipe`` or raises ``CompressError`` with one message that
names the file and lists *every* problem as ``key.path: what is wrong (what is allowed)``.
Strings may use ``${VAR}`` / ``${VAR:-default}``; relative paths are resolved against the recipe's
folder. Checks that need the model's shape (``check_against_model``) read only its config.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compress.data.pg19 import BUILDERS
from compress.data.sources import CalibrationConfig, TextSource
from compress.errors import CompressError
from compress.evaluate.suite import EfficiencyConfig, FidelityConfig, MMLUConfig, PerplexityConfig
from compress.evaluate.tasks import TasksConfig
import compress.model_io as model_io
from compress.model_checks import memory_problem, positions_problem
from compress.model_io import local_model_dir, parse_size
from compress.recipe_text import expand, read_yaml
from compress.run_folder import output_conflicts
from compress.stages import STAGES, UNAVAILABLE
from compress.stages.base import ModelFacts, StageConfig, facts_after_stage

log = logging.getLogger("compress")
DTYPES = ("auto", "float32", "float16", "bfloat16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvaluateConfig(_Strict):
    after: list[str] = ["baseline", "every_stage"]
    perplexity: PerplexityConfig | None = None
    mmlu: MMLUConfig | None = None
    efficiency: EfficiencyConfig | None = None
    fidelity: FidelityConfig | None = None  # KL / top-1 agreement vs the baseline, on the perplexity text
    tasks: TasksConfig | None = None  # lm-eval tasks (arc_easy, hellaswag, your own YAML) via lm-eval's HFLM


class _Top(_Strict):
    model: str
    revision: str | None = None
    dtype: Literal[DTYPES] = "auto"  # type: ignore[valid-type]
    device: str = "auto"
    device_map: str | dict[str, str | int] | None = None  # accelerate's: module -> device (multi-GPU, offload)
    max_memory: dict[str | int, str | int] | None = None  # e.g. {0: 70GiB, cpu: 200GiB}
    layerwise: Literal["auto", True, False] = "auto"  # keep weights in CPU memory, run layer by layer
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False  # read .bin weights (torch.load weights_only=True)
    output: str
    calibration: CalibrationConfig | None = None
    evaluate: EvaluateConfig = EvaluateConfig()
    stages: list[Any] = Field(min_length=1)
    save: list[str] | None = None
    verify: list[Literal["vllm", "transformers"]] = []  # serving engines that must load every saved checkpoint


@dataclass(frozen=True)
class StageSpec:
    name: str  # unique in the recipe: the YAML key, with _2, _3 ... for repeats
    kind: str  # the YAML key = registry name
    config: StageConfig


@dataclass(frozen=True)
class Recipe:
    path: Path
    model: str  # hub id, or an absolute local path
    model_is_local: bool
    revision: str | None
    dtype: str
    device: str
    device_map: str | dict[str, str | int] | None
    max_memory: dict[str | int, str | int] | None
    layerwise: str | bool
    trust_remote_code: bool
    allow_pickle_weights: bool
    output: Path
    calibration: CalibrationConfig | None
    evaluate: EvaluateConfig
    stages: list[StageSpec]
    save: list[str]
    raw: dict[str, Any] = field(repr=False)  # the recipe after ${VAR} expansion
    verify: tuple[str, ...] = ()  # engines each saved checkpoint is verified in (compress.verify)

    def fingerprint(self) -> str:
        """Identifies the run: same fingerprint = same recipe (after expansion)."""
        return hashlib.sha256(json.dumps(_sorted(self.raw)).encode()).hexdigest()[:16]

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)


def _sorted(value: Any) -> Any:
    """``value`` with every mapping's keys in order, as json's sort_keys orders them, except that
    int and str keys may mix (``max_memory: {0: 70GiB, cpu: 200GiB}``): ints first."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value, key=lambda k: (isinstance(k, str), k))}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _short(value: Any, limit: int = 80) -> str:
    """repr of a recipe value, cut to ``limit`` characters (values can be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _user_loc(loc: tuple, data: Any) -> tuple:
    """pydantic's error location without the names it gives union members and validators
    (``dict[str,union[str,int]]``, ``str``, ``function-after[...]``), unless the input has that key."""
    out, node = [], data
    for part in loc:
        here = isinstance(node, dict) and part in node
        if not here and isinstance(part, str) and ("[" in part or part in _TYPE_TAGS):
            continue
        out.append(str(part) if here else part)  # an int key of a mapping is no list index
        node = node[part] if here or (isinstance(node, list) and isinstance(part, int)
                                      and 0 <= part < len(node)) else None
    return tuple(out)


def _pydantic_errors(e: ValidationError, prefix: str, data: Any) -> list[str]:
    msgs = []
    for err in e.errors():
        loc = _loc(_user_loc(err["loc"], data))
        key = ".".join(p for p in (prefix, loc) if p)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        got = err.get("input")
        if err["type"] not in ("extra_forbidden", "missing") and not isinstance(got, dict):
            msg += f" (got {_short(got)})"
        msgs.append(f"{key or '(top level)'}: {msg}")
    return msgs


def _parse_stage(index: int, entry: Any, errors: list[str]) -> tuple[str, StageConfig] | None:
    key = f"stages[{index}]"
    if not isinstance(entry, dict) or len(entry) != 1:
        errors.append(f"{key}: each stage is a mapping with one key, the stage name, e.g. "
                      f"`- layer_removal: {{metric: bi, remove: 9}}`; supported: {sorted(STAGES)}")
        return None
    (kind, options), = entry.items()
    if kind in UNAVAILABLE:
        errors.append(f"{key}.{kind}: {UNAVAILABLE[kind]}")
        return None
    if kind not in STAGES:
        errors.append(f"{key}: unknown stage {_short(kind)}; supported: {sorted(STAGES)}")
        return None
    if options is not None and not isinstance(options, dict):
        errors.append(f"{key}.{kind}: expected a mapping of options, got {_short(options)}")
        return None
    try:
        return kind, STAGES[kind].Config.model_validate(options or {}, strict=True)
    except ValidationError as e:
        errors.extend(_pydantic_errors(e, f"{key}.{kind}", options or {}))
        return None


def _stage_specs(raw_stages: list[Any], errors: list[str]) -> tuple[list[StageSpec], list[str]]:
    """Valid stages, and the names of every stage entry (also those that failed validation)."""
    specs, names, seen = [], [], {}
    for i, entry in enumerate(raw_stages):
        parsed = _parse_stage(i, entry, errors)
        kind = next(iter(entry)) if isinstance(entry, dict) and len(entry) == 1 else None
        if kind not in STAGES and kind not in UNAVAILABLE:
            continue
        seen[kind] = seen.get(kind, 0) + 1
        name = kind if seen[kind] == 1 else f"{kind}_{seen[kind]}"
        names.append(name)
        if parsed is not None:
            specs.append(StageSpec(name, kind, parsed[1]))
    return specs, names


def _prunes(cls) -> bool:
    """A stage that removes or merges weights (layers, heads, channels): not quantization, not healing."""
    return not cls.quantizes and not getattr(cls, "needs_pruned_model", False)


def _check_chain(specs: list[StageSpec], names: list[str], top: _Top, errors: list[str]) -> None:
    quantized_at = None
    for i, spec in enumerate(specs):
        cls = STAGES[spec.kind]
        stage = cls(spec.config)
        if quantized_at is not None and spec.kind == "gguf":
            q = specs[quantized_at].name
            errors.append(f"stages[{i}].gguf: comes after quantization stage {q!r}; llama.cpp converts float "
                          f"weights and its own quantizer (gguf: {{quant: q4_k_m}}) replaces {q}: drop {q!r} or "
                          "put gguf in its place")
        elif quantized_at is not None:
            errors.append(f"stages[{i}].{spec.kind}: comes after quantization stage "
                          f"{specs[quantized_at].name!r}; quantization must be the last stage")
        if cls.quantizes:
            quantized_at = i
        if getattr(cls, "needs_pruned_model", False) and not any(_prunes(STAGES[s.kind]) for s in specs[:i]):
            errors.append(f"stages[{i}].{spec.kind}: comes before any pruning stage; it trains the pruned model "
                          f"toward the model as loaded: put it after one of {sorted(k for k, c in STAGES.items() if _prunes(c))}")
        own = isinstance(getattr(spec.config, "calibration", None), CalibrationConfig)
        if stage.needs_calibration and top.calibration is None and not own:
            errors.append(f"stages[{i}].{spec.kind}: needs calibration data; add a top-level "
                          "`calibration: {dataset: pg19, samples: 128, seq_len: 2048}` (or `path:`)")
    if top.verify and top.save == []:
        errors.append("verify: checks saved checkpoints, but save: [] saves none; name the stages to save")
    if len(set(top.verify)) != len(top.verify):
        errors.append(f"verify: lists an engine twice ({top.verify}); name each once")
    for j, name in enumerate(top.save or []):
        if name not in names:
            errors.append(f"save[{j}]: {_short(name)} is not a stage of this recipe; stages: {names}")
    allowed = ["baseline", "every_stage", *names]
    for j, name in enumerate(top.evaluate.after):
        if name not in allowed:
            errors.append(f"evaluate.after[{j}]: {_short(name)} is not one of {allowed}")
    if top.evaluate.fidelity is not None:
        if top.evaluate.perplexity is None:
            errors.append("evaluate.fidelity: is measured on the perplexity text; add evaluate.perplexity")
        if "baseline" not in top.evaluate.after:
            errors.append("evaluate.fidelity: compares with the baseline; add baseline to evaluate.after")


def _resolve_model(model: str, base: Path, errors: list[str]) -> tuple[str, bool]:
    try:
        local = local_model_dir(model, base)
    except CompressError as e:
        errors.append(str(e))
        return model, True
    except (OSError, ValueError, RuntimeError) as e:  # name too long, NUL, ~unknown_user
        errors.append(f"model: {_short(model)} is not a usable path ({_os_reason(e)})")
        return model, True
    if local is not None:
        return str(local), True
    if not _HUB_ID.match(model):
        errors.append(f"model: {_short(model)} is neither an existing local folder nor a hub id (org/name)")
    return model, False


def _resolve_stage_calibration(spec: StageSpec, index: int, base: Path, errors: list[str]) -> StageSpec:
    own = getattr(spec.config, "calibration", None)
    if not isinstance(own, CalibrationConfig):
        return spec
    resolved = _resolve_source(own, base, f"stages[{index}].{spec.kind}.calibration", errors)
    return StageSpec(spec.name, spec.kind, spec.config.model_copy(update={"calibration": resolved}))


def _resolve_source(source, base: Path, key: str, errors: list[str]):
    if isinstance(source, TextSource) and source.dataset in BUILDERS:
        return _resolve_data_files(source, base, key, errors)
    if source is None or source.path is None:
        return source
    path = _local_path(source.path, base, f"{key}.path", errors)
    if path is None:
        return source
    if not path.exists():
        errors.append(f"{key}.path: {path} does not exist")
    return source.model_copy(update={"path": str(path)})


def _resolve_data_files(source, base: Path, key: str, errors: list[str]):
    """Local builder files (``dataset: json`` ...) resolved against ``base``; each must exist (a
    glob pattern: match at least one file). Hub data_files are paths in the repo: left as given."""
    resolved = []
    for i, file in enumerate(source.data_files):
        path = _local_path(file, base, f"{key}.data_files[{i}]", errors)
        if path is None:
            continue
        if any(c in file for c in "*?["):
            if not glob.glob(str(path)):
                errors.append(f"{key}.data_files[{i}]: {path} matches no file")
        elif not path.is_file():
            errors.append(f"{key}.data_files[{i}]: {path} " + ("is not a file" if path.exists() else "does not exist"))
        resolved.append(str(path))
    return source.model_copy(update={"data_files": resolved})


def _data_paths(key: str, source) -> dict[str, Path]:
    """The local files a source reads, by recipe key (output folders must not overwrite them)."""
    if source is None:
        return {}
    if isinstance(source, TextSource) and source.dataset in BUILDERS:
        found = {}
        for i, file in enumerate(source.data_files):
            matches = sorted(glob.glob(file)) if any(c in file for c in "*?[") else [file]
            found.update({f"{key}.data_files[{i}]" + (f" (match {m})" if len(matches) > 1 else ""): Path(match)
                          for m, match in enumerate(matches)})
        return found
    return {f"{key}.path": Path(source.path)} if source.path is not None else {}


LAYERWISE_TASKS = ("lm-eval runs the whole model on one device, but a layer-wise run keeps the weights in "
                   "CPU memory and streams one layer at a time")


def _resolve_tasks(tasks: TasksConfig | None, base: Path, errors: list[str]) -> TasksConfig | None:
    """``include_path`` resolved against the recipe's folder; it must be a folder."""
    if tasks is None or tasks.include_path is None:
        return tasks
    path = _local_path(tasks.include_path, base, "evaluate.tasks.include_path", errors)
    if path is None:
        return tasks
    if not path.is_dir():
        errors.append(f"evaluate.tasks.include_path: {path} is not a folder (give the folder that holds "
                      "your lm-eval task YAML files)")
    return tasks.model_copy(update={"include_path": str(path)})


def _os_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)  # without the (long) path OSError repeats


def _local_path(value: str, base: Path, key: str, errors: list[str]) -> Path | None:
    """``value`` resolved against ``base``, or None (and an error) where the OS cannot use it."""
    try:
        path = (base / Path(value).expanduser()).resolve()
        path.exists()  # raises for a name longer than the OS allows
        return path
    except (OSError, ValueError, RuntimeError) as e:  # name too long, NUL, ~unknown_user
        errors.append(f"{key}: {_short(value)} is not a usable path ({_os_reason(e)})")
        return None


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file. Raises CompressError listing every problem found."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise CompressError(f"{path}: a recipe is a YAML mapping (model:, output:, stages: ...), "
                            f"got {type(data).__name__}")
    return recipe_from_data(data, path)


def recipe_problems(data: dict[str, Any], path: Path, base: Path | None = None,
                    allow_no_stages: bool = False) -> tuple[Recipe | None, list[str]]:
    """``data`` (a recipe mapping) validated: (the recipe, []) or (None, every problem). Relative
    paths resolve against ``base`` (default: ``path``'s folder); ``path`` names the recipe in
    messages and its record. ``allow_no_stages``: a baseline-only run (a sweep's root stack)."""
    errors: list[str] = []
    data = expand(data, errors)
    checked = data
    if allow_no_stages and data.get("stages") == []:
        checked = {**data, "stages": [None]}  # the schema's "at least one stage" is the user rule
    try:
        top = _Top.model_validate(checked, strict=True)
    except ValidationError as e:
        errors.extend(_pydantic_errors(e, "", data))
        top = None
    raw_stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    specs, names = _stage_specs(raw_stages, errors)
    recipe = None
    if top is not None:
        recipe = _build(top, specs, names, path, data, errors, base)
    return (None, errors) if errors else (recipe, [])


def recipe_from_data(data: dict[str, Any], path: Path, base: Path | None = None,
                     allow_no_stages: bool = False) -> Recipe:
    """``recipe_problems``, raising CompressError listing every problem."""
    recipe, errors = recipe_problems(data, path, base, allow_no_stages)
    if errors:
        raise CompressError(_problems(path, errors))
    assert recipe is not None
    return recipe


def _problems(path: Path, errors: list[str], shown: int = 30) -> str:
    """One message: every distinct problem (the first ``shown``, each cut to 500 characters)."""
    unique = list(dict.fromkeys(errors))
    listed = [f"  - {m if len(m) <= 500 else m[:497] + '...'}" for m in unique[:shown]]
    if len(unique) > shown:
        listed.append(f"  ... and {len(unique) - shown} more")
    return f"{path}: invalid recipe ({len(unique)} problem(s)):\n" + "\n".join(listed)


def _build(top: _Top, specs: list[StageSpec], names: list[str], path: Path, raw: dict,
           errors: list[str], base: Path | None = None) -> Recipe | None:
    base = (base or path.resolve().parent).resolve()
    _check_chain(specs, names, top, errors)
    model, is_local = _resolve_model(top.model, base, errors)
    tasks = _resolve_tasks(top.evaluate.tasks, base, errors)
    if top.layerwise is True and tasks is not None:
        errors.append(f"evaluate.tasks: {LAYERWISE_TASKS}; set `layerwise: false` or `auto`, or drop evaluate.tasks")
    if top.layerwise is True and top.device_map is not None:
        errors.append("layerwise: true and device_map exclude each other; choose one")
    if top.max_memory is not None and top.device_map is None:
        errors.append("max_memory: only used with device_map (e.g. `device_map: auto`); add one or drop it")
    for key, value in (top.max_memory or {}).items():
        if parse_size(value) is None:
            errors.append(f"max_memory.{key}: {_short(value)} is not a size like 70GiB, 500MB or a byte count")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", top.device):
        errors.append(f"device: {_short(top.device)} is not one of auto, cpu, cuda, cuda:N, mps")
    usable_output = _local_path(top.output, base, "output", errors)
    output = usable_output or base
    calibration = _resolve_source(top.calibration, base, "calibration", errors)
    specs = [_resolve_stage_calibration(spec, i, base, errors) for i, spec in enumerate(specs)]
    ppl = _resolve_source(top.evaluate.perplexity, base, "evaluate.perplexity", errors)
    mmlu = _resolve_source(top.evaluate.mmlu, base, "evaluate.mmlu", errors)
    data = {**_data_paths("calibration", calibration), **_data_paths("evaluate.perplexity", ppl),
            **_data_paths("evaluate.mmlu", mmlu)}
    if tasks is not None and tasks.include_path is not None:
        data["evaluate.tasks.include_path"] = Path(tasks.include_path)
    for i, spec in enumerate(specs):
        own = getattr(spec.config, "calibration", None)
        if isinstance(own, CalibrationConfig):
            data.update(_data_paths(f"stages[{i}].{spec.kind}.calibration", own))
    if usable_output is not None:
        errors.extend(output_conflicts(output, Path(model) if is_local else None, base, data))
    evaluate = top.evaluate.model_copy(update={"perplexity": ppl, "mmlu": mmlu, "tasks": tasks})
    return Recipe(
        path=path.resolve(), model=model, model_is_local=is_local, revision=top.revision,
        dtype=top.dtype, device=top.device, device_map=top.device_map, max_memory=top.max_memory,
        layerwise=top.layerwise,
        trust_remote_code=top.trust_remote_code, allow_pickle_weights=top.allow_pickle_weights,
        output=output,
        calibration=calibration, evaluate=evaluate, stages=specs,
        save=list(top.save) if top.save is not None else ([specs[-1].name] if specs else []),
        raw=raw, verify=tuple(top.verify),
    )


def calibration_sets(recipe: Recipe) -> list[tuple[str, CalibrationConfig]]:
    """Every calibration set of the recipe, with its key: the top-level one and the stages' own."""
    found = [("calibration", recipe.calibration)] if recipe.calibration is not None else []
    for i, spec in enumerate(recipe.stages):
        own = getattr(spec.config, "calibration", None)
        if isinstance(own, CalibrationConfig):
            found.append((f"stages[{i}].{spec.kind}.calibration", own))
    return found


def _sequence_problems(recipe: Recipe, facts: ModelFacts) -> list[str]:
    """Sequences longer than the model's positions; calibration sets larger than the memory."""
    lengths = [(f"{key}.seq_len", cal.seq_len) for key, cal in calibration_sets(recipe)]
    if recipe.evaluate.perplexity is not None:
        lengths.append(("evaluate.perplexity.seq_len", recipe.evaluate.perplexity.seq_len))
    if recipe.evaluate.efficiency is not None:
        eff = recipe.evaluate.efficiency
        lengths.append(("evaluate.efficiency.prompt_tokens + new_tokens", eff.prompt_tokens + eff.new_tokens))
    problems = [positions_problem(key, n, facts.max_position_embeddings) for key, n in lengths]
    available = model_io.available_bytes(torch.device("cpu"))
    streamed = {f"stages[{i}].{s.kind}.calibration" for i, s in enumerate(recipe.stages)
                if getattr(STAGES[s.kind], "streams_calibration", False)}
    problems += [memory_problem(f"{key}.samples", cal.samples, cal.seq_len, facts.hidden_size, available)
                 for key, cal in calibration_sets(recipe) if key not in streamed]
    return [p for p in problems if p]


def check_against_model(recipe: Recipe, facts: ModelFacts) -> list[str]:
    """Checks that need the model's shape (from its config, before weights load). Each stage is
    checked against the shapes the stages before it leave (layers, heads, MLP width). Raises
    CompressError listing every error; returns (and logs) the warnings: what a stage's optional
    ``warnings(facts)`` reports that does not stop the run."""
    errors: list[str] = []
    warnings: list[str] = []
    current = facts
    for i, spec in enumerate(recipe.stages):
        stage, key = STAGES[spec.kind](spec.config), f"stages[{i}].{spec.kind}"
        problems = stage.check(current)
        errors.extend(f"{key}.{msg}" for msg in problems)
        warnings.extend(f"{key}: {msg}" for msg in getattr(stage, "warnings", lambda f: [])(current))
        if not problems:  # a refused stage: the later ones are checked as if it changed nothing
            after = getattr(stage, "facts_after", None)  # optional: a stage without it changes no shape
            current = facts_after_stage(current, after(current) if after else current, key)
    errors.extend(_sequence_problems(recipe, facts))
    if errors:
        listed = "\n".join(f"  - {m}" for m in errors)
        raise CompressError(f"{recipe.path}: recipe does not fit model {recipe.model} "
                            f"({facts.model_type}, {facts.num_layers} layers):\n{listed}")
    for warning in warnings:
        log.warning("%s", warning)
    return warnings

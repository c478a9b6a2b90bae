"""Recipe: the YAML file a user writes, validated completely before any model is loaded.

``load_recipe(path)`` returns a typed ``Recipe`` or raises ``CompressError`` with one message that
names the file and lists *every* problem as ``key.path: what is wrong (what is allowed)``.
Strings may use ``${VAR}`` / ``${VAR:-default}``; relative paths are resolved against the recipe's
folder. Checks that need the model's shape (``check_against_model``) read only its config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compress.data.sources import CalibrationConfig
from compress.errors import CompressError
from compress.evaluate.suite import EfficiencyConfig, MMLUConfig, PerplexityConfig
import compress.model_io as model_io
from compress.model_checks import memory_problem, positions_problem
from compress.model_io import local_model_dir, parse_size
from compress.stages import STAGES, UNAVAILABLE
from compress.stages.base import ModelFacts, StageConfig

DTYPES = ("auto", "float32", "float16", "bfloat16")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvaluateConfig(_Strict):
    after: list[str] = ["baseline", "every_stage"]
    perplexity: PerplexityConfig | None = None
    mmlu: MMLUConfig | None = None
    efficiency: EfficiencyConfig | None = None


class _Top(_Strict):
    model: str
    revision: str | None = None
    dtype: Literal[DTYPES] = "auto"  # type: ignore[valid-type]
    device: str = "auto"
    device_map: str | dict[str, Any] | None = None  # passed to accelerate (multi-GPU, CPU offload)
    max_memory: dict[str | int, str | int] | None = None  # e.g. {0: 70GiB, cpu: 200GiB}
    layerwise: Literal["auto", True, False] = "auto"  # keep weights in CPU memory, run layer by layer
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False  # read .bin weights (torch.load weights_only=True)
    output: str
    calibration: CalibrationConfig | None = None
    evaluate: EvaluateConfig = EvaluateConfig()
    stages: list[Any] = Field(min_length=1)
    save: list[str] | None = None


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
    device_map: str | dict[str, Any] | None
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

    def fingerprint(self) -> str:
        """Identifies the run: same fingerprint = same recipe (after expansion)."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()[:16]

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_errors(e: ValidationError, prefix: str) -> list[str]:
    msgs = []
    for err in e.errors():
        loc = _loc(tuple(p for p in err["loc"] if p not in ("function-after",)))
        key = ".".join(p for p in (prefix, loc) if p)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        got = err.get("input")
        if err["type"] not in ("extra_forbidden", "missing") and not isinstance(got, dict):
            msg += f" (got {got!r})"
        msgs.append(f"{key or '(top level)'}: {msg}")
    return msgs


def _expand(value: Any, key: str, errors: list[str]) -> Any:
    """Expand ${VAR} and ${VAR:-default} in every string of the parsed YAML."""
    if isinstance(value, dict):
        return {k: _expand(v, f"{key}.{k}" if key else str(k), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ and os.environ[name] != "":
            return os.environ[name]
        if default is not None:
            return default
        errors.append(f"{key}: environment variable ${{{name}}} is not set (set it, or write ${{{name}:-default}})")
        return m.group(0)

    return _ENV.sub(sub, value)


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        raise CompressError(f"{path}: recipe file not found")
    if path.is_dir():
        raise CompressError(f"{path}: is a directory; give the recipe's .yaml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CompressError(f"{path}: cannot read the recipe ({e})") from None
    if not text.strip():
        raise CompressError(f"{path}: the recipe is empty; see README 'Recipe reference'")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise CompressError(f"{path}: not valid YAML{line}: {getattr(e, 'problem', e)}") from None


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
        errors.append(f"{key}: unknown stage {kind!r}; supported: {sorted(STAGES)}")
        return None
    if options is not None and not isinstance(options, dict):
        errors.append(f"{key}.{kind}: expected a mapping of options, got {options!r}")
        return None
    try:
        return kind, STAGES[kind].Config.model_validate(options or {}, strict=True)
    except ValidationError as e:
        errors.extend(_pydantic_errors(e, f"{key}.{kind}"))
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


def _check_chain(specs: list[StageSpec], names: list[str], top: _Top, errors: list[str]) -> None:
    quantized_at = None
    for i, spec in enumerate(specs):
        cls = STAGES[spec.kind]
        stage = cls(spec.config)
        if quantized_at is not None:
            errors.append(f"stages[{i}].{spec.kind}: comes after quantization stage "
                          f"{specs[quantized_at].name!r}; quantization must be the last stage")
        if cls.quantizes:
            quantized_at = i
        own = isinstance(getattr(spec.config, "calibration", None), CalibrationConfig)
        if stage.needs_calibration and top.calibration is None and not own:
            errors.append(f"stages[{i}].{spec.kind}: needs calibration data; add a top-level "
                          "`calibration: {dataset: pg19, samples: 128, seq_len: 2048}` (or `path:`)")
    for j, name in enumerate(top.save or []):
        if name not in names:
            errors.append(f"save[{j}]: {name!r} is not a stage of this recipe; stages: {names}")
    allowed = ["baseline", "every_stage", *names]
    for j, name in enumerate(top.evaluate.after):
        if name not in allowed:
            errors.append(f"evaluate.after[{j}]: {name!r} is not one of {allowed}")


def _resolve_model(model: str, base: Path, errors: list[str]) -> tuple[str, bool]:
    try:
        local = local_model_dir(model, base)
    except CompressError as e:
        errors.append(str(e))
        return model, True
    if local is not None:
        return str(local), True
    if not _HUB_ID.match(model):
        errors.append(f"model: {model!r} is neither an existing local folder nor a hub id (org/name)")
    return model, False


def _resolve_stage_calibration(spec: StageSpec, index: int, base: Path, errors: list[str]) -> StageSpec:
    own = getattr(spec.config, "calibration", None)
    if not isinstance(own, CalibrationConfig):
        return spec
    resolved = _resolve_source(own, base, f"stages[{index}].{spec.kind}.calibration", errors)
    return StageSpec(spec.name, spec.kind, spec.config.model_copy(update={"calibration": resolved}))


def _resolve_source(source, base: Path, key: str, errors: list[str]):
    if source is None or source.path is None:
        return source
    path = (base / Path(source.path).expanduser()).resolve()
    if not path.exists():
        errors.append(f"{key}.path: {path} does not exist")
    return source.model_copy(update={"path": str(path)})


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file. Raises CompressError listing every problem found."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise CompressError(f"{path}: a recipe is a YAML mapping (model:, output:, stages: ...), "
                            f"got {type(data).__name__}")
    errors: list[str] = []
    data = _expand(data, "", errors)
    try:
        top = _Top.model_validate(data, strict=True)
    except ValidationError as e:
        errors.extend(_pydantic_errors(e, ""))
        top = None
    raw_stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    specs, names = _stage_specs(raw_stages, errors)
    recipe = None
    if top is not None:
        recipe = _build(top, specs, names, path, data, errors)
    if errors:
        listed = "\n".join(f"  - {m}" for m in dict.fromkeys(errors))
        raise CompressError(f"{path}: invalid recipe ({len(dict.fromkeys(errors))} problem(s)):\n{listed}")
    assert recipe is not None
    return recipe


def _build(top: _Top, specs: list[StageSpec], names: list[str], path: Path, raw: dict,
           errors: list[str]) -> Recipe | None:
    base = path.resolve().parent
    _check_chain(specs, names, top, errors)
    model, is_local = _resolve_model(top.model, base, errors)
    if top.layerwise is True and top.device_map is not None:
        errors.append("layerwise: true and device_map exclude each other; choose one")
    if top.max_memory is not None and top.device_map is None:
        errors.append("max_memory: only used with device_map (e.g. `device_map: auto`); add one or drop it")
    for key, value in (top.max_memory or {}).items():
        if parse_size(value) is None:
            errors.append(f"max_memory.{key}: {value!r} is not a size like 70GiB, 500MB or a byte count")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", top.device):
        errors.append(f"device: {top.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    output = (base / Path(top.output).expanduser()).resolve()
    if is_local and (output == Path(model) or Path(model) in output.parents):
        errors.append(f"output: {output} is inside the input model folder {model}; choose another folder")
    calibration = _resolve_source(top.calibration, base, "calibration", errors)
    specs = [_resolve_stage_calibration(spec, i, base, errors) for i, spec in enumerate(specs)]
    ppl = _resolve_source(top.evaluate.perplexity, base, "evaluate.perplexity", errors)
    mmlu = _resolve_source(top.evaluate.mmlu, base, "evaluate.mmlu", errors)
    evaluate = top.evaluate.model_copy(update={"perplexity": ppl, "mmlu": mmlu})
    return Recipe(
        path=path.resolve(), model=model, model_is_local=is_local, revision=top.revision,
        dtype=top.dtype, device=top.device, device_map=top.device_map, max_memory=top.max_memory,
        layerwise=top.layerwise,
        trust_remote_code=top.trust_remote_code, allow_pickle_weights=top.allow_pickle_weights,
        output=output,
        calibration=calibration, evaluate=evaluate, stages=specs,
        save=list(top.save) if top.save is not None else ([specs[-1].name] if specs else []),
        raw=raw,
    )


def _calibrations(recipe: Recipe) -> list[tuple[str, CalibrationConfig]]:
    """Every calibration set of the recipe, with its key: the top-level one and the stages' own."""
    found = [("calibration", recipe.calibration)] if recipe.calibration is not None else []
    for i, spec in enumerate(recipe.stages):
        own = getattr(spec.config, "calibration", None)
        if isinstance(own, CalibrationConfig):
            found.append((f"stages[{i}].{spec.kind}.calibration", own))
    return found


def _sequence_problems(recipe: Recipe, facts: ModelFacts) -> list[str]:
    """Sequences longer than the model's positions; calibration sets larger than the memory."""
    lengths = [(f"{key}.seq_len", cal.seq_len) for key, cal in _calibrations(recipe)]
    if recipe.evaluate.perplexity is not None:
        lengths.append(("evaluate.perplexity.seq_len", recipe.evaluate.perplexity.seq_len))
    if recipe.evaluate.efficiency is not None:
        eff = recipe.evaluate.efficiency
        lengths.append(("evaluate.efficiency.prompt_tokens + new_tokens", eff.prompt_tokens + eff.new_tokens))
    problems = [positions_problem(key, n, facts.max_position_embeddings) for key, n in lengths]
    available = model_io.available_bytes(torch.device("cpu"))
    problems += [memory_problem(f"{key}.samples", cal.samples, cal.seq_len, facts.hidden_size, available)
                 for key, cal in _calibrations(recipe)]
    return [p for p in problems if p]


def check_against_model(recipe: Recipe, facts: ModelFacts) -> None:
    """Checks that need the model's shape (from its config, before weights load)."""
    errors: list[str] = []
    layers = facts.num_layers
    for i, spec in enumerate(recipe.stages):
        stage = STAGES[spec.kind](spec.config)
        errors.extend(f"stages[{i}].{spec.kind}.{msg}" for msg in stage.check(
            ModelFacts(**{**facts.__dict__, "num_layers": layers})))
        layers -= getattr(stage, "layers_removed", lambda n: 0)(layers)
    errors.extend(_sequence_problems(recipe, facts))
    if errors:
        listed = "\n".join(f"  - {m}" for m in errors)
        raise CompressError(f"{recipe.path}: recipe does not fit model {recipe.model} "
                            f"({facts.model_type}, {facts.num_layers} layers):\n{listed}")

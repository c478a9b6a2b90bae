"""The sweep file: a base recipe and axes of named stage variants -> stacks, each an equivalent recipe.

Sample yaml (recipes/sweeps/quickstart-stacks.yaml)::

    base: ../quickstart.yaml          # a recipe file (its stages, save and output are not used) or a mapping
    output: ../../runs/quickstart-stacks
    axes:                             # in stage order; each variant: one stage, or a list of stages
      depth: [none, {bi7: {layer_removal: {metric: bi, remove: 7}}}]
      quant: [none, {gptq4: {gptq: {bits: 4, group_size: 64}}}, {nf4: {bnb4: {}}}]
    stacks: [baseline, bi7, bi7+gptq4]   # optional: these instead of the cross product
    save: [bi7+gptq4]                 # stacks whose last stage is saved as a checkpoint: a list, all or none

A stack's name joins its variants' names with ``+`` (``none`` left out; no variant: ``baseline``).
Everything is validated before any weights load: every stack's recipe, and its stages against the
model's shapes; all problems are listed at once.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.recipe import Recipe, check_against_model, recipe_problems
from compress.recipe_text import expand, read_yaml

NONE = "none"
BASELINE = "baseline"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NOT_FROM_BASE = ("stages", "save", "output")  # the sweep sets these for every stack


@dataclass(frozen=True)
class Stack:
    name: str  # variants joined by "+", or "baseline"
    variants: tuple[str, ...]  # without none, in axis order (their stages: Sweep.stages_of)


@dataclass(frozen=True)
class Sweep:
    path: Path  # the sweep file
    base_dir: Path  # where the base recipe's relative paths resolve
    base: dict[str, Any]  # the base recipe without stages/save/output
    output: Path
    axes: dict[str, dict[str, tuple[dict[str, Any], ...]]]  # axis -> variant -> stage entries
    stacks: tuple[Stack, ...]
    save: frozenset[str]  # stack names
    raw: dict[str, Any]

    def stages_of(self, variants: tuple[str, ...]) -> list[dict[str, Any]]:
        by_name = {v: entries for axis in self.axes.values() for v, entries in axis.items()}
        return [entry for v in variants for entry in by_name[v]]

    def recipe_data(self, variants: tuple[str, ...], saved: bool) -> dict[str, Any]:
        """The recipe of the stack (or shared prefix) ``variants``: what `compress run` would take."""
        stages = self.stages_of(variants)
        names, seen = [], {}
        for entry in stages:
            kind = next(iter(entry))
            seen[kind] = seen.get(kind, 0) + 1
            names.append(kind if seen[kind] == 1 else f"{kind}_{seen[kind]}")
        return {**self.base, "output": str(self.output / "runs" / node_name(variants)), "stages": stages,
                "save": names[-1:] if saved and names else []}

    def recipe(self, variants: tuple[str, ...], saved: bool) -> Recipe:
        recipe, errors = recipe_problems(self.recipe_data(variants, saved), self.path, self.base_dir,
                                         allow_no_stages=True)
        if errors:
            raise CompressError(f"{self.path}: stack {node_name(variants)}: " + "; ".join(errors))
        assert recipe is not None
        return recipe


def node_name(variants: tuple[str, ...]) -> str:
    return "+".join(variants) if variants else BASELINE


def load_sweep(path: str | Path, check_model: bool = True) -> Sweep:
    """Parse and validate a sweep file: CompressError listing every problem of every stack."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise CompressError(f"{path}: a sweep file is a YAML mapping (base:, output:, axes: ...), "
                            f"got {type(data).__name__}")
    errors: list[str] = []
    data = expand(data, errors)
    unknown = sorted(set(data) - {"base", "output", "axes", "stacks", "save"})
    if unknown:
        errors.append(f"{', '.join(unknown)}: unknown key(s); a sweep file has base, output, axes, stacks, save")
    base, base_dir = _base(data.get("base"), path, errors)
    output = None
    if not isinstance(data.get("output"), str) or not data.get("output"):
        errors.append("output: missing; name the sweep's folder (e.g. output: runs/my-sweep)")
    else:
        output = (path.resolve().parent / Path(data["output"]).expanduser()).resolve()
    axes = _axes(data.get("axes"), errors)
    stacks = _stacks(data.get("stacks"), axes, errors)
    save = _save(data.get("save", NONE), stacks, errors)
    if errors:
        raise CompressError(_listed(path, errors))
    assert output is not None
    sweep = Sweep(path.resolve(), base_dir, base, output, axes, tuple(stacks), frozenset(save), data)
    problems: list[str] = []
    recipes = []
    for stack in stacks:
        recipe, found = recipe_problems(sweep.recipe_data(stack.variants, stack.name in save), path, base_dir,
                                        allow_no_stages=True)
        problems += [f"stack {stack.name}: {p}" for p in found]
        if recipe is not None:
            recipes.append((stack, recipe))
    if not problems and check_model and recipes:
        problems += _model_problems(recipes)
    if problems:
        raise CompressError(_listed(path, problems))
    return sweep


def _listed(path: Path, errors: list[str]) -> str:
    unique = list(dict.fromkeys(errors))
    return f"{path}: invalid sweep ({len(unique)} problem(s)):\n" + "\n".join(f"  - {e}" for e in unique[:40])


def _base(value: Any, path: Path, errors: list[str]) -> tuple[dict[str, Any], Path]:
    here = path.resolve().parent
    if isinstance(value, str):
        base_path = (here / Path(value).expanduser()).resolve()
        if not base_path.is_file():
            errors.append(f"base: {value} is not a recipe file (looked at {base_path})")
            return {}, here
        data = read_yaml(base_path)
        if not isinstance(data, dict):
            errors.append(f"base: {base_path} is not a recipe (a YAML mapping)")
            return {}, here
        return {k: v for k, v in data.items() if k not in _NOT_FROM_BASE}, base_path.parent
    if isinstance(value, dict):
        given = [k for k in _NOT_FROM_BASE if k in value]
        if given:
            errors.append(f"base.{given[0]}: the sweep sets {', '.join(_NOT_FROM_BASE)} for every stack; "
                          "drop it from base (stages come from axes, output from the sweep's output)")
        return {k: v for k, v in value.items() if k not in _NOT_FROM_BASE}, here
    errors.append("base: missing; give a recipe file (base: ../quickstart.yaml) or a mapping "
                  "(model, dtype, calibration, evaluate)")
    return {}, here


def _variant(axis: str, i: int, entry: Any, errors: list[str]) -> tuple[str, tuple[dict[str, Any], ...]] | None:
    key = f"axes.{axis}[{i}]"
    if entry == NONE:
        return NONE, ()
    if not (isinstance(entry, dict) and len(entry) == 1):
        errors.append(f"{key}: a variant is `none` or one mapping name: stage (or name: [stages]), "
                      f"e.g. bi7: {{layer_removal: {{remove: 7}}}}; got {entry!r:.80}")
        return None
    name, stages = next(iter(entry.items()))
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (NONE, BASELINE) or "+" in name:
        errors.append(f"{key}: variant name {name!r} must be letters, digits, _ . - (not none/baseline)")
        return None
    stages = [stages] if isinstance(stages, dict) else stages
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) and len(s) == 1 for s in stages):
        errors.append(f"{key}.{name}: give one stage ({{layer_removal: {{remove: 7}}}}) or a list of stages")
        return None
    return name, tuple(stages)


def _axes(value: Any, errors: list[str]) -> dict[str, dict[str, tuple[dict[str, Any], ...]]]:
    if not isinstance(value, dict) or not value:
        errors.append("axes: missing; a mapping of axis name -> list of variants, e.g. "
                      "depth: [none, {bi7: {layer_removal: {remove: 7}}}]")
        return {}
    axes, seen = {}, {}
    for axis, entries in value.items():
        if not isinstance(entries, list) or not entries:
            errors.append(f"axes.{axis}: a non-empty list of variants")
            continue
        axes[axis] = {}
        for i, entry in enumerate(entries):
            found = _variant(str(axis), i, entry, errors)
            if found is None:
                continue
            name, stages = found
            if name in axes[axis] or (name != NONE and name in seen):
                errors.append(f"axes.{axis}[{i}]: variant name {name!r} used twice "
                              f"(also in axes.{seen.get(name, axis)}); names must be unique")
                continue
            axes[axis][name] = stages
            seen[name] = axis
    return axes


def _stacks(value: Any, axes, errors: list[str]) -> list[Stack]:
    if not axes:
        return []
    order = {v: (i, axis) for i, (axis, variants) in enumerate(axes.items()) for v in variants if v != NONE}
    if value is None:
        combos = [tuple(v for v in combo if v != NONE) for combo in itertools.product(*(list(a) for a in axes.values()))]
    elif isinstance(value, list) and value:
        combos = []
        for i, entry in enumerate(value):
            names = entry.split("+") if isinstance(entry, str) else entry
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                errors.append(f"stacks[{i}]: a stack is a name like bi7+gptq4 (or a list of variant names)")
                continue
            names = [n for n in names if n not in (NONE, BASELINE)]
            bad = [n for n in names if n not in order]
            if bad:
                errors.append(f"stacks[{i}]: {', '.join(bad)} not a variant of any axis "
                              f"(variants: {', '.join(order)})")
                continue
            axes_used = [order[n][1] for n in names]
            if len(set(axes_used)) != len(axes_used) or [order[n][0] for n in names] != sorted(order[n][0] for n in names):
                errors.append(f"stacks[{i}]: {entry!r}: at most one variant per axis, in axis order "
                              f"({' -> '.join(axes)})")
                continue
            combos.append(tuple(names))
    else:
        errors.append("stacks: a non-empty list of stack names (bi7+gptq4), or leave it out for every combination")
        return []
    stacks, seen = [], set()
    for combo in combos:
        if combo in seen:
            continue
        seen.add(combo)
        stacks.append(Stack(node_name(combo), combo))
    return stacks


def _save(value: Any, stacks: list[Stack], errors: list[str]) -> set[str]:
    names = {s.name for s in stacks}
    if value in (NONE, None):
        return set()
    if value == "all":
        return names - {BASELINE}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        bad = [v for v in value if v not in names or v == BASELINE]
        if bad:
            errors.append(f"save: {', '.join(bad)} not a stack with stages (stacks: {', '.join(sorted(names))})")
        return set(value) - set(bad)
    errors.append("save: all, none, or a list of stack names")
    return set()


def _model_problems(recipes: list[tuple[Stack, Recipe]]) -> list[str]:
    """Every stack's stages checked against the model's shapes (config only, no weights)."""
    from compress.model_io import model_facts, read_config

    first = recipes[0][1]
    try:
        facts = model_facts(read_config(first.model, first.revision, first.trust_remote_code))
    except CompressError as e:
        return [str(e)]
    problems = []
    for stack, recipe in recipes:
        try:
            check_against_model(recipe, facts)
        except CompressError as e:
            problems += [f"stack {stack.name}: {line.strip()[2:]}" for line in str(e).splitlines()[1:]]
    return problems

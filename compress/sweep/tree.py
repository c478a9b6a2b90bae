"""The sweep's shared work as a prefix tree, and how one node of it runs.

Every stack is a path from the root (the baseline: the model as loaded, evaluated once) through
its variants; stacks that share a prefix share that node's run. A node's run folder is a
`compress run` folder (runs/<node>/). A child starts as a copy of its parent's folder (files
hard-linked, so nothing is duplicated on disk) with its own run record: the pipeline's resume then
finds the parent's steps done (the baseline measured, replayable stages replayed from their record,
non-replayable ones loaded from their checkpoint) and runs only the child's own stages. So each
stack's rows are exactly what `compress run` of its recipe writes, and a killed sweep resumes at
every node.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.model_io import write_atomic
from compress.recipe import Recipe
from compress.run_folder import RUN_FILE, hold_run_lock, read_run_file
from compress.stages import STAGES
from compress.sweep.spec import Sweep, node_name

log = logging.getLogger("compress")

Node = tuple[str, ...]  # the variants from the root


def nodes_of(sweep: Sweep) -> list[Node]:
    """Every prefix of every stack, parents before children (by depth, then stack order)."""
    seen: dict[Node, None] = {}
    for stack in sweep.stacks:
        for n in range(len(stack.variants) + 1):
            seen.setdefault(stack.variants[:n], None)
    return sorted(seen, key=len)


def folder_of(sweep: Sweep, node: Node) -> Path:
    return sweep.output / "runs" / node_name(node)


def recipe_of(sweep: Sweep, node: Node) -> Recipe:
    return sweep.recipe(node, node_name(node) in sweep.save)


def is_done(folder: Path, recipe: Recipe) -> bool:
    """The folder holds this recipe's complete run."""
    run = read_run_file(folder) if folder.is_dir() else None
    if run is None or run.get("fingerprint") != recipe.fingerprint():
        return False
    try:
        return bool(json.loads((folder / "report.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # every writer of a run folder replaces files (write_atomic), never edits
    except OSError:
        shutil.copy2(src, dst)


def seed_from_parent(parent: Path, child: Path, recipe: Recipe) -> None:
    """``child`` = ``parent``'s finished steps, recorded as a run of ``recipe``: state entries and the
    baseline-logits store linked; checkpoints only where the child's own run has them too (the
    resume point of a non-replayable stage, or a stage the child saves)."""
    parent_run = read_run_file(parent)
    if parent_run is None:
        raise CompressError(f"{parent}: the parent node has no run record; rerun the sweep")
    tmp = child.with_name(f".{child.name}.seed")
    if tmp.exists():
        shutil.rmtree(tmp)  # a seeding killed half-way (ours: the sweep's runs folder)
    keep_checkpoints, drop_from_entry = set(recipe.save), []
    for path in sorted((parent / "state").glob("*.json")):
        entry = json.loads(path.read_text())
        kind = entry.get("kind")
        if kind in STAGES and getattr(STAGES[kind], "replayable", True) is False:
            keep_checkpoints.add(entry["step"])
        elif "checkpoint" in entry and entry.get("step") not in recipe.save:
            drop_from_entry.append(path.name)
    for src in sorted(p for p in parent.rglob("*") if p.is_file()):
        rel = src.relative_to(parent)
        top = rel.parts[0]
        if top == "state":
            under = rel.parts[1] if len(rel.parts) > 1 else ""
            if under.endswith(".work") or under.startswith("teacher-"):
                continue  # a finished stage's resume state / teacher: the child never reads them
            if rel.name in drop_from_entry:
                entry = json.loads(src.read_text())
                entry.pop("checkpoint", None)
                entry.pop("disk_bytes", None)
                write_atomic(tmp / rel, json.dumps(entry, indent=2, default=str))
                continue
            _link(src, tmp / rel)
        elif top == "checkpoints" and len(rel.parts) > 1 and rel.parts[1] in keep_checkpoints:
            _link(src, tmp / rel)
    write_atomic(tmp / RUN_FILE, json.dumps({"fingerprint": recipe.fingerprint(), "recipe": str(recipe.path),
                                             "model_identity": parent_run.get("model_identity"),
                                             "created": time.time(), "seeded_from": parent.name}, indent=2))
    os.replace(tmp, child)


def run_node(sweep: Sweep, node: Node, progress: bool = True) -> dict[str, Any]:
    """Run one node (its parent must be done): -> its record (wall time, what was reused)."""
    from compress.pipeline import Pipeline

    name, folder = node_name(node), folder_of(sweep, node)
    recipe = recipe_of(sweep, node)
    start = time.perf_counter()
    with hold_run_lock(folder):
        if is_done(folder, recipe):
            log.info("sweep: %s already done", name)
            return _record(sweep, node, None, done_before=True)
        if node and not folder.exists():
            seed_from_parent(folder_of(sweep, node[:-1]), folder, recipe)
        log.info("sweep: node %s (%d stage(s) of its own)", name, len(sweep.stages_of(node[-1:])) if node else 0)
        pipeline = Pipeline(recipe, progress=progress, cache_folder=sweep.output / "cache")
        pipeline.run()
    record = _record(sweep, node, time.perf_counter() - start, done_before=False, cache=pipeline.cache.events)
    write_atomic(sweep.output / "nodes" / f"{name}.json", json.dumps(record, indent=2))
    return record


def _record(sweep: Sweep, node: Node, wall_s: float | None, done_before: bool,
            cache: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    name = node_name(node)
    if done_before:
        path = sweep.output / "nodes" / f"{name}.json"
        if path.exists():
            return {**json.loads(path.read_text()), "done_before": True}
    return {"node": name, "parent": node_name(node[:-1]) if node else None, "depth": len(node),
            "wall_s": wall_s, "done_before": done_before, "cache": cache or []}

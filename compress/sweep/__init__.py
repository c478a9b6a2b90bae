"""`compress sweep` and `compress search`: many compression stacks from one sweep file, sharing work.

* compress.sweep.spec: the sweep file -> stacks, each an equivalent recipe (validated up front);
* compress.sweep.tree: the prefix tree of shared work and how one node runs (a `compress run`
  folder seeded from its parent's);
* compress.sweep.executors: ``local`` or ``ray``;
* compress.sweep.report / search: the sweep report; the best stack within a budget.

Sweep output folder: ``runs/<stack>/`` (one `compress run` folder per node), ``cache/`` (work shared
between nodes: tokenized data, layer scores), ``nodes/`` (each node's record), ``sweep.json`` (what
the sweep is: its file and any stacks ``search --refine`` added), ``report.json``/``report.md``/``plots/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.model_io import write_atomic
from compress.run_folder import hold_run_lock, read_run_file
from compress.sweep.executors import execute
from compress.sweep.report import stack_rows, write_sweep_report
from compress.sweep.search import neighbours, search
from compress.sweep.spec import NONE, Stack, Sweep, load_sweep, node_name
from compress.sweep.tree import folder_of, nodes_of, recipe_of

log = logging.getLogger("compress")
SWEEP_FILE = "sweep.json"


def _check_output(sweep: Sweep) -> None:
    """The sweep folder is new, empty, or this sweep file's; node folders hold this sweep's runs."""
    out = sweep.output
    if out.exists() and not out.is_dir():
        raise CompressError(f"output: {out} exists and is not a folder; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / SWEEP_FILE).exists():
        raise CompressError(f"output: {out} holds files that compress sweep did not write; choose a new or "
                            "empty folder")
    stale = []
    for node in nodes_of(sweep):
        folder = folder_of(sweep, node)
        run = read_run_file(folder) if folder.is_dir() else None
        if run is not None and run.get("fingerprint") != recipe_of(sweep, node).fingerprint():
            stale.append(str(folder))
    if stale:
        raise CompressError("output: these node folders hold runs of an earlier version of their stack (the sweep "
                            f"file changed since): {', '.join(stale)}; delete them (compress wrote them) to "
                            "recompute those nodes, or choose another output")


def _extras(out: Path) -> dict[str, Any]:
    path = out / SWEEP_FILE
    return json.loads(path.read_text()).get("extras", {}) if path.exists() else {}


def with_extras(sweep: Sweep, extras: dict[str, Any]) -> Sweep:
    """``sweep`` plus the variants and stacks ``search --refine`` added."""
    axes = {axis: dict(variants) for axis, variants in sweep.axes.items()}
    for axis, variants in extras.get("variants", {}).items():
        axes[axis].update({name: tuple(stages) for name, stages in variants.items()})
    stacks = list(sweep.stacks)
    known = {s.variants for s in stacks}
    for variants in extras.get("stacks", []):
        if tuple(variants) not in known:
            stacks.append(Stack(node_name(tuple(variants)), tuple(variants)))
    return dataclasses.replace(sweep, axes=axes, stacks=tuple(stacks))


def open_run(run: str | Path) -> Sweep:
    """The sweep of a sweep output folder (its sweep file, read again, plus refinements)."""
    run = Path(run)
    path = run / SWEEP_FILE
    if not path.is_file():
        raise CompressError(f"{run}: not a sweep output folder (no {SWEEP_FILE}); give the `output` of a "
                            "sweep file that `compress sweep` ran")
    data = json.loads(path.read_text())
    sweep = load_sweep(data["sweep_file"], check_model=False)
    if sweep.output != run.resolve():
        sweep = dataclasses.replace(sweep, output=run.resolve())
    return with_extras(sweep, data.get("extras", {}))


def _write_sweep_file(sweep: Sweep, extras: dict[str, Any]) -> None:
    write_atomic(sweep.output / SWEEP_FILE, json.dumps({"sweep_file": str(sweep.path), "extras": extras,
                                                         "stacks": [s.name for s in sweep.stacks]}, indent=2))


def _failures(records: dict[str, dict[str, Any]]) -> list[str]:
    return [f"{name}: {r['error'].splitlines()[0]}" for name, r in records.items() if "error" in r]


def run_sweep(path: str | Path, executor: str = "local", address: str | None = None,
              num_cpus: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Validate the sweep file, run every stack's missing nodes, write the sweep report."""
    sweep = load_sweep(path)
    with hold_run_lock(sweep.output):
        _check_output(sweep)
        extras = _extras(sweep.output)
        sweep = with_extras(sweep, extras)
        _write_sweep_file(sweep, extras)
        nodes = nodes_of(sweep)
        log.info("sweep %s: %d stacks, %d nodes of shared work, executor %s", sweep.path.name, len(sweep.stacks),
                 len(nodes), executor)
        records = execute(sweep, executor, address, num_cpus, progress)
        previous = sweep.output / "search.json"
        report = write_sweep_report(sweep, records, json.loads(previous.read_text()) if previous.exists() else None)
    failed = _failures(records)
    if failed:
        raise CompressError("sweep: node(s) failed (the others finished; run again to retry):\n"
                            + "\n".join(f"  - {f}" for f in failed))
    return report


def refine(sweep: Sweep, best: str) -> tuple[dict[str, Any], list[str]]:
    """Extras adding the neighbours of stack ``best`` (each ``remove: k`` -> k-1, k+1) -> (extras, new stacks)."""
    extras = _extras(sweep.output)
    stack = next(s for s in sweep.stacks if s.name == best)
    axis_of = {v: axis for axis, variants in sweep.axes.items() for v in variants if v != NONE}
    known = {s.variants for s in sweep.stacks}
    added = []
    for pos, variant in enumerate(stack.variants):
        stages = [dict(e) for e in sweep.axes[axis_of[variant]][variant]]
        for index, count in neighbours(stages):
            kind, cfg = next(iter(stages[index].items()))
            new_stages = [*stages[:index], {kind: {**cfg, "remove": count}}, *stages[index + 1:]]
            old = str(cfg["remove"])
            name = variant[:-len(old)] + str(count) if variant.endswith(old) else f"{variant}_remove{count}"
            existing = sweep.axes[axis_of[variant]].get(name)
            if existing is not None and list(existing) != new_stages:
                name = f"{variant}_remove{count}"
            variants = extras.setdefault("variants", {}).setdefault(axis_of[variant], {})
            if name not in sweep.axes[axis_of[variant]]:
                variants[name] = new_stages
            combo = (*stack.variants[:pos], name, *stack.variants[pos + 1:])
            if combo not in known:
                extras.setdefault("stacks", []).append(list(combo))
                added.append(node_name(combo))
    return extras, added


def run_search(run: str | Path, budgets: list[str], objective: str, do_refine: bool = False,
               executor: str = "local", address: str | None = None, progress: bool = True) -> dict[str, Any]:
    sweep = open_run(run)
    with hold_run_lock(sweep.output):
        result = search(stack_rows(sweep), budgets, objective)
        records: dict[str, dict[str, Any]] = {}
        if do_refine and result["best"]:
            extras, added = refine(sweep, result["best"])
            if added:
                log.info("search --refine: running the neighbours of %s: %s", result["best"], ", ".join(added))
                sweep = with_extras(sweep, extras)
                _write_sweep_file(sweep, extras)
                records = execute(sweep, executor, address, None, progress)
                result = {**search(stack_rows(sweep), budgets, objective), "refined": added,
                          "refined_from": result["best"]}
            else:
                result["refined"] = []
        write_atomic(sweep.output / "search.json", json.dumps(result, indent=2))
        saved = json.loads((sweep.output / "report.json").read_text()).get("nodes", {}) \
            if (sweep.output / "report.json").exists() else {}
        write_sweep_report(sweep, {**saved, **records}, result)
    failed = _failures(records)
    if failed:
        raise CompressError("search --refine: node(s) failed:\n" + "\n".join(f"  - {f}" for f in failed))
    return result


__all__ = ["run_sweep", "run_search", "open_run", "load_sweep"]

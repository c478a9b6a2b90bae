"""Who runs the tree's nodes: ``local`` (this process, parents first) or ``ray`` (one Ray task per
node, scheduled when its parent's task has finished; artifacts in the sweep folder, which every
worker must see: one machine, or a filesystem shared by the cluster).

Both return {node name: record}; a failed node's record has ``error``, and its descendants are not
run (``skipped``). Rerunning the sweep finishes only what is missing.
"""

from __future__ import annotations

import logging
from typing import Any

from compress.errors import CompressError
from compress.sweep.spec import Sweep, load_sweep, node_name
from compress.sweep.tree import Node, nodes_of, recipe_of, run_node

log = logging.getLogger("compress")

RAY_MISSING = ("--executor ray needs Ray, an optional extra: pip install -e \".[ray]\" (ray 2.60), "
               "or run with --executor local")


def run_local(sweep: Sweep, nodes: list[Node], progress: bool = True) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for node in nodes:
        parent = records.get(node_name(node[:-1])) if node else None
        if parent is not None and ("error" in parent or parent.get("skipped")):
            records[node_name(node)] = {"node": node_name(node), "skipped": f"parent {parent['node']} failed"}
            continue
        try:
            records[node_name(node)] = run_node(sweep, node, progress)
        except CompressError as e:
            log.error("sweep: node %s failed: %s", node_name(node), e)
            records[node_name(node)] = {"node": node_name(node), "error": str(e)}
    return records


def _ray_task(sweep_path: str, node: list[str], parent: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    """One node inside a Ray worker (imports compress there; the sweep file is read again)."""
    import logging as _logging

    _logging.basicConfig(level=_logging.INFO, format="%(asctime)s compress: %(message)s", datefmt="%H:%M:%S")
    name = node_name(tuple(node))
    if parent is not None and ("error" in parent or parent.get("skipped")):
        return {"node": name, "skipped": f"parent {parent['node']} failed"}
    try:
        return run_node(load_sweep(sweep_path, check_model=False), tuple(node), progress)
    except CompressError as e:
        return {"node": name, "error": str(e)}


def resources(sweep: Sweep, node: Node, cpus: int) -> dict[str, Any]:
    """A node's Ray resources: one GPU if its recipe runs on CUDA, else ``cpus`` CPUs."""
    device = recipe_of(sweep, node).device
    if device.startswith("cuda"):
        return {"num_gpus": 1, "num_cpus": 1}
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": cpus}


def run_ray(sweep: Sweep, nodes: list[Node], address: str | None = None, num_cpus: int | None = None,
            cpus_per_node: int = 1, progress: bool = False) -> dict[str, dict[str, Any]]:
    """``address`` None starts a local Ray instance (``num_cpus`` of this machine, all if None) and
    shuts it down at the end; ``auto`` or ``host:port`` joins a running cluster (left running)."""
    try:
        import ray
    except ImportError:
        raise CompressError(RAY_MISSING) from None
    started = not ray.is_initialized()
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, ignore_reinit_error=True, log_to_driver=True,
                 configure_logging=False)
    else:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True, configure_logging=False)
    log.info("sweep: Ray %s, cluster resources %s", ray.__version__, ray.cluster_resources())
    try:
        task = ray.remote(max_retries=0)(_ray_task)
        refs: dict[Node, Any] = {}
        for node in nodes:
            parent = refs.get(node[:-1]) if node else None  # an ObjectRef argument: runs after it
            refs[node] = task.options(**resources(sweep, node, cpus_per_node)).remote(
                str(sweep.path), list(node), parent, progress)
        results = ray.get([refs[n] for n in nodes])
    except Exception as e:  # noqa: BLE001 - a worker that died (OOM, killed) reaches us as a RayError
        if "ray" in type(e).__module__:
            raise CompressError(f"sweep: a Ray task failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                                "finished nodes are kept: run the sweep again to resume") from None
        raise
    finally:
        if started:
            ray.shutdown()
    return {node_name(n): r for n, r in zip(nodes, results)}


def execute(sweep: Sweep, executor: str = "local", address: str | None = None, num_cpus: int | None = None,
            progress: bool = True) -> dict[str, dict[str, Any]]:
    nodes = nodes_of(sweep)
    if executor == "local":
        if address is not None:
            raise CompressError("--address goes with --executor ray")
        return run_local(sweep, nodes, progress)
    if executor == "ray":
        return run_ray(sweep, nodes, address, num_cpus)
    raise CompressError(f"--executor: {executor!r} is not local or ray")

"""`compress search`: the best finished stack of a sweep within a budget, and the Pareto front.

Budgets are ``KEY<=N``/``KEY>=N`` (also ``<``/``>``) on a stack's last report row: ``weight_mib``,
``disk_mib``, ``peak_mib`` (MiB), ``params_m`` (millions), or any numeric row key (``decode_tok_s``,
``prefill_ms``, ``layers``, ``ppl``...). Objectives: ``ppl``, ``kl`` (mean KL vs baseline), ``top1``,
``mmlu``, or an lm-eval task (``arc_easy`` -> its acc_norm, else acc; or a full key
``tasks.arc_easy.acc``). Pure functions on rows: no model is loaded here.
"""

from __future__ import annotations

import re
from typing import Any

from compress.compare import pareto_front
from compress.errors import CompressError
from compress.evaluate.tasks import PREFIX, higher_is_better

_BUDGET = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.:/-]*)\s*(<=|>=|<|>)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")
DERIVED = {"weight_mib": ("weight_bytes", 1 / 2**20), "disk_mib": ("disk_bytes", 1 / 2**20),
           "peak_mib": ("peak_memory_bytes", 1 / 2**20), "params_m": ("params", 1e-6)}
OBJECTIVES = {"ppl": ("ppl", False), "kl": ("kl_mean", False), "top1": ("top1_agree", True), "mmlu": ("mmlu", True)}


def parse_budget(text: str) -> tuple[str, str, float]:
    m = _BUDGET.match(text)
    if not m:
        raise CompressError(f"--budget {text!r}: write KEY<=N or KEY>=N, e.g. weight_mib<=300 or decode_tok_s>=20")
    return m.group(1), m.group(2), float(m.group(3))


def value(row: dict[str, Any], key: str) -> float | None:
    if key in DERIVED:
        raw, scale = DERIVED[key]
        return None if row.get(raw) is None else row[raw] * scale
    v = row.get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def objective_key(objective: str, rows: list[dict[str, Any]]) -> tuple[str, bool]:
    """(row key, higher is better) of an objective name."""
    if objective in OBJECTIVES:
        return OBJECTIVES[objective]
    keys = [k for r in rows for k in r if isinstance(k, str) and k.startswith(PREFIX)]
    if objective in keys:
        return objective, higher_is_better(objective)
    for metric in ("acc_norm", "acc"):
        if f"{PREFIX}{objective}.{metric}" in keys:
            return f"{PREFIX}{objective}.{metric}", True
    tasks = sorted({k[len(PREFIX):].rpartition(".")[0] for k in keys})
    raise CompressError(f"--objective {objective!r}: not ppl, kl, top1, mmlu"
                        + (f" or a task the sweep measured ({', '.join(tasks)})" if tasks else
                           " (the sweep measured no lm-eval task)"))


def _ok(v: float, op: str, limit: float) -> bool:
    return {"<=": v <= limit, ">=": v >= limit, "<": v < limit, ">": v > limit}[op]


def search(rows: list[dict[str, Any]], budgets: list[str], objective: str) -> dict[str, Any]:
    """Best stack within every budget by the objective; the Pareto front over all stacks (weight
    memory vs objective); why each other stack was left out."""
    if not rows:
        raise CompressError("no finished stack in this sweep; run `compress sweep` first")
    parsed = [parse_budget(b) for b in budgets]
    key, higher = objective_key(objective, rows)
    for bkey, _, _ in parsed:
        if all(value(r, bkey) is None for r in rows):
            known = sorted({*DERIVED, *(k for r in rows for k, v in r.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool))})
            raise CompressError(f"--budget {bkey}: no stack has it; use one of {', '.join(known)}")
    excluded, feasible = {}, []
    for r in rows:
        if value(r, key) is None:
            excluded[r["step"]] = f"no {key} measured"
            continue
        failed = [f"{k} = {value(r, k):.4g} (needs {op} {lim:g})" if value(r, k) is not None else f"no {k}"
                  for k, op, lim in parsed if value(r, k) is None or not _ok(value(r, k), op, lim)]
        if failed:
            excluded[r["step"]] = "; ".join(failed)
        else:
            feasible.append(r)
    pick = (max if higher else min)(feasible, key=lambda r: value(r, key)) if feasible else None
    have = [r for r in rows if value(r, key) is not None and r.get("weight_bytes")]
    front = pareto_front([(r["weight_bytes"], value(r, key)) for r in have], higher)
    return {"budgets": list(budgets), "objective": objective, "key": key, "higher_is_better": higher,
            "best": pick["step"] if pick else None, "best_value": value(pick, key) if pick else None,
            "feasible": [r["step"] for r in feasible], "excluded": excluded,
            "pareto": [have[i]["step"] for i in front],
            "why_none": None if pick else "; ".join(f"{k}: {v}" for k, v in excluded.items())}


def neighbours(stages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(stage index, new remove count) of every layer-count neighbour (remove k-1, k+1) of a variant's
    stages: the stages with a ``remove: k``."""
    found = []
    for i, entry in enumerate(stages):
        kind, cfg = next(iter(entry.items()))
        if isinstance(cfg, dict) and isinstance(cfg.get("remove"), int):
            k = cfg["remove"]
            found += [(i, n) for n in (k - 1, k + 1) if n >= 1]
    return found

"""`compress compare RUN...`: one table across runs and their stages, plus Pareto plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.model_io import read_json, write_atomic
from compress.paths import kind, output_folder, regular_file
from compress.evaluate.tasks import PREFIX as TASK_PREFIX, higher_is_better, metric_columns
from compress.report import COLUMNS, save_figure, table

_NUMBERS = [key for key, _, fmt in COLUMNS if fmt != "{}"] + ["layers", "bits"]


def _row_problems(row: Any, index: int) -> list[str]:
    """What makes a report row unusable for the table and plots (numbers must be numbers)."""
    if not isinstance(row, dict):
        return [f"rows[{index}] should be an object, got {type(row).__name__}"]
    problems = [] if isinstance(row.get("step"), str) else [f"rows[{index}].step should be a string"]
    for key in [*_NUMBERS, *(k for k in row if isinstance(k, str) and k.startswith(TASK_PREFIX))]:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"rows[{index}].{key} should be a number, got {value!r}")
    return problems


def read_report_rows(run: Path) -> list[dict[str, Any]]:
    """The rows of ``run``/report.json; CompressError naming the file if it is absent or malformed."""
    found = kind(run)
    if found != "a folder":
        raise CompressError(f"{run}: {'does not exist' if found == 'absent' else f'is {found}'}; "
                            "give folders written by `compress run`")
    path = run / "report.json"
    if kind(path) != "absent":
        regular_file(path, "report")
    data = read_json(path, "give folders written by `compress run`")
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise CompressError(f"{path}: not a compress report (expected an object with a non-empty list "
                            f"'rows', got {type(data).__name__}); rerun `compress run` to rewrite it")
    problems = [p for i, row in enumerate(rows) for p in _row_problems(row, i)]
    if problems:
        raise CompressError(f"{path}: not a compress report: {'; '.join(problems[:5])}")
    return rows


def load_rows(runs: list[Path]) -> list[dict[str, Any]]:
    """Every stage row of every run, tagged ``run/step``."""
    rows = []
    for run in runs:
        for row in read_report_rows(run):
            rows.append({**row, "run": run.name, "step": f"{run.name}/{row['step']}"})
    return rows


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of points no other point beats on both size (lower) and quality, sorted by size."""
    front = []
    for i, (size, q) in enumerate(points):
        dominated = any(
            (s <= size and (qq >= q if higher_is_better else qq <= q)) and (s, qq) != (size, q)
            for s, qq in points
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _scatter(rows, key: str, label: str, higher_is_better: bool, path: Path, log_y: bool | None = None) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    have = [r for r in rows if r.get(key) is not None and r.get("weight_bytes")]
    if not have:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for run in dict.fromkeys(r["run"] for r in have):
        pts = [r for r in have if r["run"] == run]
        ax.plot([r["weight_bytes"] / 2**20 for r in pts], [r[key] for r in pts], marker="o", label=run)
        for r in pts:
            ax.annotate(r["step"].split("/", 1)[1], (r["weight_bytes"] / 2**20, r[key]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    points = [(r["weight_bytes"], r[key]) for r in have]
    front = pareto_front(points, higher_is_better)
    ax.plot([points[i][0] / 2**20 for i in front], [points[i][1] for i in front], "k--", lw=1,
            label="Pareto front")
    ax.set_xlabel("weight memory as stored (MiB)")
    ax.set_ylabel(label)
    if (not higher_is_better) if log_y is None else log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_title(f"{label} vs weight memory")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def _decode_bars(rows, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = [r for r in rows if r.get("decode_tok_s")]
    if not have:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(have)), 4.2), dpi=120)
    ax.bar(range(len(have)), [r["decode_tok_s"] for r in have], color="tab:green")
    ax.set_xticks(range(len(have)))
    ax.set_xticklabels([r["step"] for r in have], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("decode tokens/s (plain generate)")
    ax.set_title(f"decode speed per stage ({have[0].get('latency_setting', '')})")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def stage_plots(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """Perplexity, MMLU, KL and each lm-eval task metric vs weight memory (Pareto front marked),
    decode speed per stage: the file names written to ``out`` (plots without data are skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if len(rows) > 1 and _scatter(rows, "ppl", "perplexity (log scale, lower is better)", False, out / "ppl_vs_weights.png"):
        plots.append("ppl_vs_weights.png")
    if len(rows) > 1 and _scatter(rows, "mmlu", "MMLU accuracy (macro, higher is better)", True, out / "mmlu_vs_weights.png"):
        plots.append("mmlu_vs_weights.png")
    if len(rows) > 1 and _scatter(rows, "kl_mean", "mean KL vs baseline (nats/token, lower is better)", False,
                                  out / "kl_vs_weights.png", log_y=False):
        plots.append("kl_vs_weights.png")
    for key, header in metric_columns(rows) if len(rows) > 1 else []:
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in key.removeprefix(TASK_PREFIX))
        better = "higher" if higher_is_better(key) else "lower"
        if _scatter(rows, key, f"{header} (lm-eval, {better} is better)", higher_is_better(key),
                    out / f"task_{name}_vs_weights.png", log_y=False):
            plots.append(f"task_{name}_vs_weights.png")
    if _decode_bars(rows, out / "decode_tok_s.png"):
        plots.append("decode_tok_s.png")
    return plots


def compare_runs(runs: list[Path], out: Path) -> str:
    """Write compare.md and plots to ``out``; return the Markdown table."""
    output_folder(out, "--out")
    rows = load_rows(runs)
    plots = stage_plots(rows, out)
    md = table(rows)
    body = ["# compress compare", "", md, "", *(f"![{p}]({p})" for p in plots), ""]
    write_atomic(out / "compare.md", "\n".join(body))
    write_atomic(out / "compare.json", json.dumps(rows, indent=2, default=str))
    return md

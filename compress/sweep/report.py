"""The sweep report: one row per stack (its last step, as `compress compare` shows it), Pareto plots
of quality vs weight memory and vs decode speed, and the tree of shared work with each node's time.
Written to <sweep output>/report.json and report.md (plots in plots/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.compare import pareto_front
from compress.evaluate.tasks import higher_is_better, metric_columns
from compress.model_io import write_atomic
from compress.report import save_figure, table
from compress.sweep.spec import BASELINE, Sweep, node_name
from compress.sweep.tree import folder_of, nodes_of

QUALITY = [("ppl", "perplexity (lower is better)", False), ("kl_mean", "mean KL vs baseline (lower is better)", False),
           ("mmlu", "MMLU accuracy (higher is better)", True)]


def stack_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """Each finished stack's last row (deltas dropped: the table recomputes them vs the baseline)."""
    rows = []
    for stack in sweep.stacks:
        path = folder_of(sweep, stack.variants) / "report.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        if not report.get("complete"):
            continue
        last = {k: v for k, v in report["rows"][-1].items() if not k.endswith("_delta_pct")}
        rows.append({**last, "step": stack.name, "run": stack.name,
                     "stages": [s["name"] for s in report.get("stages", [])]})
    rows.sort(key=lambda r: r["step"] != BASELINE)  # deltas are vs the first row
    return rows


def quality_metrics(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    found = [q for q in QUALITY if any(r.get(q[0]) is not None for r in rows)]
    found += [(key, f"{header} (lm-eval)", higher_is_better(key)) for key, header in metric_columns(rows)]
    return found


def _pareto_plot(rows, key: str, label: str, higher: bool, x_key: str, path: Path, mark: str | None = None) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = [r for r in rows if r.get(key) is not None and r.get(x_key)]
    if len(have) < 2:
        return False
    scale = 1 / 2**20 if x_key == "weight_bytes" else 1.0
    xs, ys = [r[x_key] * scale for r in have], [r[key] for r in have]
    # Pareto: less weight memory / more decode speed, and better quality
    size = xs if x_key == "weight_bytes" else [-x for x in xs]
    front = pareto_front(list(zip(size, ys)), higher)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    ax.scatter(xs, ys, color="tab:blue")
    for r, x, y in zip(have, xs, ys):
        ax.annotate(r["step"], (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points",
                    color="tab:red" if r["step"] == mark else "black")
    fx = sorted((xs[i], ys[i]) for i in front)
    ax.plot([p[0] for p in fx], [p[1] for p in fx], "k--", lw=1, label="Pareto front")
    if mark is not None:
        best = [(x, y) for r, x, y in zip(have, xs, ys) if r["step"] == mark]
        if best:
            ax.scatter([best[0][0]], [best[0][1]], s=120, facecolors="none", edgecolors="tab:red", label=f"best: {mark}")
    ax.set_xlabel("weight memory as stored (MiB)" if x_key == "weight_bytes" else "decode tokens/s")
    ax.set_ylabel(label)
    ax.set_title(f"stacks: {label.split(' (')[0]} vs {'weight memory' if x_key == 'weight_bytes' else 'decode speed'}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plots(rows, out: Path, mark: str | None = None) -> list[str]:
    written = []
    for key, label, higher in quality_metrics(rows):
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in key)
        for x_key, tag in (("weight_bytes", "weights"), ("decode_tok_s", "decode")):
            name = f"plots/{safe}_vs_{tag}.png"
            if _pareto_plot(rows, key, label, higher, x_key, out / name, mark):
                written.append(name)
    return written


def tree_lines(sweep: Sweep, records: dict[str, dict[str, Any]]) -> list[str]:
    """The shared-work tree, one node per line, indented by depth: its own stages' and evaluation's
    time (from its report) and the node's wall time in this sweep run."""
    stacks = {s.name for s in sweep.stacks}
    lines = []
    for node in sorted(nodes_of(sweep)):  # depth first: a node's children right under it
        name = node_name(node)
        report_path = folder_of(sweep, node) / "report.json"
        own = "not run"
        if report_path.exists():
            rows = json.loads(report_path.read_text())["rows"]
            last = rows[-1]
            own = f"own step {(last.get('stage_wall_s') or 0) + (last.get('eval_wall_s') or 0):.1f} s"
        rec = records.get(name, {})
        state = ("error: " + rec["error"].splitlines()[0][:120]) if "error" in rec else (
            rec.get("skipped") or ("done before" if rec.get("done_before") else
                                   (f"node wall {rec['wall_s']:.1f} s" if rec.get("wall_s") is not None else "")))
        hits = [e["what"] for e in rec.get("cache", []) if e.get("hit")]
        shared = f"; reused: {', '.join(sorted(set(hits)))}" if hits else ""
        label = node[-1] if node else BASELINE
        tag = " (stack)" if name in stacks else " (shared prefix)"
        lines.append(f"{'  ' * len(node)}- **{label}**{tag}: {own}; {state}{shared}")
    return lines


def write_sweep_report(sweep: Sweep, records: dict[str, dict[str, Any]], search: dict | None = None) -> dict:
    out = sweep.output
    rows = stack_rows(sweep)
    mark = (search or {}).get("best")
    names = plots(rows, out, mark) if rows else []
    done = {r["step"] for r in rows}
    report = {"sweep": str(sweep.path), "output": str(out), "complete": done == {s.name for s in sweep.stacks},
              "stacks": [s.name for s in sweep.stacks], "rows": rows, "nodes": records, "search": search,
              "plots": names}
    md = ["# compress sweep", "", f"Sweep file: `{sweep.path}`", "",
          f"{len(done)} of {len(sweep.stacks)} stacks finished.", "", table(rows) if rows else "(no stack finished)", ""]
    if search:
        md += search_markdown(search)
    md += ["## Shared work", "", "Each node runs once; its children start from its results.", "",
           *tree_lines(sweep, records), ""]
    md += [f"![{n}]({n})" for n in names] + [""]
    write_atomic(out / "report.json", json.dumps(report, indent=2, default=str))
    write_atomic(out / "report.md", "\n".join(md))
    return report


def search_markdown(search: dict[str, Any]) -> list[str]:
    lines = ["## Search", "", f"Budget: {', '.join(search['budgets']) or 'none'}; objective: "
             f"{search['objective']} (`{search['key']}`, {'higher' if search['higher_is_better'] else 'lower'} is better).", ""]
    lines.append(f"**Best within the budget: {search['best']}** ({search['key']} = {search['best_value']:.4g})"
                 if search.get("best") else f"**No stack meets the budget** ({search.get('why_none', '')})")
    lines += ["", "Pareto front (weight memory vs objective): " + ", ".join(search["pareto"]), ""]
    if search.get("refined"):
        lines += [f"Refined: ran {', '.join(search['refined'])} (neighbours of the previous best).", ""]
    return lines

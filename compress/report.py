"""report.json (machine-readable), report.md (tables) and plots/*.png for a run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.evaluate.tasks import PREFIX as TASK_PREFIX, metric_columns, stderr_key
from compress.model_io import disk_full_error, is_disk_full, write_atomic

COLUMNS = [  # (key, header, format)
    ("step", "step", "{}"),
    ("layers", "layers", "{}"),
    ("params", "params (M)", "{:.2f}"),
    ("bits", "bits", "{}"),
    ("weight_bytes", "weights (MiB)", "{:.1f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("kl_mean", "KL", "{:.4f}"),
    ("top1_agree", "top-1", "{:.3f}"),
    ("mmlu", "MMLU", "{:.3f}"),
    ("disk_bytes", "disk (MiB)", "{:.1f}"),
    ("peak_memory_bytes", "peak mem (MiB)", "{:.0f}"),
    ("prefill_ms", "prefill ms", "{:.1f}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("stage_wall_s", "stage s", "{:.1f}"),
    ("eval_wall_s", "eval s", "{:.1f}"),
]
_SCALE = {"params": 1e-6, "weight_bytes": 1 / 2**20, "peak_memory_bytes": 1 / 2**20, "disk_bytes": 1 / 2**20}
_DELTAS = ("params", "weight_bytes", "ppl", "mmlu", "prefill_ms", "decode_tok_s")


def columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The table's columns that some row has: COLUMNS, with one per lm-eval task metric after MMLU."""
    at = next(i for i, c in enumerate(COLUMNS) if c[0] == "mmlu") + 1
    tasks = [(key, header, "{:.3f}") for key, header in metric_columns(rows)]
    return [c for c in COLUMNS[:at] + tasks + COLUMNS[at:] if any(r.get(c[0]) is not None for r in rows)]


def with_deltas(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row plus ``<key>_delta_pct``: change vs the baseline row, in percent."""
    base = rows[0]
    out = []
    for row in rows:
        extra = {}
        for key in (*_DELTAS, *(key for key, _ in metric_columns([row]))):
            if row.get(key) is not None and base.get(key):
                extra[f"{key}_delta_pct"] = 100.0 * (row[key] - base[key]) / base[key]
        out.append({**row, **extra})
    return out


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    text = fmt.format(value * _SCALE.get(key, 1))
    if key.startswith(TASK_PREFIX) and row.get(stderr_key(key)) is not None:
        text += f" ±{row[stderr_key(key)]:.3f}"
    delta = row.get(f"{key}_delta_pct")
    if delta is not None and row["step"] != "baseline":
        text += f" ({delta:+.1f}%)"
    return text


def table(rows: list[dict[str, Any]]) -> str:
    """The stage table as Markdown (columns that no row has are left out)."""
    cols = columns(rows)
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in with_deltas(rows):
        lines.append("| " + " | ".join(_cell(row, k, f) for k, _, f in cols) + " |")
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    """Write a plot and close it; a full disk or an unwritable place is a CompressError (no partial file)."""
    import matplotlib.pyplot as plt

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    except OSError as e:
        if path.is_file():
            path.unlink()
        if is_disk_full(e):
            raise disk_full_error(path.parent, path.name, None) from None
        raise CompressError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def plot_scores(stage: dict[str, Any], path: Path) -> bool:
    """Bar chart of per-layer scores, removed layers highlighted. False if the stage has none."""
    scores = stage.get("details", {}).get("scores")
    if not scores:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    removed = set(stage["details"].get("removal_order", []))
    fig, ax = plt.subplots(figsize=(max(6, len(scores) * 0.28), 3.6), dpi=120)
    colors = ["tab:red" if i in removed else "tab:blue" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    ax.set_xlabel("layer index (input to this stage)")
    ax.set_ylabel(f"{stage['details'].get('metric')} score")
    ax.set_title(f"{stage['name']}: per-layer {stage['details'].get('metric')} (red = removed)")
    ax.set_xticks(range(len(scores)))
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    rows = report["rows"]
    ppl_data = next((r.get("ppl_data") for r in rows if r.get("ppl_data")), None)
    parts = [f"# compress report: {Path(report['recipe']).name}", ""]
    if not report.get("complete", True):
        parts += [f"> **Incomplete**: {report['steps_done']} of {report['steps_total']} steps are done "
                  f"(last: {rows[-1]['step']}); the run stopped or is still running. Run the same "
                  "command again to resume.", ""]
    parts += [f"Model `{report['model']}` on {report['device']} ({report['dtype']}); "
             f"perplexity on {ppl_data or '(not evaluated)'}.", "", table(rows), ""]
    for stage in report["stages"]:
        parts.append(f"- **{stage['name']}**: {stage['summary']}")
    parts.append("")
    parts += [f"![{Path(p).stem}]({p})" for p in plots]
    if report.get("verify"):
        from compress.verify.verify import markdown_rows

        parts += ["", *markdown_rows(report["verify"])]
    v = report["versions"]
    parts += ["", f"compress {v['compress']}, torch {v['torch']}, transformers {v['transformers']}, "
                  f"Python {v['python']}; {report['machine']['platform']}", ""]
    return "\n".join(parts)


def write_report(folder: Path, report: dict[str, Any]) -> None:
    from compress.compare import stage_plots
    from compress.heal.plot import plot_heal_curve

    report = {**report, "rows": with_deltas(report["rows"])}
    plots = []
    for stage in report["stages"]:
        rel = f"plots/{stage['name']}-scores.png"
        if plot_scores(stage, folder / rel):
            plots.append(rel)
        if plot_heal_curve(stage, folder / f"plots/{stage['name']}-loss.png"):
            plots.append(f"plots/{stage['name']}-loss.png")
    run_rows = [{**r, "run": folder.name, "step": f"{folder.name}/{r['step']}"} for r in report["rows"]]
    plots += [f"plots/{name}" for name in stage_plots(run_rows, folder / "plots")]
    write_atomic(folder / "report.json", json.dumps(report, indent=2, default=str))
    write_atomic(folder / "report.md", markdown(report, plots))


_PROVENANCE_KEYS = {"stage": str, "recipe_path": str, "source": dict, "original_num_layers": int,
                    "kept_layers": list, "removed_layers": list, "stages": list, "versions": dict}


def provenance_problems(prov: Any) -> list[str]:
    """Why ``prov`` is not a compress.json that `compress inspect` can show ([] if it is)."""
    if not isinstance(prov, dict):
        return [f"expected a JSON object, got {type(prov).__name__}"]
    problems = []
    for key, typ in _PROVENANCE_KEYS.items():
        if key not in prov:
            problems.append(f"missing key {key!r}")
        elif not isinstance(prov[key], typ) or isinstance(prov[key], bool):
            problems.append(f"{key!r} should be {typ.__name__}, got {type(prov[key]).__name__}")
    for i, st in enumerate(prov["stages"] if isinstance(prov.get("stages"), list) else []):
        if not isinstance(st, dict) or not all(isinstance(st.get(k), str) for k in ("name", "summary")):
            problems.append(f"stages[{i}] should be an object with string 'name' and 'summary'")
    return problems


def read_provenance(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's compress.json; CompressError naming the file and what is wrong with it."""
    from compress.model_io import PROVENANCE, read_json
    from compress.paths import kind, regular_file

    found = kind(checkpoint)
    if found != "a folder":
        why = "the folder does not exist" if found == "absent" else f"{checkpoint} is {found}, not a folder"
        raise CompressError(f"{checkpoint}: no {PROVENANCE}; {why} (give a checkpoint folder written by "
                            "`compress run`)")
    path = checkpoint / PROVENANCE
    if kind(path) != "absent":
        regular_file(path, PROVENANCE)
    prov = read_json(path, "was it written by `compress run`?")
    problems = provenance_problems(prov)
    if problems:
        raise CompressError(f"{path}: not a compress provenance file ({'; '.join(problems)}); "
                            "it is written by `compress run` with each saved checkpoint")
    return prov


def describe_provenance(checkpoint: Path, prov: dict[str, Any]) -> str:
    """`compress inspect`: what a checkpoint is, from its compress.json (checked by read_provenance)."""
    source = prov["source"]
    lines = [f"checkpoint {checkpoint}: stage {prov['stage']} of recipe {prov['recipe_path']}",
             f"source: {source.get('model')} (revision {source.get('revision') or source.get('commit')}, "
             f"sha256 {source.get('content_sha256')})",
             f"layers: kept {len(prov['kept_layers'])} of {prov['original_num_layers']}; "
             f"removed (original indices) {prov['removed_layers']}"]
    lines += [f"  - {st['name']}: {st['summary']}" for st in prov["stages"]]
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()))
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_head_heatmap(scores: list[list[float]], path: Path, title: str) -> None:
    """Layers x heads heat map of head importance."""
    plt = _pyplot()
    n_layers, n_heads = len(scores), len(scores[0])
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * n_heads + 2.5), max(4, 0.22 * n_layers + 1.5)), dpi=120)
    im = ax.imshow(scores, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xlabel("attention head (query)")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="importance (higher = keep)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_channel_quantiles(scores: list[list[float]], path: Path, title: str) -> None:
    """Per layer: quantiles of MLP channel importance (where the weak channels sit)."""
    import statistics

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    for q in (10, 25, 50, 90):
        ys = [statistics.quantiles(s, n=100)[q - 1] for s in scores]
        ax.plot(range(len(scores)), ys, marker=".", label=f"{q}th percentile")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("channel importance (log)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)

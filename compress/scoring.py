"""`compress score`: per-layer importance of a model, as a table, scores.json and a plot."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.data.local import text_files
from compress.data.calibration import calibration_data
from compress.data.sources import CalibrationConfig, source_label
from compress.errors import CompressError
from compress.importance import (BLOCK_METRICS, DESCRIPTIONS, METRICS, canonical_metric, lowest,
                                 metric_needs_calibration, score_layers)
from compress.importance.angular_block import angular_block_distances, best_block
import compress.model_io as model_io
from compress.model_checks import memory_problem, positions_problem
from compress.model_io import (PICKLE_FLAG_HINT, check_fits, load_model, local_model_dir, model_facts, read_config, resolve_device,
                               resolve_dtype, write_atomic)
from compress.paths import output_folder
from compress.report import plot_scores

log = logging.getLogger("compress")


@dataclass
class LayerScores:
    model: str
    metric: str
    scores: list[float]
    data: str | None

    def order(self) -> list[int]:
        """Layers from least to most important."""
        return lowest(self.scores, len(self.scores))

    def table(self) -> str:
        rank = {layer: r for r, layer in enumerate(self.order())}
        lines = [f"{self.metric} per layer of {self.model} ({DESCRIPTIONS[self.metric]}; "
                 f"data: {self.data or 'none'}); rank 0 = removed first",
                 "layer  score       rank"]
        lines += [f"{i:>5}  {s:<10.6f}  {rank[i]:>4}" for i, s in enumerate(self.scores)]
        lines.append(f"removal order: {self.order()}")
        return "\n".join(lines)


@dataclass
class BlockScores:
    """angular_block: d(x^l, x^{l+n}) for every block start l; the lowest block is removed."""

    model: str
    metric: str
    n: int
    block_distances: list[float]
    data: str | None

    def block(self) -> list[int]:
        first = best_block(self.block_distances)
        return [first, first + self.n]

    def table(self) -> str:
        first, end = self.block()
        lines = [f"{self.metric} of {self.model} with n = {self.n} ({DESCRIPTIONS[self.metric]}; "
                 f"data: {self.data or 'none'})",
                 "start l  layers      d(x^l, x^l+n)"]
        lines += [f"{i:>7}  {f'{i}..{i + self.n - 1}':<10}  {d:.6f}" for i, d in enumerate(self.block_distances)]
        lines.append(f"block removed: layers {first}..{end - 1} ([{first}, {end}))")
        return "\n".join(lines)


UNIT_METRICS = ("heads", "heads_ablation", "channels")


def check_block_size(metric: str, remove: int | None, num_layers: int) -> None:
    """--remove is the block size of angular_block and means nothing for the other metrics."""
    if metric in BLOCK_METRICS and remove is None:
        raise CompressError(f"--metric {metric} scores blocks of n consecutive layers: give n with --remove N "
                            f"(1..{num_layers - 1}); it prints d(x^l, x^l+n) for every start l")
    if metric not in BLOCK_METRICS and remove is not None:
        raise CompressError(f"--remove is the block size of --metric angular_block; {metric} scores single "
                            "layers: drop --remove")
    if remove is not None and not 1 <= remove < num_layers:
        raise CompressError(f"--remove: {remove} is not a block size for a model with {num_layers} layers "
                            f"(1..{num_layers - 1})")


def unit_scores(net, metric: str, batches, model: str, out: Path | None) -> str:
    """Head or channel importance: a text summary, and with ``out`` a JSON file and a plot."""
    from compress.importance.channels import channel_scores
    from compress.importance.heads import head_scores
    from compress.report import plot_channel_quantiles, plot_head_heatmap

    if metric == "channels":
        scores = [s.tolist() for s in channel_scores(net, batches)]
        text = "\n".join(f"layer {i:>3}: mean {sum(s) / len(s):.4g}, min {min(s):.4g}" for i, s in enumerate(scores))
        if out:
            plot_channel_quantiles(scores, out / "channels-scores.png", f"MLP channel importance of {Path(model).name}")
    else:
        kind = "ablation" if metric == "heads_ablation" else "norm"
        scores = head_scores(net, batches, kind).tolist()
        text = "\n".join(f"layer {i:>3}: " + " ".join(f"{v:8.4f}" for v in row) for i, row in enumerate(scores))
        if out:
            plot_head_heatmap(scores, out / f"{metric}-scores.png", f"head importance ({kind}) of {Path(model).name}")
    if out:
        write_atomic(out / "scores.json", json.dumps({"model": model, "metric": metric, "scores": scores}))
    return f"{metric} importance of {model} (higher = keep)\n{text}"


def check_calibration_fits(facts, samples: int, seq_len: int) -> None:
    """CompressError before loading if --seq-len exceeds the model's positions or the calibration
    windows (and their hidden states) exceed the free CPU memory."""
    problems = [positions_problem("--seq-len", seq_len, facts.max_position_embeddings),
                memory_problem("--samples x --seq-len", samples, seq_len, facts.hidden_size,
                               model_io.available_bytes(torch.device("cpu")))]
    problems = [p for p in problems if p]
    if problems:
        raise CompressError("; ".join(problems))


def score_model(model: str, *, metric: str, data: str | None, dataset: str | None, split: str,
                samples: int, seq_len: int, seed: int, dtype: str, device: str,
                out: Path | None, layerwise: bool | None = None, sampling: str = "random",
                remove: int | None = None, allow_pickle: bool = False) -> LayerScores | BlockScores | str:
    """Score the layers of ``model``. ``layerwise``: keep the weights on the CPU and run one layer at
    a time on ``device`` (None: only if the weights do not fit the device). ``remove``: the block
    size n of angular_block. ``sampling``: random | strided calibration windows. ``allow_pickle``:
    also read .bin weights (``--allow-pickle-weights``)."""
    if metric not in METRICS and metric not in UNIT_METRICS:
        raise CompressError(f"--metric: unknown metric {metric!r}; supported: {sorted([*METRICS, *UNIT_METRICS])}")
    metric = canonical_metric(metric)
    source = None
    if metric in UNIT_METRICS or metric_needs_calibration(metric):
        if (data is None) == (dataset is None):
            raise CompressError("give exactly one of --data (local text) or --dataset (pg19 or a hub id)")
        if data is not None:
            if not Path(data).exists():
                raise CompressError(f"--data: {data} does not exist")
            text_files(Path(data))  # a FIFO, a device or an empty file: refused before the model loads
        source = CalibrationConfig(path=data, dataset=dataset, split=split, samples=samples, seq_len=seq_len,
                                   seed=seed, sampling=sampling)
    local = local_model_dir(model)
    model = str(local) if local else model
    run_on = resolve_device(device)
    if out is not None:
        output_folder(out, "--out", [local] if local else [])
    config = read_config(model)
    facts = model_facts(config)
    check_block_size(metric, remove, facts.num_layers)
    if source is not None:
        check_calibration_fits(facts, samples, seq_len)
    torch_dtype = resolve_dtype(dtype, config)
    if layerwise is None:  # auto: layer by layer when the weights do not fit the device
        try:
            check_fits(config, torch_dtype, run_on)
            layerwise = False
        except CompressError:
            if run_on.type == "cpu":
                raise
            layerwise = True
            log.warning("weights do not fit %s: scoring layer by layer, weights in CPU memory", run_on)
    net, tokenizer = load_model(model, dtype=torch_dtype, device=torch.device("cpu") if layerwise else run_on,
                                allow_pickle=allow_pickle, pickle_hint=PICKLE_FLAG_HINT)
    batches = []
    if source is not None:
        batches = calibration_data(tokenizer, source, "--data/--dataset")
    if metric in UNIT_METRICS:
        return unit_scores(net, metric, batches, model, out)
    if metric in BLOCK_METRICS:
        distances = angular_block_distances(net, batches, remove, layerwise_on=run_on if layerwise else None)
        blocks = BlockScores(model, metric, remove, distances, source_label(source))
        if out is not None:
            write_atomic(out / "scores.json", json.dumps({**blocks.__dict__, "block": blocks.block()}, indent=2))
        return blocks
    scores = score_layers(net, metric, batches, layerwise_on=run_on if layerwise else None)
    result = LayerScores(model, metric, scores, source_label(source) if source else None)
    if out is not None:
        write_atomic(out / "scores.json", json.dumps({**result.__dict__, "order": result.order()}, indent=2))
        plot_scores({"name": Path(model).name, "details": {"scores": result.scores, "metric": metric,
                                                          "removal_order": []}}, out / f"{metric}-scores.png")
    return result

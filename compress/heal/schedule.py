"""Learning-rate schedule and the order of the training windows (pure functions)."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): linear warm-up
    over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def window_order(num_windows: int, seed: int, epoch: int) -> list[int]:
    """The training windows of epoch ``epoch`` in a seeded random order (the same on every rerun)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_windows, generator=gen).tolist()


def micro_batch(position: int, num_windows: int, batch_size: int, seed: int) -> list[int]:
    """Window indices of micro-batch ``position`` (0-based over the whole run): epochs follow each
    other, each in its own order; a batch never spans two epochs (the last of an epoch may be short)."""
    per_epoch = -(-num_windows // batch_size)
    epoch, index = divmod(position, per_epoch)
    order = window_order(num_windows, seed, epoch)
    return order[index * batch_size:(index + 1) * batch_size]


def total_steps(num_windows: int, batch_size: int, grad_accum: int, steps: int | None, epochs: float | None) -> int:
    """Optimizer steps of the run: ``steps``, or ``epochs`` passes over the windows."""
    if steps is not None:
        return steps
    per_epoch = -(-num_windows // batch_size)
    return max(1, math.ceil((epochs or 1.0) * per_epoch / grad_accum))

"""Order baselines (ShortGPT Table 3): sequential removes layer 0 first, reverse the last first.

Scores are chosen so that "lowest score is removed first" holds for every metric."""

from __future__ import annotations


def sequential_scores(num_layers: int) -> list[float]:
    return [float(i) for i in range(num_layers)]


def reverse_scores(num_layers: int) -> list[float]:
    return [float(num_layers - 1 - i) for i in range(num_layers)]

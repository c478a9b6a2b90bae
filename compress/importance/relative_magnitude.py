"""Relative magnitude ||f(x)|| / ||x + f(x)|| (Samragh et al. 2023; ShortGPT Sec. 4.1, Table 3),
where the layer computes x + f(x): f(x) = x_out - x_in. Mean over tokens; low = removed first."""

from __future__ import annotations

import torch

from compress.importance.statistic import TokenMeanStatistic


class RelativeMagnitude(TokenMeanStatistic):
    name = "relative_magnitude"

    def per_token(self, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        x_in, x_out = x_in.float(), x_out.float()
        return (x_out - x_in).norm(dim=-1) / x_out.norm(dim=-1).clamp_min(1e-12)

"""Angular distance between a layer's input and output (Gromov et al. 2024, arXiv 2403.17887,
with n = 1): d_i = E_t [ arccos(cos(x_in, x_out)) / pi ]. Low = redundant, removed first."""

from __future__ import annotations

import math

import torch

from compress.importance.bi import token_cosine
from compress.importance.statistic import TokenMeanStatistic


class AngularDistance(TokenMeanStatistic):
    name = "angular"

    def per_token(self, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        return torch.arccos(token_cosine(x_in, x_out).clamp(-1.0, 1.0)) / math.pi

"""Per-layer angular distance between a layer's input and output: d_i = E_t [ arccos(cos(x_in,
x_out)) / pi ], the mean over *all* non-padding tokens. A per-layer variant of Gromov et al. 2024
(arXiv 2403.17887), who measure it on the last token only and remove the best contiguous block of
n layers: that method is ``angular_block`` (compress.importance.angular_block). Low = removed first."""

from __future__ import annotations

import math

import torch

from compress.importance.bi import token_cosine
from compress.importance.statistic import TokenMeanStatistic


class AngularDistance(TokenMeanStatistic):
    name = "angular_layer"

    def per_token(self, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        return torch.arccos(token_cosine(x_in, x_out).clamp(-1.0, 1.0)) / math.pi

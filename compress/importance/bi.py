"""Block Influence (ShortGPT, Men et al. 2024, arXiv 2403.03853, eq. 2).

    BI_i = 1 - E_{X,t} [ X_{i,t}^T X_{i+1,t} / (||X_{i,t}||_2 ||X_{i+1,t}||_2) ]

X_i is the *input* of decoder layer i and X_{i+1} its output, both taken with forward hooks on the
layer (not ``output_hidden_states``, whose last entry is after the final norm). The mean runs over
every non-padding token of the calibration set, accumulated in float32. Low BI = the layer barely
changes its input = removed first.
"""

from __future__ import annotations

import torch

from compress.importance.statistic import TokenMeanStatistic


def token_cosine(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per token, float32. (B, T, H), (B, T, H) -> (B, T)."""
    return torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1, eps=1e-8)


class BlockInfluence(TokenMeanStatistic):
    """Accumulates mean token cosine per layer; score = 1 - mean cosine."""

    name = "bi"

    def per_token(self, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        return token_cosine(x_in, x_out)

    def finalize(self, mean: float) -> float:
        return 1.0 - mean

"""Per-layer statistics accumulated over calibration batches from (layer input, layer output)."""

from __future__ import annotations

import torch


class TokenMeanStatistic:
    """Mean over non-padding tokens of a per-token quantity, one accumulator per layer.

    Subclasses define ``per_token(x_in, x_out) -> (B, T)`` and ``finalize(mean) -> score``.
    Sums are kept in float64 on the CPU so the order of batches does not change the result.
    """

    name = "token_mean"

    def __init__(self, num_layers: int) -> None:
        self.sums = torch.zeros(num_layers, dtype=torch.float64)
        self.counts = torch.zeros(num_layers, dtype=torch.float64)

    def per_token(self, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finalize(self, mean: float) -> float:
        return mean

    def update(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None:
        """x_in, x_out: (B, T, H); mask: (B, T), 1 for real tokens, 0 for padding."""
        values = self.per_token(x_in, x_out)  # (B, T) float32
        keep = mask.to(values.device).bool()
        self.sums[layer] += values[keep].double().sum().cpu()
        self.counts[layer] += keep.sum().cpu().double()

    def scores(self) -> list[float]:
        if bool((self.counts == 0).any()):
            missing = [i for i, c in enumerate(self.counts.tolist()) if c == 0]
            raise RuntimeError(f"no tokens were seen for layers {missing}")
        return [self.finalize(m) for m in (self.sums / self.counts).tolist()]

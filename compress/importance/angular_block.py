"""Block angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
Layers", arXiv 2403.17887):

    d(x^l, x^{l+n}) = E_samples [ arccos( x^l_T . x^{l+n}_T / (||x^l_T|| ||x^{l+n}_T||) ) / pi ]

x^l is the *input* of decoder layer l (x^L: the last layer's output, before the final norm), taken
at the last non-padding token T of each sequence. The contiguous block [l*, l*+n) with the smallest
distance is removed: its n layers together change the last token's representation least.

Hidden states come from forward hooks on the decoder layers (full model, compress.importance.capture)
or from the layer-wise engine (compress.layerwise); both give the same states.
"""

from __future__ import annotations

import math

import torch

from compress.importance.capture import capture_layer_statistics
from compress.layerwise import run_layerwise
from compress.surgery import decoder_layers


def last_token_states(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last non-padding token, float32. (B, T, H), (B, T) -> (B', H);
    rows with no real token are dropped. Works for right and left padding."""
    keep = mask.to(x.device).bool()
    positions = torch.arange(keep.shape[1], device=x.device).expand_as(keep)
    last = torch.where(keep, positions, -1).amax(dim=1)  # (B,)
    rows = (last >= 0).nonzero().squeeze(1)
    return x[rows, last[rows]].float()


def block_angular_distances(states: torch.Tensor, n: int) -> list[float]:
    """d(x^l, x^{l+n}) for l = 0 .. L-n. states: (L+1, N, H), boundary l = input of layer l,
    boundary L = last layer's output; N samples. Cosines in float32, mean in float64."""
    boundaries = states.shape[0]
    if not 1 <= n < boundaries:
        raise ValueError(f"block size n={n} must be between 1 and {boundaries - 1} (the number of layers)")
    a, b = states[: boundaries - n].float(), states[n:].float()  # (L+1-n, N, H) each
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8).clamp(-1.0, 1.0)  # (L+1-n, N)
    return (torch.arccos(cos) / math.pi).double().mean(dim=1).tolist()


def best_block(distances: list[float]) -> int:
    """l* = argmin_l d(x^l, x^{l+n}); ties go to the lower l."""
    return min(range(len(distances)), key=lambda i: (distances[i], i))


class LastTokenStates:
    """Collects x^l at the last non-padding token for every boundary l = 0 .. L, batch by batch."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.parts: list[list[torch.Tensor]] = [[] for _ in range(num_layers + 1)]

    def update(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None:
        self.parts[layer].append(last_token_states(x_in, mask).cpu())
        if layer == self.num_layers - 1:
            self.parts[layer + 1].append(last_token_states(x_out, mask).cpu())

    def states(self) -> torch.Tensor:
        """(L+1, N, H) float32."""
        if not self.parts[0]:
            raise RuntimeError("no calibration batches were seen")
        return torch.stack([torch.cat(p) for p in self.parts])


@torch.no_grad()
def last_token_hidden_states(model, batches: list[dict[str, torch.Tensor]], progress: bool = True,
                             layerwise_on: torch.device | None = None) -> torch.Tensor:
    """(L+1, N, H): every layer boundary's hidden state at each sequence's last real token."""
    stat = LastTokenStates(len(decoder_layers(model)))
    if layerwise_on is not None:
        run_layerwise(model, batches, stat.update, layerwise_on, progress=progress)
    else:
        capture_layer_statistics(model, batches, [stat], progress)
    return stat.states()


def angular_block_distances(model, batches: list[dict[str, torch.Tensor]], n: int, progress: bool = True,
                            layerwise_on: torch.device | None = None) -> list[float]:
    """d(x^l, x^{l+n}) for every block start l = 0 .. L-n of ``model`` on ``batches``."""
    return block_angular_distances(last_token_hidden_states(model, batches, progress, layerwise_on), n)

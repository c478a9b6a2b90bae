"""Output similarity between two runs of a model on the same batches (SLM's merge criterion).

* ``cosine``: mean over non-padding tokens of cos(h_a, h_b) of the final hidden states (what the
  SLM reference code compares);
* ``cka``: linear CKA (Kornblith et al. 2019, arXiv 1905.00414) between the token x hidden matrices,
  the measure of the SLM paper's analysis: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def final_hidden_states(model, batches: list[dict[str, torch.Tensor]],
                        layerwise_on: torch.device | None = None) -> list[torch.Tensor]:
    """The base model's last hidden state of every non-padding token, per batch: (tokens, H) float32.
    ``layerwise_on``: computed one decoder layer at a time on that device (same values)."""
    if layerwise_on is not None:
        return _final_hidden_layerwise(model, batches, layerwise_on)
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        mask = batch["attention_mask"].to(device).bool()
        h = model.base_model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long(),
                             use_cache=False).last_hidden_state
        out.append(h[mask].float().cpu())
    return out


def mean_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat(a).double(), torch.cat(b).double()
    return float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())


def linear_cka(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat(a).double(), torch.cat(b).double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


SIMILARITIES = {"cosine": mean_cosine, "cka": linear_cka}


@torch.no_grad()
def _final_hidden_layerwise(model, batches, device: torch.device) -> list[torch.Tensor]:
    from compress.layerwise import run_layerwise
    from compress.surgery import final_norm

    finals = run_layerwise(model, batches, None, device, progress=False)
    norm = final_norm(model)
    home = next(norm.parameters()).device
    norm.to(device)
    out = [norm(h.to(device))[b["attention_mask"].to(device).bool()].float().cpu() for h, b in zip(finals, batches)]
    norm.to(home)
    return out

"""Output similarity between two runs of a model on the same batches (SLM's merge criterion).

Each run is the final hidden states (after the final norm, i.e. HF ``hidden_states[-1]``) of every
calibration sample: a list of (tokens, H) tensors, one per sample, padding tokens dropped.

* ``sample_cosine`` (the SLM reference code, ``cal_sim`` in 920927/SLM-a-sliding-layer-merging-method
  ``SLM.py``): per sample, the cosine between the two (tokens x H) matrices flattened into one
  vector each, then the mean over samples. The reference's threshold 0.72 is a value of this measure;
* ``token_cosine``: mean over all tokens of cos(h_a, h_b) (a per-token measure; it weights every
  token equally, so it is not the reference's number and 0.72 means something else under it);
* ``cka``: linear CKA (Kornblith et al. 2019, arXiv 1905.00414) between the token x hidden matrices,
  the measure of the SLM paper's analysis: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def final_hidden_states(model, batches: list[dict[str, torch.Tensor]],
                        layerwise_on: torch.device | None = None) -> list[torch.Tensor]:
    """The base model's last hidden state (after the final norm) of every non-padding token, one
    (tokens, H) float32 tensor per sample (batch rows in order). ``layerwise_on``: computed one
    decoder layer at a time on that device (same values)."""
    if layerwise_on is not None:
        return _final_hidden_layerwise(model, batches, layerwise_on)
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        mask = batch["attention_mask"].to(device).bool()
        h = model.base_model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long(),
                             use_cache=False).last_hidden_state
        out.extend(_per_sample(h, mask))
    return out


def _per_sample(h: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    # h: (B, T, H), mask: (B, T) -> B tensors (tokens_b, H)
    return [h[b][mask[b]].float().cpu() for b in range(h.shape[0])]


def sample_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean over samples of cos(flatten(A_s), flatten(B_s)) (the SLM reference's ``cal_sim``)."""
    sims = [torch.nn.functional.cosine_similarity(x.double().flatten(), y.double().flatten(), dim=0)
            for x, y in zip(a, b, strict=True)]
    return float(torch.stack(sims).mean())


def token_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean over all tokens of the cosine between the two hidden-state vectors of that token."""
    x, y = torch.cat(a).double(), torch.cat(b).double()
    return float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())


def linear_cka(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat(a).double(), torch.cat(b).double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


SIMILARITIES = {"sample_cosine": sample_cosine, "token_cosine": token_cosine, "cka": linear_cka}


@torch.no_grad()
def _final_hidden_layerwise(model, batches, device: torch.device) -> list[torch.Tensor]:
    from compress.layerwise import run_layerwise
    from compress.surgery import final_norm

    finals = run_layerwise(model, batches, None, device, progress=False)
    norm = final_norm(model)
    home = next(norm.parameters()).device
    norm.to(device)
    out = []
    for h, batch in zip(finals, batches):
        out.extend(_per_sample(norm(h.to(device)), batch["attention_mask"].to(device).bool()))
    norm.to(home)
    return out

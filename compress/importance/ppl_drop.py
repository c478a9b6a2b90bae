"""Perplexity drop: score_i = NLL(model without layer i) - NLL(model) on the calibration set.

The direct measure the other metrics approximate (ShortGPT Fig. 3, "removing single layer"); it
costs one forward pass over the calibration set per layer."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from compress.evaluate.perplexity import token_nll
from compress.surgery import decoder_layers, skip_layers


@torch.no_grad()
def calibration_nll(model, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token NLL over the non-padding tokens of ``batches``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        nll = token_nll(logits, ids[:, 1:])
        scored = (mask[:, 1:] * mask[:, :-1]).bool()
        total += float(nll[scored].double().sum())
        count += int(scored.sum())
    return total / count


def ppl_drop_scores(model, batches: list[dict[str, torch.Tensor]], progress: bool = True) -> list[float]:
    was_training = model.training
    model.eval()
    base = calibration_nll(model, batches)
    scores = []
    for i in tqdm(range(len(decoder_layers(model))), desc="ppl drop", unit="layer", disable=not progress):
        with skip_layers(model, [i]):
            scores.append(calibration_nll(model, batches) - base)
    model.train(was_training)
    return scores

"""Distillation loss on the teacher's top-k summary (pure functions).

With S the teacher's top-k token ids at a position, p the teacher and q the student::

    KL_k(p || q) = Σ_{i∈S} p_i (log p_i − log q_i) + p_rest (log p_rest − log q_rest)

the KL between the two distributions coarsened to k+1 buckets, the same quantity
compress.evaluate.fidelity.topk_kl reports (k = vocabulary size: the full KL). Here it is
differentiable and stable: log q_rest is the log-sum-exp of the student's logits outside S
(never 1 − Σ q, which float32 cancellation ruins when the top-k hold almost all the mass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def student_topk_logp(logits: torch.Tensor, top_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q at the teacher's ids (n, k), log q of the rest (n,)) from student logits (n, V), in float32.
    The rest is −inf when the ids cover the whole vocabulary."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)  # (n,)
    q_top = logits.gather(-1, top_ids.long()) - log_z.unsqueeze(-1)
    if top_ids.shape[-1] >= logits.shape[-1]:
        return q_top, torch.full_like(log_z, float("-inf"))
    outside = logits.scatter(-1, top_ids.long(), float("-inf"))
    return q_top, torch.logsumexp(outside, dim=-1) - log_z


def topk_kl_loss(logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
                 rest_logp: torch.Tensor) -> torch.Tensor:
    """KL_k(teacher || student) per position (n,), differentiable in the student ``logits`` (n, V).
    Teacher: ``top_ids`` (n, k), ``top_logp`` (n, k), ``rest_logp`` (n,) (−inf: no rest)."""
    q_top, q_rest = student_topk_logp(logits, top_ids)
    p_top = top_logp.float()
    head = (torch.exp(p_top) * (p_top - q_top)).sum(-1)
    if top_ids.shape[-1] >= logits.shape[-1]:
        return head
    has_rest = torch.isfinite(rest_logp)
    p_rest = torch.where(has_rest, rest_logp.float(), torch.zeros_like(q_rest))  # no −inf in the graph
    tail = torch.where(has_rest, torch.exp(p_rest) * (p_rest - q_rest), torch.zeros_like(q_rest))
    return head + tail


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position (n,): logits (n, V), targets (n,)."""
    return F.cross_entropy(logits.float(), targets.long(), reduction="none")


def heal_loss(logits: torch.Tensor, teacher: dict[str, torch.Tensor], lm_weight: float) -> dict[str, torch.Tensor]:
    """The training objective, mean over positions: (1 − lm_weight) · KL_k + lm_weight · LM.
    ``teacher``: rows of the store (top_ids, top_logp, rest_logp, target). -> {loss, kl, lm}"""
    kl = topk_kl_loss(logits, teacher["top_ids"], teacher["top_logp"], teacher["rest_logp"]).mean()
    lm = lm_loss(logits, teacher["target"]).mean() if lm_weight > 0 else torch.zeros_like(kl)
    return {"loss": (1.0 - lm_weight) * kl + lm_weight * lm, "kl": kl.detach(), "lm": lm.detach()}

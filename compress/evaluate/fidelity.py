"""Fidelity vs the baseline: KL divergence, top-1 agreement and Δ log-prob of the reference token.

The baseline's next-token distribution at every scored position of the evaluation text is kept
once, on disk, as its top-k log-probabilities plus one bucket for the rest of the mass (the
*baseline-logits store*); every later model is compared with it position by position, so the
baseline never has to sit in memory beside the compressed model. The heal stage reads the same
store as its teacher (one module, two users).

KL per position, with S the baseline's top-k token set, p the baseline and q the model::

    KL_k(p || q) = Σ_{i∈S} p_i (log p_i − log q_i) + p_rest (log p_rest − log q_rest)
    p_rest = 1 − Σ_{i∈S} p_i,   q_rest = 1 − Σ_{i∈S} q_i

the KL between the two distributions coarsened to k+1 buckets: never above the full-vocabulary KL
(coarsening cannot increase a divergence) and equal to it when k = vocabulary size. Everything in
float32 log-space from the logits, sums in float64.

Store layout (a folder of .npy files, memory-mapped on read; N scored positions)::

    meta.json        k, vocab, positions, the evaluation fingerprint it was built for
    top_ids.npy      (N, k) int32   baseline's top-k token ids, most likely first
    top_logp.npy     (N, k) float32 their log-probs
    rest_logp.npy    (N,) float32   log of the mass outside the top-k (−inf if none)
    target.npy       (N,) int32     the reference (next) token at each position
    target_logp.npy  (N,) float32   baseline log-prob of the reference token
    top1.npy         (N,) int32     baseline argmax

Size: N × (8k + 16) bytes (k = 64: 528 bytes a position; 16,384 positions = 8.3 MiB).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.errors import CompressError

ARRAYS = {"top_ids": np.int32, "top_logp": np.float32, "rest_logp": np.float32,
          "target": np.int32, "target_logp": np.float32, "top1": np.int32}


# ---- math (pure) ----------------------------------------------------------------------------

def log_rest(top_logp: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(top_logp)) per row, in float64 (−inf where the top-k hold all the mass).
    top_logp (n, k) -> (n,)"""
    mass = torch.exp(top_logp.double()).sum(-1)
    rest = (1.0 - mass).clamp(min=0.0)
    return torch.where(rest > 0, torch.log(rest.clamp(min=1e-300)), torch.full_like(rest, -math.inf))


def topk_summary(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top ids, top log-probs, log rest mass) of log-probs ``logp`` (n, V); k is capped at V."""
    values, ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
    if k >= logp.shape[-1]:  # the whole vocabulary: no rest (1 − Σ would only be float error)
        return ids, values, torch.full(values.shape[:-1], -math.inf, dtype=torch.float64, device=logp.device)
    return ids, values, log_rest(values)


def topk_kl(p_ids: torch.Tensor, p_logp: torch.Tensor, p_rest: torch.Tensor,
            q_logp: torch.Tensor) -> torch.Tensor:
    """KL_k(p || q) per row (float64): p as its top-k summary, q as full log-probs (n, V)."""
    q_top = q_logp.gather(-1, p_ids.long()).double()
    p_top, p_rest = p_logp.double(), p_rest.double()
    head = (torch.exp(p_top) * (p_top - q_top)).sum(-1)
    q_rest = log_rest(q_top)
    has_rest = torch.isfinite(p_rest)
    tail = torch.where(has_rest, torch.exp(p_rest) * (p_rest - q_rest.clamp(min=-745.0)), torch.zeros_like(p_rest))
    return (head + tail).clamp(min=0.0)  # tiny negatives are float error


def full_kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) per row over the whole vocabulary (float64), for reference."""
    p, q = p_logp.double(), q_logp.double()
    return (torch.exp(p) * (p - q)).sum(-1)


# ---- the store --------------------------------------------------------------------------------

@dataclass(frozen=True)
class FidelityKey:
    """What a store was built for: a later model must be scored on exactly the same positions."""

    top_k: int
    positions: int
    evaluation: str  # fingerprint of the evaluation tokens and windows

    def as_json(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "positions": self.positions, "evaluation": self.evaluation}


def evaluation_fingerprint(tokens: torch.Tensor, seq_len: int, stride: int | None, batch_size: int,
                           bos_per_window: bool = False) -> str:
    import hashlib

    h = hashlib.sha256(tokens.to(torch.int64).numpy().tobytes())
    h.update(f"{seq_len}/{stride or seq_len}/{batch_size}".encode())
    if bos_per_window:  # appended only then: stores built before the option keep their fingerprint
        h.update(b"/bos")
    return h.hexdigest()[:16]


class StoreWriter:
    """Perplexity observer that writes the baseline's summary position by position into a
    temporary folder; ``commit()`` renames it into place (a store under its name is complete)."""

    def __init__(self, folder: Path, key: FidelityKey, vocab: int) -> None:
        self.folder, self.key, self.vocab = folder, key, vocab
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
        k, n = min(key.top_k, vocab), key.positions
        shapes = {"top_ids": (n, k), "top_logp": (n, k)}
        self.arrays = {name: np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=dt,
                                                       shape=shapes.get(name, (n,)))
                       for name, dt in ARRAYS.items()}
        self.cursor = 0
        self.meter = FidelityMeter(None)  # the baseline against itself: KL 0, agreement 1

    def __call__(self, logp: torch.Tensor, targets: torch.Tensor) -> None:
        n = logp.shape[0]
        if self.cursor + n > self.key.positions:
            raise AssertionError("more scored positions than the store was sized for")
        ids, top, rest = topk_summary(logp, self.key.top_k)
        rows = slice(self.cursor, self.cursor + n)
        values = {"top_ids": ids, "top_logp": top, "rest_logp": rest, "target": targets,
                  "target_logp": logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), "top1": logp.argmax(-1)}
        for name, value in values.items():
            self.arrays[name][rows] = value.detach().cpu().numpy().astype(ARRAYS[name])
        self.meter.add(ids, top, rest, values["target_logp"], values["top1"], logp, targets)
        self.cursor += n

    def commit(self) -> None:
        if self.cursor != self.key.positions:
            raise AssertionError(f"store has {self.cursor} of {self.key.positions} positions")
        for arr in self.arrays.values():
            arr.flush()
        meta = {**self.key.as_json(), "vocab": self.vocab, "format": 1}
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self.tmp, self.folder)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class BaselineStore:
    """A committed store, memory-mapped."""

    folder: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @classmethod
    def open(cls, folder: Path) -> BaselineStore:
        try:
            meta = json.loads((folder / "meta.json").read_text())
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        except (OSError, ValueError) as e:
            raise CompressError(f"{folder}: baseline-logits store is unreadable ({e}); delete the folder "
                                "and run again to rebuild it") from None
        return cls(folder, meta, arrays)

    def matches(self, key: FidelityKey) -> bool:
        return {k: self.meta.get(k) for k in key.as_json()} == key.as_json()

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.array(a[start:stop])) for name, a in self.arrays.items()}


@dataclass
class FidelityMeter:
    """Perplexity observer comparing a model with a store, position by position (store None: the
    writer's self-comparison)."""

    store: BaselineStore | None
    cursor: int = 0
    kl: list[torch.Tensor] = field(default_factory=list)
    agree: int = 0
    dlogp: float = 0.0

    def __call__(self, logp: torch.Tensor, targets: torch.Tensor) -> None:
        assert self.store is not None
        n = logp.shape[0]
        ref = self.store.rows(self.cursor, self.cursor + n)
        if ref["target"].shape[0] != n or not torch.equal(ref["target"].long(), targets.long().cpu()):
            raise CompressError(f"{self.store.folder}: the evaluation text differs from the one the "
                                "baseline store was built on; delete the store and run again")
        dev = logp.device
        self.add(ref["top_ids"].to(dev), ref["top_logp"].to(dev), ref["rest_logp"].to(dev),
                 ref["target_logp"].to(dev), ref["top1"].to(dev), logp, targets)
        self.cursor += n

    def add(self, p_ids, p_top, p_rest, p_target, p_top1, q_logp, targets) -> None:
        self.kl.append(topk_kl(p_ids, p_top, p_rest, q_logp).cpu())
        self.agree += int((q_logp.argmax(-1) == p_top1.long()).sum())
        q_target = q_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        self.dlogp += float((q_target.double() - p_target.double()).sum())

    def metrics(self) -> dict[str, Any]:
        kl = torch.cat(self.kl).numpy() if self.kl else np.zeros(0)
        n = kl.size
        if n == 0:
            return {}
        return {"kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)),
                "kl_p99": float(np.quantile(kl, 0.99)),
                "top1_agree": self.agree / n, "dlogp_ref": self.dlogp / n, "fidelity_positions": n}

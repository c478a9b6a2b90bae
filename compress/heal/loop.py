"""The heal training loop: micro-batches of windows, the distillation loss against the teacher's
store rows, AdamW with warm-up + cosine, validation on held-out windows, and a checkpoint every
``checkpoint_every`` optimizer steps (trained weights, optimizer, scheduler, RNG and data position,
written atomically) from which a killed run continues to the same weights."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from compress.faults import crash_point
from compress.heal.adapters import load_trainable, trainable_state
from compress.heal.loss import heal_loss
from compress.heal.schedule import lr_factor, micro_batch
from compress.heal.teacher import window_rows

CHECKPOINT = "heal-checkpoint.pt"


@dataclass
class Settings:
    """What the loop needs (the stage maps its config onto this)."""

    total_steps: int
    batch_size: int
    grad_accum: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    max_grad_norm: float
    lm_weight: float
    seed: int
    eval_every: int
    checkpoint_every: int
    autocast: torch.dtype | None  # bf16 autocast, or None: the weights' own dtype
    fingerprint: str  # the stage's config: a checkpoint of other settings is not resumed


@dataclass
class Curve:
    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_kl: list[float] = field(default_factory=list)


@dataclass
class Progress:
    """What a checkpoint restores besides tensors."""

    step: int = 0
    tokens: int = 0
    train_s: float = 0.0  # seconds in training steps (validation excluded), for tokens/s
    curve: Curve = field(default_factory=Curve)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _logits(model, ids: torch.Tensor, s: Settings) -> torch.Tensor:
    with _autocast(ids.device, s.autocast):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
    return logits.reshape(-1, logits.shape[-1])


@torch.no_grad()
def validation_kl(model, windows: torch.Tensor, index: list[int], store, s: Settings) -> float:
    """Mean top-k KL to the teacher over the held-out windows ``index`` (eval mode, no dropout)."""
    if not index:
        return float("nan")
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(index), s.batch_size):
        chunk = index[start:start + s.batch_size]
        ids = windows[chunk].to(windows.device)
        rows = window_rows(store, chunk, windows.shape[1], ids.device)
        kl = heal_loss(_logits(model, ids, s), rows, 0.0)["kl"]
        n = rows["target"].numel()
        total, count = total + float(kl) * n, count + n
    model.train(was)
    return total / count


def save_checkpoint(path: Path, model, opt, sched, progress: Progress, s: Settings) -> None:
    """Everything a rerun needs to continue exactly, written to a temporary file then renamed."""
    state = {"fingerprint": s.fingerprint, "trainable": trainable_state(model), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "progress": {**asdict(progress), "curve": asdict(progress.curve)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, opt, sched, s: Settings, log) -> Progress:
    """The progress stored at ``path`` (model, optimizer, scheduler and RNG restored), or a fresh one."""
    if not path.exists():
        return Progress()
    state = torch.load(path, weights_only=False)
    if state["fingerprint"] != s.fingerprint:
        log.info("heal: %s was written with other settings; training from the start", path)
        return Progress()
    load_trainable(model, state["trainable"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    p = state["progress"]
    log.info("heal: resuming at step %d of %d from %s", p["step"], s.total_steps, path)
    return Progress(p["step"], p["tokens"], p["train_s"], Curve(**p["curve"]))


def _step(model, windows, train_index, store, s: Settings, step: int) -> tuple[float, int]:
    """One optimizer step's forward/backward passes: (mean loss, tokens)."""
    losses, tokens = [], 0
    for a in range(s.grad_accum):
        chunk = [train_index[i] for i in micro_batch(step * s.grad_accum + a, len(train_index), s.batch_size, s.seed)]
        ids = windows[chunk]
        rows = window_rows(store, chunk, windows.shape[1], ids.device)
        out = heal_loss(_logits(model, ids, s), rows, s.lm_weight)
        (out["loss"] / s.grad_accum).backward()
        losses.append(out["loss"].item())
        tokens += ids.numel()
    return sum(losses) / len(losses), tokens


def train(model, windows: torch.Tensor, train_index: list[int], val_index: list[int], store,
          s: Settings, folder: Path, log, progress: bool = True) -> dict[str, Any]:
    """Train ``model``'s trainable parameters in place; -> what the stage records."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: lr_factor(i, s.warmup_steps, s.total_steps, s.min_lr_ratio))
    path = folder / CHECKPOINT
    state = load_checkpoint(path, model, opt, sched, s, log)
    resumed_at = state.step
    model.train()
    if not state.curve.val_step:
        state.curve.val_step.append(0)
        state.curve.val_kl.append(validation_kl(model, windows, val_index, store, s))
    bar = tqdm(total=s.total_steps, initial=state.step, desc="heal", unit="step", disable=not progress)
    while state.step < s.total_steps:
        start = time.perf_counter()
        loss, tokens = _step(model, windows, train_index, store, s, state.step)
        if s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.train_s += time.perf_counter() - start
        state.step, state.tokens = state.step + 1, state.tokens + tokens
        state.curve.step.append(state.step)
        state.curve.train_loss.append(loss)
        if state.step % s.eval_every == 0 or state.step == s.total_steps:
            state.curve.val_step.append(state.step)
            state.curve.val_kl.append(validation_kl(model, windows, val_index, store, s))
        bar.update(1)
        bar.set_postfix(train=f"{loss:.4f}", val=f"{state.curve.val_kl[-1]:.4f}",
                        tok_s=f"{state.tokens / max(state.train_s, 1e-9):.0f}")
        if state.step % s.checkpoint_every == 0 or state.step == s.total_steps:
            save_checkpoint(path, model, opt, sched, state, s)
            crash_point("heal")
    bar.close()
    model.eval()
    c = state.curve
    return {"steps": state.step, "tokens_seen": state.tokens, "train_s": state.train_s,
            "tokens_per_s": state.tokens / state.train_s if state.train_s else None,
            "resumed_at_step": resumed_at, "initial_val_kl": c.val_kl[0], "final_val_kl": c.val_kl[-1],
            "final_train_loss": c.train_loss[-1] if c.train_loss else None, "curve": asdict(c)}

"""Perplexity: token-weighted negative log-likelihood over fixed windows.

Windows of ``seq_len`` tokens start every ``stride`` tokens (stride == seq_len: non-overlapping).
Each token is predicted exactly once, with as much left context as its window gives (the standard
sliding-window evaluation of the transformers docs). Log-softmax runs in float32 whatever the
model's dtype. ppl = exp(sum NLL / number of predicted tokens).

With a ``bos`` token id (``bos_per_window: true``) every window is [BOS] + up to seq_len - 1 text
tokens: the BOS takes one of the seq_len positions, the text windows stay contiguous (stride
defaults to seq_len - 1: non-overlapping) and the BOS is never a target, so every text token,
the first of each window included, is scored exactly once (N scored tokens for N text tokens,
against N - number of windows without it). Some models (Gemma) give absurd perplexity on windows
that do not start with BOS.

An ``observe(logp, targets)`` callback sees the float32 log-probs (n, V) and reference tokens (n,)
of every scored position, in a fixed order (the fidelity-vs-baseline meters use it: one pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

Observer = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class Window:
    begin: int  # first input (text) token
    end: int  # one past the last input token
    target_from: int  # first position (absolute) whose prediction is scored
    bos: bool = False  # a BOS precedes the window's tokens (and gives token ``begin`` its context)


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per predicted token (nats)
    tokens: int  # predicted tokens
    seq_len: int
    stride: int


def make_windows(num_tokens: int, seq_len: int, stride: int, bos: bool = False) -> list[Window]:
    """Windows covering ``num_tokens`` so that tokens 1..N-1 are each scored once; with ``bos``
    windows of seq_len - 1 text tokens after the BOS, and tokens 0..N-1 each scored once."""
    span = seq_len - 1 if bos else seq_len  # text tokens a window holds
    if not 0 < stride <= span:
        raise ValueError(f"stride must be in 1..{'seq_len - 1' if bos else 'seq_len'} ({span}), got {stride}")
    windows, scored_until = [], 0 if bos else 1  # without a BOS token 0 has no context: never scored
    begin = 0
    while scored_until < num_tokens:
        end = min(begin + span, num_tokens)
        windows.append(Window(begin, end, max(scored_until, begin + (0 if bos else 1)), bos))
        scored_until = end
        begin += stride
    return windows


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL in float32. logits (B, T, V) predict targets (B, T) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def score_windows(logits: torch.Tensor, ids: torch.Tensor, windows: list[Window],
                  observe: Observer | None = None) -> tuple[float, int]:
    """Summed NLL and count of the scored positions; logits (B, T-1, V) predict ids[:, 1:] (ids
    holding the BOS first where the windows have one)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    targets = ids[:, 1:]
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # position p predicts token p+1
    total, count = 0.0, 0
    for row, w in enumerate(windows):
        first = w.target_from - w.begin - (0 if w.bos else 1)  # index into nll of the first scored prediction
        total += float(nll[row, first:].double().sum())
        count += w.end - w.target_from
        if observe is not None:
            observe(logp[row, first:], targets[row, first:])
    return total, count


def window_ids(tokens: torch.Tensor, windows: list[Window], bos_id: int | None) -> torch.Tensor:
    """Input ids (B, T) of equal-length windows: [BOS] + tokens where they have one."""
    ids = torch.stack([tokens[w.begin : w.end] for w in windows])
    if windows[0].bos:
        ids = torch.cat([torch.full((len(windows), 1), bos_id, dtype=ids.dtype), ids], dim=1)
    return ids


@torch.no_grad()
def window_nll(model, tokens: torch.Tensor, windows: list[Window], device,
               observe: Observer | None = None, bos_id: int | None = None) -> tuple[float, int]:
    """Summed NLL and count over equal-length ``windows`` run as one batch."""
    ids = window_ids(tokens, windows, bos_id).to(device)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return score_windows(logits, ids, windows, observe)


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Group windows into batches of equal length (the last window may be shorter)."""
    by_len: dict[int, list[Window]] = {}
    for w in windows:
        by_len.setdefault(w.end - w.begin, []).append(w)
    return [ws[i : i + batch_size] for ws in by_len.values() for i in range(0, len(ws), batch_size)]


@torch.no_grad()
def layerwise_window_nll(model, tokens: torch.Tensor, batches: list[list[Window]], device,
                         progress: bool = True, observe: Observer | None = None,
                         bos_id: int | None = None) -> tuple[float, int]:
    """Summed NLL and count, running the decoder one layer at a time on ``device`` (weights stay
    where they are): for models larger than the accelerator. Same windows, same scoring."""
    from compress.layerwise import run_layerwise
    from compress.surgery import final_norm

    ids = [window_ids(tokens, ws, bos_id) for ws in batches]
    inputs = [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids]
    finals = run_layerwise(model, inputs, None, device, progress=progress)
    norm, head = final_norm(model), model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    homes = [next(norm.parameters()).device, head.weight.device]
    norm.to(device), head.to(device)
    total, count = 0.0, 0
    for ws, batch, hidden in zip(batches, inputs, finals):
        logits = head(norm(hidden.to(device)))[:, :-1]
        if cap:  # Gemma 2/3: logits = cap * tanh(logits / cap), as their forward does
            logits = cap * torch.tanh(logits / cap)
        t, c = score_windows(logits, batch["input_ids"].to(device), ws, observe)
        total, count = total + t, count + c
    norm.to(homes[0]), head.to(homes[1])
    return total, count


def perplexity(model, tokens: torch.Tensor, seq_len: int, stride: int | None = None,
               batch_size: int = 1, device=None, progress: bool = True,
               layerwise: bool = False, observe: Observer | None = None,
               bos: int | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D tensor of token ids (``layerwise``: one decoder layer at a
    time on ``device``, for a model whose weights stay in CPU memory; ``bos``: the BOS token id
    to put before every window, see the module docstring)."""
    stride = stride or (seq_len - 1 if bos is not None else seq_len)
    if tokens.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    device = device or next(model.parameters()).device
    batches = _batches(make_windows(tokens.numel(), seq_len, stride, bos is not None), batch_size)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    if layerwise:
        total, count = layerwise_window_nll(model, tokens, batches, device, progress, observe, bos)
    for batch in tqdm([] if layerwise else batches, desc="perplexity", unit="batch", disable=not progress):
        t, c = window_nll(model, tokens, batch, device, observe, bos)
        total, count = total + t, count + c
    model.train(was_training)
    nll = total / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, seq_len=seq_len, stride=stride)

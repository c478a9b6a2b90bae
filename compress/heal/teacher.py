"""The teacher's next-token distributions on the heal windows, computed once by the model as
loaded (before any stage changes weights) and kept on disk as a baseline-logits store
(compress.evaluate.fidelity: the same module that stores the baseline for the fidelity metrics).

Window w (T tokens) owns store rows [w·(T−1), (w+1)·(T−1)): the predictions for tokens 1..T−1.
Teacher and student never sit in memory together: the student reads the memory-mapped rows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from compress.evaluate.fidelity import BaselineStore, FidelityKey, StoreWriter, evaluation_fingerprint


def windows_of(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The calibration batches as one (S, T) tensor of windows."""
    return torch.cat([b["input_ids"] for b in batches])


def teacher_key(windows: torch.Tensor, top_k: int) -> FidelityKey:
    s, t = windows.shape
    return FidelityKey(top_k, s * (t - 1), evaluation_fingerprint(windows.reshape(-1), t, None, 1))


def window_rows(store: BaselineStore, index: list[int], seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The store rows of windows ``index``, concatenated in that order, on ``device``."""
    parts = [store.rows(w * (seq_len - 1), (w + 1) * (seq_len - 1)) for w in index]
    return {name: torch.cat([p[name] for p in parts]).to(device) for name in parts[0]}


@torch.no_grad()
def build_teacher_store(model, windows: torch.Tensor, folder: Path, top_k: int, device: torch.device,
                        batch_size: int = 4, progress: bool = True) -> BaselineStore:
    """The store at ``folder`` if one for these windows and ``top_k`` is there, else computed now
    with ``model`` (written to a temporary folder, renamed into place when complete)."""
    key = teacher_key(windows, top_k)
    if (folder / "meta.json").exists():
        store = BaselineStore.open(folder)
        if store.matches(key):
            return store
    vocab = model.get_output_embeddings().weight.shape[0]
    writer = StoreWriter(folder, key, vocab)
    was_training = model.training
    model.eval()
    try:
        for chunk in tqdm(windows.split(batch_size), desc="heal teacher", unit="batch", disable=not progress):
            ids = chunk.to(device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            writer(logp.reshape(-1, logp.shape[-1]), ids[:, 1:].reshape(-1))
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    finally:
        model.train(was_training)
    return BaselineStore.open(folder)

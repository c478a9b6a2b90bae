"""Turn documents into token streams, evaluation windows and calibration batches."""

from __future__ import annotations

import logging

import torch

from compress.errors import CompressError

DOC_SEPARATOR = "\n\n"


def tokenize_documents(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """One 1-D stream: documents joined by a blank line, tokenized with the tokenizer's defaults
    (so a BOS is added once at the start where the tokenizer adds one), cut to ``max_tokens``."""
    text = DOC_SEPARATOR.join(texts)
    if max_tokens is not None:
        text = text[: max_tokens * 12]  # no tokenizer packs more than ~12 chars a token on prose
    quiet = logging.getLogger("transformers.tokenization_utils_base")
    level, quiet.level = quiet.level, logging.ERROR  # "sequence longer than max length" is expected
    try:
        ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    finally:
        quiet.setLevel(level)
    tokens = torch.tensor(ids, dtype=torch.long)
    return tokens[:max_tokens] if max_tokens is not None else tokens


def calibration_batches(tokens: torch.Tensor, samples: int, seq_len: int, seed: int,
                        batch_size: int, source: str = "") -> list[dict[str, torch.Tensor]]:
    """``samples`` windows of ``seq_len`` tokens at seeded random offsets (as GPTQ's and
    ShortGPT's reference code draw calibration windows), grouped into batches. No padding.
    ``source`` names the text in the error when there is too little of it."""
    if tokens.numel() <= seq_len:
        raise CompressError(
            f"calibration text{f' {source}' if source else ''} has {tokens.numel()} tokens, "
            f"fewer than seq_len={seq_len}+1: give more text or a smaller seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (samples,), generator=gen).tolist()
    windows = torch.stack([tokens[s : s + seq_len] for s in starts])
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        for chunk in windows.split(batch_size)
    ]


def pad_batch(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token lists into input_ids/attention_mask (right padding keeps positions)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}

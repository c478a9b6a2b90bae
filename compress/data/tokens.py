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


SAMPLINGS = ("random", "strided")


def window_starts(num_tokens: int, samples: int, seq_len: int, seed: int, sampling: str,
                  source: str = "") -> list[int]:
    """Where each calibration window of ``seq_len`` tokens starts in a stream of ``num_tokens``.

    * ``random``: ``samples`` seeded uniform offsets in [0, num_tokens - seq_len) (GPTQ's
      reference ``get_wikitext2``/``get_c4`` draw windows this way);
    * ``strided``: consecutive non-overlapping windows from the start, 0, seq_len, 2 seq_len, ...
      (ShortGPT's released code, icip-cas/ShortGPT ``shortgpt.py`` ``eval_importance``, walks each
      PG19 validation book in ``stride=256`` steps the same way).
    ``source`` names the text in the error when there is too little of it.
    """
    text = f"calibration text{f' {source}' if source else ''}"
    if sampling == "strided":
        if samples * seq_len > num_tokens:
            raise CompressError(
                f"{text} has {num_tokens} tokens; sampling: strided needs samples x seq_len = "
                f"{samples} x {seq_len} = {samples * seq_len}: give more text, fewer samples or a smaller seq_len")
        return [i * seq_len for i in range(samples)]
    if sampling != "random":
        raise ValueError(f"unknown sampling {sampling!r}; supported: {list(SAMPLINGS)}")
    if num_tokens <= seq_len:
        raise CompressError(
            f"{text} has {num_tokens} tokens, fewer than seq_len={seq_len}+1: "
            "give more text or a smaller seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_tokens - seq_len, (samples,), generator=gen).tolist()


def calibration_batches(tokens: torch.Tensor, samples: int, seq_len: int, seed: int,
                        batch_size: int, sampling: str = "random", source: str = "") -> list[dict[str, torch.Tensor]]:
    """``samples`` windows of ``seq_len`` tokens of the stream (placed as ``window_starts`` says),
    grouped into batches of ``batch_size``. No padding. ``source`` names the text in errors."""
    starts = window_starts(tokens.numel(), samples, seq_len, seed, sampling, source)
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

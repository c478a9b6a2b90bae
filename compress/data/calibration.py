"""A calibration set: a recipe's ``CalibrationConfig`` -> batches of token windows."""

from __future__ import annotations

import torch

from compress.data.sources import CalibrationConfig, load_texts, source_description, source_label
from compress.data.tokens import (batched, bos_token_id, calibration_windows, chat_windows,
                                  require_chat_template, tokenize_documents)


def calibration_data(tokenizer, cal: CalibrationConfig, key: str = "calibration") -> list[dict[str, torch.Tensor]]:
    """``cal.samples`` windows of ``cal.seq_len`` tokens in batches of ``cal.batch_size``:

    * plain: windows of the token stream (tokenized with the tokenizer's defaults);
    * ``bos_per_window``: [BOS] + seq_len - 1 text tokens (the stream without special tokens);
    * ``chat_template``: a window of seq_len text tokens, decoded, wrapped as one user turn and
      cut back to seq_len tokens (compress.data.tokens.chat_windows).
    ``key`` is the recipe key errors name (``calibration``, ``stages[0].gptq.calibration``)."""
    bos = bos_token_id(tokenizer, key) if cal.bos_per_window else None
    if cal.chat_template:
        require_chat_template(tokenizer, key)  # before the text is read
    need = cal.samples * cal.seq_len * 4
    text_only = cal.bos_per_window or cal.chat_template
    tokens = tokenize_documents(tokenizer, load_texts(cal, max_chars=need * 12), max_tokens=need,
                                add_special_tokens=not text_only)
    windows = calibration_windows(tokens, cal.samples, cal.seq_len, cal.seed, cal.sampling, source_label(cal), bos)
    if cal.chat_template:
        windows = chat_windows(tokenizer, windows, cal.seq_len, key)
    return batched(windows, cal.batch_size)


def calibration_description(cal: CalibrationConfig) -> str:
    """What a run calibrated on, for reports: the source (whatever its label) and the windows."""
    wrap = ", BOS per window" if cal.bos_per_window else ", chat template" if cal.chat_template else ""
    return f"{source_description(cal)}; {cal.samples} x {cal.seq_len} tokens, {cal.sampling}{wrap}"

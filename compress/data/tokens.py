"""Turn documents into token streams, evaluation windows and calibration batches."""

from __future__ import annotations

import logging

import torch

from compress.errors import CompressError

DOC_SEPARATOR = "\n\n"


def tokenize_documents(tokenizer, texts: list[str], max_tokens: int | None = None,
                       add_special_tokens: bool = True) -> torch.Tensor:
    """One 1-D stream: documents joined by a blank line, tokenized with the tokenizer's defaults
    (so a BOS is added once at the start where the tokenizer adds one; ``add_special_tokens=False``:
    text tokens only, for windows that get their BOS or chat template later), cut to ``max_tokens``."""
    text = DOC_SEPARATOR.join(texts)
    if max_tokens is not None:
        text = text[: max_tokens * 12]  # no tokenizer packs more than ~12 chars a token on prose
    quiet = logging.getLogger("transformers.tokenization_utils_base")
    level, quiet.level = quiet.level, logging.ERROR  # "sequence longer than max length" is expected
    try:
        ids = tokenizer(text, return_attention_mask=False, add_special_tokens=add_special_tokens)["input_ids"]
    finally:
        quiet.setLevel(level)
    tokens = torch.tensor(ids, dtype=torch.long)
    return tokens[:max_tokens] if max_tokens is not None else tokens


SAMPLINGS = ("random", "strided")


def bos_token_id(tokenizer, key: str) -> int:
    """The BOS id for ``<key>.bos_per_window: true``; CompressError naming the key if there is none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise CompressError(f"{key}.bos_per_window: true, but the tokenizer has no BOS token (bos_token_id "
                            "is None); set bos_per_window: false")
    return bos


def window_starts(num_tokens: int, samples: int, seq_len: int, seed: int, sampling: str,
                  source: str = "", bos: bool = False) -> list[int]:
    """Where each calibration window of ``seq_len`` tokens starts in a stream of ``num_tokens``
    (``bos``: the window's first position is a BOS, so it takes seq_len - 1 tokens of the stream).

    * ``random``: ``samples`` seeded uniform offsets in [0, num_tokens - seq_len) (GPTQ's
      reference ``get_wikitext2``/``get_c4`` draw windows this way);
    * ``strided``: consecutive non-overlapping windows from the start, 0, seq_len, 2 seq_len, ...
      (ShortGPT's released code, icip-cas/ShortGPT ``shortgpt.py`` ``eval_importance``, walks each
      PG19 validation book in ``stride=256`` steps the same way).
    ``source`` names the text in the error when there is too little of it.
    """
    text = f"calibration text{f' {source}' if source else ''}"
    span, per = (seq_len - 1, "(seq_len - 1)") if bos else (seq_len, "seq_len")  # stream tokens a window takes
    if sampling == "strided":
        if samples * span > num_tokens:
            raise CompressError(
                f"{text} has {num_tokens} tokens; sampling: strided needs samples x {per} = "
                f"{samples} x {span} = {samples * span}: give more text, fewer samples or a smaller seq_len")
        return [i * span for i in range(samples)]
    if sampling != "random":
        raise ValueError(f"unknown sampling {sampling!r}; supported: {list(SAMPLINGS)}")
    if num_tokens <= span:
        raise CompressError(
            f"{text} has {num_tokens} tokens, fewer than {per}={span}+1: "
            "give more text or a smaller seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_tokens - span, (samples,), generator=gen).tolist()


def calibration_windows(tokens: torch.Tensor, samples: int, seq_len: int, seed: int, sampling: str = "random",
                        source: str = "", bos: int | None = None) -> torch.Tensor:
    """(samples, seq_len) windows of the stream, placed as ``window_starts`` says; with a ``bos``
    id each is [bos] + the next seq_len - 1 stream tokens. ``source`` names the text in errors."""
    span = seq_len - 1 if bos is not None else seq_len
    starts = window_starts(tokens.numel(), samples, seq_len, seed, sampling, source, bos is not None)
    windows = torch.stack([tokens[s : s + span] for s in starts])
    if bos is not None:
        windows = torch.cat([torch.full((samples, 1), bos, dtype=windows.dtype), windows], dim=1)
    return windows


def require_chat_template(tokenizer, key: str) -> None:
    """CompressError naming ``<key>.chat_template`` if the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise CompressError(f"{key}.chat_template: true, but the tokenizer has no chat template "
                            "(tokenizer.chat_template is unset); set chat_template: false or use an "
                            "instruct model's tokenizer")


def chat_windows(tokenizer, windows: torch.Tensor, seq_len: int, key: str = "calibration") -> torch.Tensor:
    """(S, seq_len): each window's text (decoded) as one user turn of the tokenizer's chat template,
    tokenized as the template writes it (its own BOS and role markers, no others added) and cut to
    ``seq_len`` tokens: the template's opening stays, the end of the text and the closing markers
    are what the cut drops. ``key`` names the recipe key in errors."""
    require_chat_template(tokenizer, key)
    rows = []
    for i, window in enumerate(windows.tolist()):
        text = tokenizer.decode(window, skip_special_tokens=True)
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        ids = tokenizer(chat, add_special_tokens=False, return_attention_mask=False)["input_ids"][:seq_len]
        if len(ids) < seq_len:  # only a template that adds (almost) nothing, on text that re-tokenizes shorter
            raise CompressError(f"{key}.chat_template: sample {i} wraps to {len(ids)} tokens, fewer than "
                                f"seq_len={seq_len}; this chat template adds too little: set chat_template: false")
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.long)


def batched(windows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Windows (S, T) grouped into batches of ``batch_size`` with all-ones masks. No padding."""
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in windows.split(batch_size)]


def calibration_batches(tokens: torch.Tensor, samples: int, seq_len: int, seed: int,
                        batch_size: int, sampling: str = "random", source: str = "",
                        bos: int | None = None) -> list[dict[str, torch.Tensor]]:
    """``calibration_windows`` grouped into batches of ``batch_size``."""
    return batched(calibration_windows(tokens, samples, seq_len, seed, sampling, source, bos), batch_size)


def pad_batch(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token lists into input_ids/attention_mask (right padding keeps positions)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}

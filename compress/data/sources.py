"""Where text comes from: ``TextSource`` (hub dataset or local path) and reading it."""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.data.local import load_local_texts
from compress.data.pg19 import LABELS, load_hub_texts
from compress.limits import MAX_COUNT, MAX_SAMPLES, MAX_SEED, MAX_SEQ_LEN


class TextSource(BaseModel):
    """Text from the hub (``dataset``: ``pg19`` or a hub id) or from disk (``path``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str | None = None
    path: str | None = None
    split: str = "test"
    text_field: str = "text"
    label: str | None = None  # name used in reports, e.g. "Austen (PG)"

    @model_validator(mode="after")
    def _one_source(self):
        if (self.dataset is None) == (self.path is None):
            raise ValueError("give exactly one of `dataset` (pg19 or a hub id) or `path` (local text)")
        return self


class CalibrationConfig(TextSource):
    """Calibration windows: ``samples`` windows of ``seq_len`` tokens of the text's token stream,
    at seeded random offsets (``sampling: random``) or consecutive from the start (``strided``, as
    ShortGPT's released code walks PG19 books); see compress.data.tokens.window_starts."""

    split: str = "validation"
    samples: int = Field(128, ge=1, le=MAX_SAMPLES)
    seq_len: int = Field(2048, ge=2, le=MAX_SEQ_LEN)
    seed: int = 0  # random sampling only
    batch_size: int = Field(1, ge=1, le=MAX_COUNT)
    sampling: Literal["random", "strided"] = "random"

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, seed: int) -> int:
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"must be in 0..{MAX_SEED} (2**64-1), the seeds torch.Generator accepts")
        return seed


def source_label(source: TextSource) -> str:
    """How reports name the data: the recipe's label, else PG19/hub id + split, else file name."""
    if source.label:
        return source.label
    if source.dataset:
        return f"{LABELS.get(source.dataset, source.dataset)} ({source.split})"
    return Path(source.path).name


def load_texts(source: TextSource, max_chars: int | None = None) -> list[str]:
    if source.path is not None:
        return load_local_texts(Path(source.path), source.text_field, max_chars)
    return load_hub_texts(source.dataset, source.split, source.text_field, max_chars)

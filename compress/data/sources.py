"""Where text comes from: ``TextSource`` (hub dataset, local files through a `datasets` builder, or
a local path) and reading it; how reports name it."""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.data.local import load_local_texts
from compress.data.pg19 import BUILDERS, load_hub_texts
from compress.limits import MAX_COUNT, MAX_SAMPLES, MAX_SEED, MAX_SEQ_LEN


class TextSource(BaseModel):
    """Text from the hub (``dataset``: ``pg19`` or a hub id, with its config ``name`` and, for a
    repo of raw files, ``data_files`` inside it), from local files read by a `datasets` builder
    (``dataset: json|csv|parquet|text`` + ``data_files``), or from disk as is (``path``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str | None = None
    name: str | None = None  # hub config, e.g. wikitext-2-raw-v1
    data_files: list[str] | None = None  # builder: local files; hub id: files in its repo
    path: str | None = None
    split: str = "test"
    text_field: str = "text"
    label: str | None = None  # name used in reports, e.g. "Austen (PG)"

    @field_validator("data_files", mode="before")
    @classmethod
    def _file_list(cls, files):
        return [files] if isinstance(files, str) else files

    @model_validator(mode="after")
    def _one_source(self):
        if (self.dataset is None) == (self.path is None):
            raise ValueError("give exactly one of `dataset` (pg19, a hub id, or json|csv|parquet|text with "
                             "`data_files`) or `path` (local text)")
        if self.path is not None and (self.name is not None or self.data_files is not None):
            raise ValueError("`name` and `data_files` go with `dataset:`; a `path:` is read as is (drop them)")
        if self.data_files is not None and not self.data_files:
            raise ValueError("data_files: is empty; list at least one file")
        if self.dataset in BUILDERS and self.name is not None:
            raise ValueError(f"name: is a hub dataset's config; the {self.dataset} builder of local files "
                             "takes none (drop it)")
        if self.dataset in BUILDERS and self.data_files is None:
            raise ValueError(f"dataset: {self.dataset} reads local files; give `data_files: [file, ...]`")
        if self.data_files is not None and self.dataset not in BUILDERS and "/" not in self.dataset:
            raise ValueError(f"dataset: {self.dataset!r} is not a builder for local data_files; use one of "
                             f"{sorted(BUILDERS)} (or a hub id owner/name whose repo holds the files)")
        return self


class CalibrationConfig(TextSource):
    """Calibration windows: ``samples`` windows of ``seq_len`` tokens of the text's token stream,
    at seeded random offsets (``sampling: random``) or consecutive from the start (``strided``, as
    ShortGPT's released code walks PG19 books); see compress.data.tokens.window_starts.
    ``bos_per_window``: each window is [BOS] + seq_len - 1 text tokens. ``chat_template``: each
    window's text is wrapped as one user turn with the tokenizer's chat template, cut to seq_len
    tokens (compress.data.tokens.chat_windows)."""

    split: str = "validation"
    samples: int = Field(128, ge=1, le=MAX_SAMPLES)
    seq_len: int = Field(2048, ge=2, le=MAX_SEQ_LEN)
    seed: int = 0  # random sampling only
    batch_size: int = Field(1, ge=1, le=MAX_COUNT)
    sampling: Literal["random", "strided"] = "random"
    bos_per_window: bool = False
    chat_template: bool = False

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, seed: int) -> int:
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"must be in 0..{MAX_SEED} (2**64-1), the seeds torch.Generator accepts")
        return seed

    @model_validator(mode="after")
    def _one_wrapping(self):
        if self.bos_per_window and self.chat_template:
            raise ValueError("give bos_per_window or chat_template, not both (a chat template puts in "
                             "the BOS its model wants)")
        return self


def source_description(source: TextSource, short: bool = False) -> str:
    """What the text is, whatever its label: ``wikitext/wikitext-2-raw-v1:test``,
    ``json:/data/a.jsonl,/data/b.jsonl``, ``allenai/c4:validation (data_files: en/...)``, or the
    path. ``short``: file names without their folders."""
    def named(file: str) -> str:
        return Path(file).name if short else file

    if source.path is not None:
        return named(source.path)
    if source.dataset in BUILDERS:
        return f"{source.dataset}:{','.join(named(f) for f in source.data_files)}"
    config = f"/{source.name}" if source.name else ""
    files = f" (data_files: {', '.join(source.data_files)})" if source.data_files else ""
    return f"{source.dataset}{config}:{source.split}{files}"


def source_label(source: TextSource) -> str:
    """How tables and logs name the data: the recipe's label, else the short description."""
    return source.label or source_description(source, short=True)


def load_texts(source: TextSource, max_chars: int | None = None) -> list[str]:
    if source.path is not None:
        return load_local_texts(Path(source.path), source.text_field, max_chars)
    return load_hub_texts(source.dataset, source.split, source.text_field, max_chars,
                          name=source.name, data_files=source.data_files)

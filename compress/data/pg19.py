"""Text through `datasets` (imported only when a ``dataset:`` source is asked for): a hub dataset
(``pg19`` is an alias for a Parquet copy of DeepMind's PG19, Rae et al. 2019, the corpus ShortGPT
calibrates and evaluates on; any other hub id with a text column works the same way, with its
config ``name`` such as ``wikitext-2-raw-v1`` and, for a repo of raw files, ``data_files`` in it),
or local files read by one of `datasets`' packaged builders (``json``, ``csv``, ``parquet``,
``text``: one row per line)."""

from __future__ import annotations

import itertools

from compress.errors import CompressError

ALIASES = {"pg19": "emozilla/pg19"}  # Parquet mirror of deepmind/pg19: train/validation/test, "text"
BUILDERS = ("csv", "json", "parquet", "text")  # datasets' packaged builders of local files


def _open(dataset: str, split: str, name: str | None, data_files: list[str] | None, revision: str | None):
    """A streaming iterable of rows (dicts). Local builder files are given as the one split asked
    for, so ``split`` names them whatever it is."""
    try:
        import datasets  # lazy: only dataset sources need it
    except ImportError:
        raise CompressError(f"dataset {dataset!r} is read by `datasets`: `pip install datasets`") from None
    if dataset in BUILDERS:
        try:
            return datasets.load_dataset(dataset, data_files={split: list(data_files)}, split=split,
                                         streaming=True)
        except Exception as e:  # unreadable or missing file: the user fixes the file list
            raise CompressError(f"dataset {dataset}: could not read data_files {list(data_files)}: {e}") from None
    hub_id = ALIASES.get(dataset, dataset)
    try:
        return datasets.load_dataset(hub_id, name=name, data_files=data_files, split=split, streaming=True,
                                     revision=revision)
    except Exception as e:  # network, unknown id, config or split: all user-fixable
        config = f" config {name!r}" if name else ""
        raise CompressError(
            f"could not open hub dataset {hub_id!r}{config} split {split!r}: {e}. "
            "Offline? Point the recipe at local text with `path:` (or `dataset: json|csv|parquet|text` "
            "with `data_files:`) instead."
        ) from None


def load_hub_texts(dataset: str, split: str, text_field: str = "text", max_chars: int | None = None,
                   revision: str | None = None, name: str | None = None,
                   data_files: list[str] | None = None) -> list[str]:
    """Documents (the ``text_field`` of each row, in order), read until ``max_chars`` characters."""
    where = f"dataset {dataset}:{','.join(data_files)}" if dataset in BUILDERS else \
        f"hub dataset {ALIASES.get(dataset, dataset)!r}"
    texts, total = [], 0
    rows = iter(_open(dataset, split, name, data_files, revision))
    for i in itertools.count():
        try:
            row = next(rows, None)
        except Exception as e:  # a malformed file or a dropped connection, met while streaming
            raise CompressError(f"{where}: could not read row {i}: {type(e).__name__}: {e}") from None
        if row is None:
            break
        if text_field not in row:
            raise CompressError(f"{where} has no column {text_field!r}; columns: {sorted(row)} "
                                "(set text_field to one of them)")
        text = row[text_field]
        if not isinstance(text, str):
            raise CompressError(f"{where}: row {i} column {text_field!r} holds {type(text).__name__}, not text "
                                "(set text_field to a text column, or fill the empty cells)")
        texts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return texts

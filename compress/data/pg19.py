"""Text from the Hugging Face hub through `datasets` (imported only when a hub dataset is asked
for). ``pg19`` is an alias for a Parquet copy of DeepMind's PG19 (Rae et al. 2019), the corpus
ShortGPT calibrates and evaluates on; any other hub id with a text column works the same way."""

from __future__ import annotations

from compress.errors import CompressError

ALIASES = {"pg19": "emozilla/pg19"}  # Parquet mirror of deepmind/pg19: train/validation/test, "text"
LABELS = {"pg19": "PG19"}


def load_hub_texts(dataset: str, split: str, text_field: str = "text",
                   max_chars: int | None = None, revision: str | None = None) -> list[str]:
    """Documents of a hub dataset split, streamed until ``max_chars`` characters are read."""
    try:
        import datasets  # lazy: only hub sources need it
    except ImportError:
        raise CompressError(f"dataset {dataset!r} comes from the hub and needs `pip install datasets`") from None
    hub_id = ALIASES.get(dataset, dataset)
    try:
        stream = datasets.load_dataset(hub_id, split=split, streaming=True, revision=revision)
    except Exception as e:  # network, unknown id, unknown split: all user-fixable
        raise CompressError(
            f"could not open hub dataset {hub_id!r} split {split!r}: {e}. "
            "Offline? Point the recipe at local text with `path:` instead of `dataset:`."
        ) from None
    texts, total = [], 0
    for row in stream:
        if text_field not in row:
            raise CompressError(f"hub dataset {hub_id!r} has no column {text_field!r}; "
                                f"columns: {sorted(row)} (set text_field)")
        texts.append(row[text_field])
        total += len(row[text_field])
        if max_chars is not None and total >= max_chars:
            break
    return texts

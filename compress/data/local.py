"""Text from local files: a .txt file, a .jsonl file (one {"text": ...} per line), or a folder of
them (read in sorted name order)."""

from __future__ import annotations

import json
from pathlib import Path

from compress.errors import CompressError

TEXT_SUFFIXES = (".txt", ".jsonl")


def text_files(path: Path) -> list[Path]:
    """The files a local text source consists of, sorted; CompressError if there are none."""
    if not path.exists():
        raise CompressError(f"text source {path} does not exist")
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise CompressError(f"text source {path}: expected a .txt or .jsonl file")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise CompressError(f"text source {path}: the folder holds no .txt or .jsonl files")
    return files


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CompressError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise CompressError(f"{path}:{lineno}: expected an object with a string {field!r}")
            texts.append(row[field])
    return texts


def load_local_texts(path: Path, text_field: str = "text", max_chars: int | None = None) -> list[str]:
    """Documents from a local source, stopping once ``max_chars`` characters are read."""
    texts: list[str] = []
    total = 0
    for file in text_files(path):
        try:
            docs = (_read_jsonl(file, text_field) if file.suffix == ".jsonl"
                    else [file.read_text(encoding="utf-8")])
        except UnicodeDecodeError as e:
            raise CompressError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        for doc in docs:
            texts.append(doc)
            total += len(doc)
            if max_chars is not None and total >= max_chars:
                return texts
    return texts

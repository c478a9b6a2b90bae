"""Text from local files: a .txt file, a .jsonl file (one {"text": ...} per line), or a folder of
them (read in sorted name order). Only regular files are read (a FIFO or a device such as /dev/zero
could block or never end), and reading stops once enough characters are in."""

from __future__ import annotations

import json
from pathlib import Path

from compress.errors import CompressError
from compress.paths import kind, regular_file

TEXT_SUFFIXES = (".txt", ".jsonl")


def text_files(path: Path) -> list[Path]:
    """The files a local text source consists of, sorted; CompressError if there are none (an empty
    file, a FIFO or a device counts as none)."""
    found = kind(path)
    if found == "absent":
        raise CompressError(f"text source {path} does not exist")
    if found != "a folder":
        regular_file(path, "text source")
        if path.suffix not in TEXT_SUFFIXES:
            raise CompressError(f"text source {path}: expected a .txt or .jsonl file")
        if path.stat().st_size == 0:
            raise CompressError(f"text source {path} is empty; perplexity and calibration need text "
                                "(at least 2 tokens)")
        return [path]
    files = sorted(p for p in path.iterdir()
                   if p.suffix in TEXT_SUFFIXES and kind(p) == "a file" and p.stat().st_size > 0)
    if not files:
        raise CompressError(f"text source {path}: the folder holds no non-empty regular .txt or .jsonl file")
    return files


def _read_jsonl(path: Path, field: str, max_chars: int | None) -> list[str]:
    texts, total = [], 0
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
            total += len(row[field])
            if max_chars is not None and total >= max_chars:
                break
    return texts


_CHUNK = 1 << 20  # characters a read


def _read_txt(path: Path, max_chars: int | None) -> list[str]:
    """The file's text, at most ``max_chars`` characters, read in bounded chunks."""
    chunks, left = [], max_chars
    with path.open(encoding="utf-8") as f:
        while left is None or left > 0:
            chunk = f.read(_CHUNK if left is None else min(left, _CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            left = None if left is None else left - len(chunk)
    return ["".join(chunks)]


def load_local_texts(path: Path, text_field: str = "text", max_chars: int | None = None) -> list[str]:
    """Documents from a local source, stopping once ``max_chars`` characters are read.
    CompressError if the source holds no text at all (only whitespace counts as none)."""
    texts: list[str] = []
    total = 0
    for file in text_files(path):
        if max_chars is not None and total >= max_chars:
            break
        left = None if max_chars is None else max_chars - total
        try:
            docs = _read_jsonl(file, text_field, left) if file.suffix == ".jsonl" else _read_txt(file, left)
        except UnicodeDecodeError as e:
            raise CompressError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        texts += docs
        total += sum(len(doc) for doc in docs)
    if not any(doc.strip() for doc in texts):
        raise CompressError(f"text source {path} holds no text (only whitespace or empty documents); "
                            "perplexity and calibration need text (at least 2 tokens)")
    return texts

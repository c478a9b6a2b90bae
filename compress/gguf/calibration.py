"""The text llama-imatrix reads: the calibration windows compress would use, decoded back to text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.errors import CompressError

DEFAULT_SAMPLES, DEFAULT_SEQ_LEN = 128, 512


def window_texts(tokenizer, batches: list[dict]) -> list[str]:
    """Each calibration window (rows of every batch's input_ids) decoded to text, special tokens dropped."""
    return [tokenizer.decode(row, skip_special_tokens=True) for b in batches for row in b["input_ids"].tolist()]


def _recipe_calibration(checkpoint: Path) -> tuple[dict[str, Any], Path] | None:
    prov = checkpoint / "compress.json"
    if not prov.is_file():
        return None
    try:
        raw = json.loads(prov.read_text())
    except ValueError:
        return None
    cal = (raw.get("recipe") or {}).get("calibration") if isinstance(raw, dict) else None
    if not isinstance(cal, dict):
        return None
    return cal, Path(raw.get("recipe_path") or checkpoint).resolve().parent


def imatrix_texts(checkpoint: Path, data: Path | None, samples: int | None,
                  seq_len: int | None) -> tuple[list[str], dict[str, Any], int]:
    """(texts, what was used, tokens per chunk) for ``compress export --imatrix``."""
    from transformers import AutoTokenizer

    from compress.data.calibration import calibration_data, calibration_description
    from compress.data.sources import CalibrationConfig

    if data is not None:
        raw: dict[str, Any] = {"path": str(data.resolve())}
        where = "--imatrix-data"
    else:
        found = _recipe_calibration(checkpoint)
        if found is None:
            raise CompressError(f"--imatrix: {checkpoint} has no compress.json with a recipe calibration to "
                                "take the text from; pass --imatrix-data FILE (a .txt/.jsonl file or folder)")
        raw, base = dict(found[0]), found[1]
        for key in ("path",):
            if raw.get(key) and not Path(raw[key]).is_absolute():
                raw[key] = str((base / raw[key]).resolve())
        where = "the recipe's calibration"
    raw["samples"] = samples or raw.get("samples") or DEFAULT_SAMPLES
    raw["seq_len"] = seq_len or raw.get("seq_len") or DEFAULT_SEQ_LEN
    raw.pop("batch_size", None)
    try:
        cal = CalibrationConfig(**raw)
    except Exception as e:  # pydantic's ValidationError: name what came from where
        raise CompressError(f"--imatrix: {where} is not a usable calibration ({str(e).splitlines()[0]})") from None
    tok = AutoTokenizer.from_pretrained(checkpoint)
    texts = window_texts(tok, calibration_data(tok, cal, "--imatrix-data" if data is not None else "calibration"))
    return texts, {"data": calibration_description(cal), "from": where}, cal.seq_len

"""MMLU questions (Hendrycks et al. 2021, arXiv 2009.03300) from a local folder, a JSONL file or
the hub (``cais/mmlu`` through `datasets`, imported only then).

Local layouts:
* the original CSV layout: ``<dir>/[data/]test/<subject>_test.csv`` and ``<dir>/[data/]dev/<subject>_dev.csv``,
  no header, columns question, A, B, C, D, answer letter;
* JSONL: ``{"subject", "question", "choices": [4], "answer": 0..3 or "A".."D"}`` per line, either a
  file or a folder holding ``mmlu_test.jsonl`` / ``mmlu_dev.jsonl``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompressError

SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management",
    "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios",
    "nutrition", "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
)
LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class MMLUQuestion:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3


def pretty_subject(subject: str) -> str:
    """``high_school_biology`` -> ``high school biology`` (as lm-eval's task descriptions)."""
    return subject.replace("_", " ")


def _answer(value, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
        return value
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return LETTERS.index(value.strip().upper())
    raise CompressError(f"{where}: answer {value!r} is not one of A, B, C, D (or 0..3)")


def _read_csv(path: Path, subject: str) -> list[MMLUQuestion]:
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if len(row) != 6:
                raise CompressError(f"{path}:{lineno}: expected 6 columns (question, A, B, C, D, answer), "
                                    f"got {len(row)}")
            rows.append(MMLUQuestion(subject, row[0], tuple(row[1:5]), _answer(row[5], f"{path}:{lineno}")))
    return rows


def _read_jsonl(path: Path) -> list[MMLUQuestion]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise CompressError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(d, dict) or not isinstance(d.get("choices"), list) or len(d["choices"]) != 4 \
                    or not isinstance(d.get("question"), str) or not isinstance(d.get("subject"), str):
                raise CompressError(f"{where}: expected subject, question and 4 choices")
            rows.append(MMLUQuestion(d["subject"], d["question"], tuple(map(str, d["choices"])),
                                     _answer(d.get("answer"), where)))
    return rows


def _group(rows: list[MMLUQuestion], subjects: list[str] | None) -> dict[str, list[MMLUQuestion]]:
    by_subject: dict[str, list[MMLUQuestion]] = {}
    for row in rows:
        if subjects is None or row.subject in subjects:
            by_subject.setdefault(row.subject, []).append(row)
    return dict(sorted(by_subject.items()))


def _split_dir(root: Path, split: str) -> Path | None:
    for candidate in (root / split, root / "data" / split):
        if candidate.is_dir():
            return candidate
    return None


def _load_local(root: Path, split: str, subjects: list[str] | None) -> dict[str, list[MMLUQuestion]]:
    if root.is_file():
        return _group(_read_jsonl(root), subjects) if split == "test" else {}
    jsonl = root / f"mmlu_{split}.jsonl"
    if jsonl.exists():
        return _group(_read_jsonl(jsonl), subjects)
    folder = _split_dir(root, split)
    if folder is None:
        return {}
    rows = []
    for path in sorted(folder.glob(f"*_{split}.csv")):
        subject = path.name[: -len(f"_{split}.csv")]
        if subjects is None or subject in subjects:
            rows += _read_csv(path, subject)
    return _group(rows, subjects)


def _load_hub(dataset: str, split: str, subjects: list[str] | None) -> dict[str, list[MMLUQuestion]]:
    try:
        import datasets
    except ImportError:
        raise CompressError("MMLU from the hub needs `pip install datasets`") from None
    try:
        data = datasets.load_dataset(dataset, "all", split=split)
    except Exception as e:  # network, unknown id or split
        raise CompressError(f"could not load MMLU {dataset!r} split {split!r}: {e}. Offline? "
                            "Use `path:` with a local folder (CSV layout) or JSONL file.") from None
    rows = [MMLUQuestion(d["subject"], d["question"], tuple(d["choices"]), int(d["answer"])) for d in data]
    return _group(rows, subjects)


def load_mmlu(source: str | Path, split: str = "test", subjects: list[str] | None = None,
              hub: bool = False) -> dict[str, list[MMLUQuestion]]:
    """Questions by subject (sorted), from a local source or (``hub``) a hub dataset id.
    An absent split gives {} (e.g. no dev split); an absent source or subject is an error."""
    unknown = sorted(set(subjects or []) - set(SUBJECTS))
    if unknown:
        raise CompressError(f"unknown MMLU subjects {unknown}; the 57 subjects are listed in compress/data/mmlu.py")
    if hub:
        return _load_hub(str(source), split, subjects)
    root = Path(source)
    if not root.exists():
        raise CompressError(f"MMLU source {root} does not exist")
    found = _load_local(root, split, subjects)
    if split == "test" and not found:
        raise CompressError(f"{root}: no MMLU test questions found (expected test/<subject>_test.csv, "
                            "data/test/..., mmlu_test.jsonl or a .jsonl file)")
    missing = sorted(set(subjects or []) - set(found))
    if split == "test" and missing:
        raise CompressError(f"{root}: no questions for subjects {missing}")
    return found

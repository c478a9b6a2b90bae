"""MMLU: lm-eval's prompt and scoring, batched correctly, loaders and their errors, and parity
with lm-evaluation-harness's own code."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from compress.data.mmlu import MMLUQuestion, load_mmlu
from compress.errors import CompressError
from compress.evaluate.mmlu import build_context, encode_pair, evaluate_mmlu
from conftest import tiny_model

REPO = Path(__file__).resolve().parents[2]


def q(subject: str, i: int, answer: int = 0, long: bool = False) -> MMLUQuestion:
    text = f"Question {i} about {subject}: which is right?" + (" Think it over." * 40 if long else "")
    return MMLUQuestion(subject, text, (f"first {i}", f"second {i}", f"third {i}", f"fourth {i}"), answer)


QUESTIONS = {"astronomy": [q("astronomy", i, i % 4) for i in range(7)],
             "high_school_biology": [q("high_school_biology", i, (i + 1) % 4, long=i == 3) for i in range(6)]}


def test_prompt_matches_lm_eval_template():
    exemplar, question = QUESTIONS["high_school_biology"][:2]
    assert build_context(question, []) == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "Question 1 about high_school_biology: which is right?\n"
        "A. first 1\nB. second 1\nC. third 1\nD. fourth 1\nAnswer:")
    assert build_context(question, [exemplar]) == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "Question 0 about high_school_biology: which is right?\n"
        "A. first 0\nB. second 0\nC. third 0\nD. fourth 0\nAnswer: B\n\n"
        "Question 1 about high_school_biology: which is right?\n"
        "A. first 1\nB. second 1\nC. third 1\nD. fourth 1\nAnswer:")


def test_encode_pair_moves_trailing_space_to_the_continuation(tiny_tokenizer):
    ctx, cont = encode_pair(tiny_tokenizer, "Answer: ", "A")
    assert ctx == tiny_tokenizer.encode("Answer:")
    assert ctx + cont == tiny_tokenizer.encode("Answer: A")


def reference_loglikelihoods(model, tokenizer, question, exemplars) -> list[float]:
    """Independent: each choice as its own full sequence, summed log-probs of its tokens."""
    context = build_context(question, exemplars)
    out = []
    for letter in "ABCD":
        ctx = tokenizer.encode(context)
        whole = tokenizer.encode(context + " " + letter)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1].float(), -1)
        cont = whole[len(ctx):]
        out.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    return out


def test_batched_scores_equal_one_sequence_per_choice_and_ignore_padding(tiny_tokenizer):
    model = tiny_model("llama", 2)
    model.config.max_position_embeddings = 4096  # no truncation here (the lm-eval parity test has it)
    one = evaluate_mmlu(model, tiny_tokenizer, QUESTIONS, shots=2, batch_size=1, progress=False)
    many = evaluate_mmlu(model, tiny_tokenizer, QUESTIONS, shots=2, batch_size=8, progress=False)
    flat = lambda r: [v for x in r.questions for v in x.loglikelihoods]  # noqa: E731
    assert flat(one) == pytest.approx(flat(many), abs=1e-5)
    for score in many.questions[:3] + many.questions[-3:]:
        qs = QUESTIONS[score.subject]
        ref = reference_loglikelihoods(model, tiny_tokenizer, qs[score.index], qs[:2])
        assert score.loglikelihoods == pytest.approx(ref, abs=1e-4)
        assert score.predicted == max(range(4), key=ref.__getitem__)


def test_without_dev_split_first_k_test_rows_are_exemplars_and_not_scored(tiny_tokenizer):
    model = tiny_model("llama", 2)
    r = evaluate_mmlu(model, tiny_tokenizer, QUESTIONS, shots=2, progress=False)
    assert r.exemplar_source == "first-k-of-test" and r.n_questions == (7 - 2) + (6 - 2)
    assert min(x.index for x in r.questions) == 2
    dev = {s: [q(s, 100 + i) for i in range(5)] for s in QUESTIONS}
    r = evaluate_mmlu(model, tiny_tokenizer, QUESTIONS, shots=2, dev_by_subject=dev, limit=3, progress=False)
    assert r.exemplar_source == "dev" and r.n_questions == 6 and r.per_subject["astronomy"][1] == 3


def test_macro_and_micro_accuracy(tiny_tokenizer, monkeypatch):
    # Fake scorer: always picks choice A. astronomy answers 0,1,2,3,0,1,2 -> 2/7; biology 1,2,3,0,1,2 -> 1/6.
    monkeypatch.setattr("compress.evaluate.mmlu.score_questions",
                        lambda model, tok, items, bs, progress: [[0.0, -1.0, -1.0, -1.0] for _ in items])
    r = evaluate_mmlu(tiny_model("llama", 1), tiny_tokenizer, QUESTIONS, shots=0, progress=False)
    assert r.per_subject["astronomy"] == (2, 7, pytest.approx(2 / 7))
    assert r.macro == pytest.approx((2 / 7 + 1 / 6) / 2) and r.micro == pytest.approx(3 / 13)


def write_csv_layout(root: Path) -> None:
    (root / "data/test").mkdir(parents=True)
    (root / "data/dev").mkdir(parents=True)
    (root / "data/test/astronomy_test.csv").write_text('"Why, then?",a,b,c,d,C\nSecond?,a,b,c,d,a\n')
    (root / "data/dev/astronomy_dev.csv").write_text("Dev?,a,b,c,d,B\n")


def test_loaders_csv_layout_and_jsonl(tmp_path):
    write_csv_layout(tmp_path / "mmlu")
    test = load_mmlu(tmp_path / "mmlu")
    assert test == {"astronomy": [MMLUQuestion("astronomy", "Why, then?", ("a", "b", "c", "d"), 2),
                                  MMLUQuestion("astronomy", "Second?", ("a", "b", "c", "d"), 0)]}
    assert load_mmlu(tmp_path / "mmlu", split="dev")["astronomy"][0].answer == 1
    jl = tmp_path / "q.jsonl"
    jl.write_text(json.dumps({"subject": "anatomy", "question": "Q?", "choices": ["1", "2", "3", "4"], "answer": 3}) + "\n")
    assert load_mmlu(jl)["anatomy"][0].answer == 3
    assert load_mmlu(jl, split="dev") == {}


@pytest.mark.parametrize("content, name, expected", [
    ("Q?,a,b,c\n", "data/test/astronomy_test.csv", "astronomy_test.csv:1: expected 6 columns (question, A, B, C, D, answer), got 4"),
    ("Q?,a,b,c,d,E\n", "data/test/astronomy_test.csv", "astronomy_test.csv:1: answer 'E' is not one of A, B, C, D"),
    ('{"subject": "x", "question": "q", "choices": ["a"]}\n', "q.jsonl", "q.jsonl:1: expected subject, question and 4 choices"),
    ("not json\n", "q.jsonl", "q.jsonl:1: not valid JSON"),
])
def test_loader_errors_name_file_line_and_fix(tmp_path, content, name, expected):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    with pytest.raises(CompressError) as e:
        load_mmlu(path if name.endswith(".jsonl") else tmp_path)
    assert expected in str(e.value)


def test_loader_errors_for_missing_things(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        load_mmlu(tmp_path / "nope")
    with pytest.raises(CompressError, match="no MMLU test questions found"):
        load_mmlu(tmp_path)
    with pytest.raises(CompressError, match=r"unknown MMLU subjects \['astrology'\]"):
        load_mmlu(tmp_path, subjects=["astrology"])


def _parity_module():
    spec = importlib.util.spec_from_file_location("mmlu_parity", REPO / "benchmarks/mmlu_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("shots", [0, 2])
def test_same_choices_and_loglikelihoods_as_lm_eval(shots, tiny_model_dir, tmp_path, monkeypatch):
    """lm-eval 0.4.13's own HFLM + task machinery on the same questions (local JSON, offline)."""
    pytest.importorskip("lm_eval", reason="lm-eval is part of the test extra: pip install -e '.[test]'")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    parity = _parity_module()
    test = {s: qs[2:6] for s, qs in QUESTIONS.items()}
    dev = {s: qs[:2] for s, qs in QUESTIONS.items()}
    theirs = parity.lm_eval_loglikelihoods(str(tiny_model_dir), test, dev, shots)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ours = evaluate_mmlu(model, AutoTokenizer.from_pretrained(tiny_model_dir), test, shots=shots,
                         dev_by_subject=dev, batch_size=4, progress=False)
    assert len(ours.questions) == 8
    for score in ours.questions:
        ref = theirs[score.subject][score.index]
        assert score.loglikelihoods == pytest.approx(ref, abs=1e-4)
        assert score.predicted == max(range(4), key=ref.__getitem__)

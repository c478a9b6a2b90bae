"""Parity of compress's MMLU scoring with lm-evaluation-harness's own code on the same questions.

Runs lm-eval (its HFLM model, its task/prompt machinery, its `mmlu` template) on a handful of MMLU
questions given as a local JSON dataset, then compress.evaluate.mmlu on the same questions, and
compares the four log-likelihoods of every question and the chosen answers.

    python benchmarks/mmlu_parity.py --model ../shared-cache/models/smollm2-135m-instruct \\
        --mmlu ../shared-cache/mmlu --subjects astronomy anatomy --per-subject 6 --shots 0 2

Needs `pip install lm-eval==0.4.13` (run offline: the data is local).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from compress.data.mmlu import MMLUQuestion, load_mmlu, pretty_subject
from compress.evaluate.mmlu import evaluate_mmlu

TEMPLATE = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
description: "The following are multiple choice questions (with answers) about {pretty}.\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _dump(rows: list[MMLUQuestion], path: Path) -> None:
    path.write_text("".join(json.dumps({"question": q.question, "choices": list(q.choices),
                                        "answer": q.answer, "subject": q.subject}) + "\n" for q in rows))


def lm_eval_loglikelihoods(model_dir: str, test: dict, dev: dict, shots: int) -> dict[str, list[list[float]]]:
    """lm-eval's per-question choice log-likelihoods, by subject, in test order."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    work = Path(tempfile.mkdtemp(prefix="mmlu-parity-"))
    tasks = []
    for subject in test:
        _dump(test[subject], work / f"{subject}_test.jsonl")
        _dump(dev[subject], work / f"{subject}_dev.jsonl")
        task = f"parity_mmlu_{subject}"
        (work / f"{task}.yaml").write_text(TEMPLATE.format(
            task=task, test=work / f"{subject}_test.jsonl", dev=work / f"{subject}_dev.jsonl",
            pretty=pretty_subject(subject)))
        tasks.append(task)
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks, num_fewshot=shots,
        task_manager=TaskManager(include_path=str(work)), log_samples=True, batch_size=1, device="cpu")
    result = {}
    for subject in test:
        samples = sorted(out["samples"][f"parity_mmlu_{subject}"], key=lambda s: s["doc_id"])
        result[subject] = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    return result


def compare(model_dir: str, mmlu: str, subjects: list[str], per_subject: int, shots: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    questions = load_mmlu(mmlu, subjects=subjects)
    # The shared MMLU copy has no dev split: its first 5 rows per subject stand in for dev (both
    # sides take the first `shots` of them), the next `per_subject` rows are scored.
    dev = {s: qs[:5] for s, qs in questions.items()}
    test = {s: qs[5 : 5 + per_subject] for s, qs in questions.items()}
    theirs = lm_eval_loglikelihoods(model_dir, test, dev, shots)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ours = evaluate_mmlu(model, tok, test, shots=shots, dev_by_subject=dev, batch_size=4, progress=False)
    diffs, same_choice, n = [], 0, 0
    for q in ours.questions:
        ref = theirs[q.subject][q.index]
        diffs.append(max(abs(a - b) for a, b in zip(q.loglikelihoods, ref)))
        same_choice += q.predicted == max(range(4), key=ref.__getitem__)
        n += 1
    return {"shots": shots, "questions": n, "max_abs_loglikelihood_diff": max(diffs),
            "same_choice": same_choice, "our_micro_accuracy": ours.micro}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--mmlu", required=True)
    ap.add_argument("--subjects", nargs="+", default=["astronomy", "anatomy"])
    ap.add_argument("--per-subject", type=int, default=6)
    ap.add_argument("--shots", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args()
    for k in args.shots:
        print(json.dumps(compare(args.model, args.mmlu, args.subjects, args.per_subject, k)))


if __name__ == "__main__":
    main()

"""MMLU accuracy, prompted and scored as lm-evaluation-harness 0.4.13's ``mmlu`` task does.

lm_eval/tasks/mmlu/default/_default_template_yaml + mmlu_<subject>.yaml, lm_eval/api/model.py
``_encode_pair`` and models/huggingface.py ``_loglikelihood_tokens``:

* prompt: "The following are multiple choice questions (with answers) about {subject}.\\n\\n",
  then k exemplars "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}" joined by
  "\\n\\n" (the dev split's first k, sampler ``first_n``), then the question, ending "Answer:";
* choices " A", " B", " C", " D"; each scored by the summed log-likelihood of its tokens given the
  context. Trailing whitespace of the context moves to the continuation; the context is encoded
  with the tokenizer's default special tokens and the continuation is whole[len(context):];
  sequences longer than the model's context are left-truncated; accuracy is argmax (``acc``).

When every choice is one token (most tokenizers), one forward over the context scores all four.
Reported: macro accuracy (mean over subjects), micro accuracy (over questions), per subject.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from compress.data.mmlu import LETTERS, MMLUQuestion, pretty_subject
from compress.data.tokens import pad_batch


@dataclass
class QuestionScore:
    subject: str
    index: int  # position in the subject's test list
    loglikelihoods: list[float]  # one per choice A..D
    predicted: int
    answer: int


@dataclass
class MMLUResult:
    macro: float
    micro: float
    per_subject: dict[str, tuple[int, int, float]]  # correct, total, accuracy
    n_questions: int
    shots: int
    exemplar_source: str  # "dev" | "first-k-of-test" | "none"
    questions: list[QuestionScore] = field(default_factory=list, repr=False)


def format_question(q: MMLUQuestion) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    return f"{q.question.strip()}{options}\nAnswer:"


def build_context(q: MMLUQuestion, exemplars: list[MMLUQuestion]) -> str:
    head = f"The following are multiple choice questions (with answers) about {pretty_subject(q.subject)}.\n\n"
    shots = "".join(f"{format_question(e)} {LETTERS[e.answer]}\n\n" for e in exemplars)
    return head + shots + format_question(q)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal ``_encode_pair``."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def _max_length(model) -> int:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return 2048


@torch.no_grad()
def _score_sequences(model, sequences: list[tuple[list[int], int]], pad_id: int, device) -> list[float]:
    """Summed log-prob of the last ``n`` tokens of each sequence (right-padded batch)."""
    inputs = [seq[:-1] for seq, _ in sequences]
    batch = pad_batch(inputs, pad_id)
    logits = model(input_ids=batch["input_ids"].to(device),
                   attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for row, (seq, n) in enumerate(sequences):
        last = len(seq) - 1  # number of input positions
        targets = torch.tensor(seq[-n:], device=logp.device)
        out.append(float(logp[row, last - n : last].gather(-1, targets[:, None]).sum()))
    return out


def _requests(tokenizer, q: MMLUQuestion, exemplars: list[MMLUQuestion], max_len: int):
    context = build_context(q, exemplars)
    pairs = [encode_pair(tokenizer, context, f" {letter}") for letter in LETTERS]
    return [((ctx + cont)[-(max_len + 1):], len(cont)) for ctx, cont in pairs]


def _shared_single_token(reqs) -> bool:
    """The four choices are one token each after the same context tokens."""
    return all(n == 1 for _, n in reqs) and all(seq[:-1] == reqs[0][0][:-1] for seq, _ in reqs)


def _last_logits(model, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    """Logits at each row's last real position only (the LM head runs on B positions, not B x T)."""
    hidden = model.base_model(input_ids=batch["input_ids"].to(device),
                              attention_mask=batch["attention_mask"].to(device), use_cache=False).last_hidden_state
    last = (batch["attention_mask"].sum(1) - 1).to(hidden.device)
    logits = model.get_output_embeddings()(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


@torch.no_grad()
def _score_contexts(model, questions, pad_id: int, device) -> list[list[float]]:
    """One forward per question over its context; the four choices read off the last position."""
    batch = pad_batch([reqs[0][0][:-1] for reqs in questions], pad_id)
    logp = torch.log_softmax(_last_logits(model, batch, device).float(), dim=-1)
    return [[float(logp[row, seq[-1]]) for seq, _ in reqs] for row, reqs in enumerate(questions)]


def score_questions(model, tokenizer, items: list[tuple[MMLUQuestion, list[MMLUQuestion]]],
                    batch_size: int = 8, progress: bool = True) -> list[list[float]]:
    """Log-likelihoods of the four choices for each (question, exemplars)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_len = _max_length(model)
    requests = [_requests(tokenizer, q, ex, max_len) for q, ex in items]
    out: list[list[float]] = []
    for i in tqdm(range(0, len(requests), batch_size), desc="mmlu", unit="batch", disable=not progress):
        chunk = requests[i : i + batch_size]
        if all(_shared_single_token(reqs) for reqs in chunk):
            out += _score_contexts(model, chunk, pad_id, device)
        else:
            flat = _score_sequences(model, [r for reqs in chunk for r in reqs], pad_id, device)
            out += [flat[j : j + 4] for j in range(0, len(flat), 4)]
    return out


def _exemplars(subject_qs, dev_qs, shots: int) -> tuple[list[MMLUQuestion], list[MMLUQuestion], str]:
    if shots == 0:
        return [], subject_qs, "none"
    if dev_qs:
        return dev_qs[:shots], subject_qs, "dev"
    return subject_qs[:shots], subject_qs[shots:], "first-k-of-test"


def evaluate_mmlu(model, tokenizer, questions_by_subject: dict[str, list[MMLUQuestion]], shots: int = 5,
                  dev_by_subject: dict[str, list[MMLUQuestion]] | None = None, limit: int | None = None,
                  batch_size: int = 8, progress: bool = True) -> MMLUResult:
    """Accuracy per subject, macro and micro. Without a dev split, the first ``shots`` test rows of
    each subject are the exemplars and are not scored (exemplar_source says so)."""
    items, owners, sources = [], [], set()
    for subject, qs in questions_by_subject.items():
        exemplars, scored, source = _exemplars(qs, (dev_by_subject or {}).get(subject), shots)
        sources.add(source)
        first = len(qs) - len(scored)
        for i, q in enumerate(scored[:limit] if limit else scored):
            items.append((q, exemplars))
            owners.append((subject, first + i))
    was_training = model.training
    model.eval()
    lls = score_questions(model, tokenizer, items, batch_size, progress)
    model.train(was_training)
    scores = [QuestionScore(s, i, ll, max(range(4), key=ll.__getitem__), q.answer)
              for (s, i), ll, (q, _) in zip(owners, lls, items)]
    per_subject = {}
    for subject in questions_by_subject:
        mine = [x for x in scores if x.subject == subject]
        correct = sum(x.predicted == x.answer for x in mine)
        per_subject[subject] = (correct, len(mine), correct / len(mine) if mine else float("nan"))
    counted = [v for v in per_subject.values() if v[1]]
    return MMLUResult(
        macro=sum(v[2] for v in counted) / len(counted),
        micro=sum(v[0] for v in counted) / sum(v[1] for v in counted),
        per_subject=per_subject, n_questions=len(scores), shots=shots,
        exemplar_source="/".join(sorted(sources)), questions=scores,
    )

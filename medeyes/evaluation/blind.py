"""The blind baseline: what a format-perfect policy that never looks at the image scores.

It answers every question with the majority gold answer of that question text on the training cases (the
overall majority for a question it never saw). Training logs it as ``eval/blind_accuracy`` beside the held-out
accuracy, and ``medeyes audit`` reports it per split.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from medeyes_env.rewards import accuracy_reward


def blind_answers(cases: list[Any]) -> dict[str, str]:
    """The majority gold answer per question text: what a format-perfect policy that ignores images says.

    >>> from medeyes_env.cases import Case
    >>> cs = [Case(id=str(i), question="q?", answer=a, answer_type="closed", source="s") for i, a in
    ...       enumerate(["yes", "no", "no"])]
    >>> blind_answers(cs)
    {'q?': 'no'}
    """
    by_question: dict[str, Counter[str]] = {}
    for case in cases:
        by_question.setdefault(case.question, Counter())[case.answer] += 1
    return {q: counts.most_common(1)[0][0] for q, counts in by_question.items()}


def blind_accuracy(train_cases: list[Any], eval_cases: list[Any]) -> float:
    """Accuracy on ``eval_cases`` of the majority answer per question (overall majority for unseen questions)."""
    table = blind_answers(train_cases)
    overall = Counter(c.answer for c in train_cases).most_common(1)[0][0] if train_cases else "yes"
    scores = [accuracy_reward(table.get(c.question, overall), c) for c in eval_cases]
    return float(sum(scores) / len(scores)) if scores else 0.0

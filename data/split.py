"""Holding out validation data from a run's datasets: whole submissions, or whole questions.

A grader is trusted on questions it never saw, so item-level runs validate on held-out questions
drawn across assignments (every answer to a held-out question leaves training), not on other
students' answers to the questions it trains on.
"""
from __future__ import annotations

import random
from typing import Literal

from data.anchors import question_key
from data.rubric import GradedSubmission

Split = Literal["questions", "submissions"]
# Item-level runs hold out questions when the data has at least this many; fewer, and a
# held-out question or two would make a noisy validation: submissions are held out instead.
MIN_QUESTIONS = 10


def _keys(sub: GradedSubmission) -> list[str]:
    return [question_key(it.question, m) for it, m in zip(sub.rubric_alignment, sub.item_max_scores())]


def choose_split(subs: list[GradedSubmission], example_unit: str, asked: str) -> Split:
    """What ``eval_split=asked`` holds out for these data: "auto" is questions for item-level runs
    on data with at least MIN_QUESTIONS questions, else submissions."""
    if asked in ("questions", "submissions"):
        return asked  # type: ignore[return-value]
    n_questions = len({k for s in subs for k in _keys(s)})
    return "questions" if example_unit == "item" and n_questions >= MIN_QUESTIONS else "submissions"


def split_submissions(subs: list[GradedSubmission], fraction: float, seed: int,
                      ) -> tuple[list[GradedSubmission], list[GradedSubmission]]:
    """(train, validation): ``fraction`` of the submissions held out at random (at least one,
    never all; none when fraction is 0 or there is only one)."""
    order = list(range(len(subs)))
    random.Random(seed).shuffle(order)
    n_eval = 0
    if fraction > 0 and len(subs) >= 2:
        n_eval = min(max(1, round(len(subs) * fraction)), len(subs) - 1)
    return [subs[i] for i in order[n_eval:]], [subs[i] for i in order[:n_eval]]


def _assignment(sub: GradedSubmission) -> str:
    title = (sub.model_extra or {}).get("assignment")
    return str(title) if title else "|".join(sorted(set(_keys(sub))))


def split_questions(subs: list[GradedSubmission], fraction: float, seed: int,
                    ) -> tuple[list[GradedSubmission], list[GradedSubmission], int]:
    """(train, validation, number of questions held out): ``fraction`` of the questions (at least
    two, never all) held out, taken in turn from each assignment so validation spans several;
    every answer to a held-out question goes to validation, the rest of its submission stays in
    training. A submission keeps its id in both parts; its total is the sum of its part's items."""
    rng = random.Random(seed)
    by_assignment: dict[str, list[str]] = {}
    for s in subs:
        for k in _keys(s):
            if k not in {q for qs in by_assignment.values() for q in qs}:
                by_assignment.setdefault(_assignment(s), []).append(k)
    n_questions = sum(len(v) for v in by_assignment.values())
    n_eval = min(max(2, round(n_questions * fraction)), n_questions - 1) if fraction > 0 else 0
    pools = [rng.sample(v, len(v)) for _, v in sorted(by_assignment.items())]
    rng.shuffle(pools)
    held: set[str] = set()
    while len(held) < n_eval:
        for pool in pools:
            if pool and len(held) < n_eval:
                held.add(pool.pop())
    train, val = [], []
    for s in subs:
        maxes = s.item_max_scores()
        parts: dict[bool, list] = {True: [], False: []}
        for it, m, k in zip(s.rubric_alignment, maxes, _keys(s)):
            parts[k in held].append(it.model_copy(update={"max_score": m}))
        for is_val, items in parts.items():
            if items:
                part = s.model_copy(update={"rubric_alignment": items, "score": sum(i.score for i in items),
                                            "max_score": sum(i.max_score for i in items)})
                (val if is_val else train).append(part)
    return train, val, len(held)

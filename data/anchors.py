"""Teacher anchors: answers to a question that already carry the teacher's score.

When some answers of a question are graded by the teacher (imported with the data, corrected in the
Review tab, or drawn by ``evaluate --anchors K``), grading that question uses them:

- an answer the teacher graded is graded as the teacher graded it (:meth:`AnchorBank.exact`);
- any other answer is graded with the most similar anchors in its prompt (``data.prompt_format``
  puts them beside the question, most similar last), so the model sees what this teacher accepts
  on this question; a model trained with ``train_anchors`` has learnt to read them;
- the anchors' own scores, weighted by similarity, are a second opinion
  (:attr:`AnchorChoice.neighbour_score`) that the confidence compares with the model's score.

Similarity is TF-IDF over character n-grams of the answers (scikit-learn), fitted per question on
its anchors: short answers with typos and code fragments match better on n-grams than on words.
"""
from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

# A longer anchor answer is cut to this many characters in the prompt (what matters is its gist;
# ten long anchors must not crowd out the student's answer).
ANCHOR_CHARS = 400
# Weight of an anchor in the neighbour score: similarity ** NEIGHBOUR_POWER (the nearest dominate).
NEIGHBOUR_POWER = 3


def tfidf():
    """The answers' vectorizer: TF-IDF over character 3-5-grams within words."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True)


def neighbour_score(scores: Sequence[float], similarity: Sequence[float]) -> float | None:
    """The anchors' scores weighted by similarity ** NEIGHBOUR_POWER: what the nearest graded
    answers suggest this answer earns (None without anchors)."""
    if not len(scores):
        return None
    w = (np.asarray(similarity, float) + 1e-3) ** NEIGHBOUR_POWER
    return float(w @ np.asarray(scores, float) / w.sum())


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKC", str(text)).casefold()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def question_key(question: str, max_score: float) -> str:
    """Names a question across rubrics and datasets: its text (case, punctuation and spacing
    ignored) and its maximum. Two assignments asking the same question share anchors."""
    return f"{_norm(question)}|{float(max_score):g}"


def answer_key(answer: str) -> str:
    """An answer's text with case, punctuation and spacing ignored: equal keys, same answer."""
    return _norm(answer)


@dataclass(frozen=True)
class Anchor:
    """One answer to a question with the teacher's score. ``source`` says where the score came
    from (``correction 12``, ``dataset mohler-csv``, ``evaluation draw 1``), for reports."""

    answer: str
    score: float
    source: str = ""


@dataclass(frozen=True)
class AnchorChoice:
    """The anchors picked for one answer: ``exact`` is an anchor with the same answer (graded as
    the teacher graded it); ``anchors`` the most similar others, least similar first, with their
    similarities (0..1) in ``similarity``."""

    exact: Anchor | None = None
    anchors: tuple[Anchor, ...] = ()
    similarity: tuple[float, ...] = ()

    @property
    def nearest_similarity(self) -> float | None:
        return max(self.similarity) if self.similarity else None

    @property
    def neighbour_score(self) -> float | None:
        """The score the anchors suggest (:func:`neighbour_score`)."""
        return neighbour_score([a.score for a in self.anchors], self.similarity)

    def for_prompt(self) -> list[tuple[str, float]]:
        """(answer, score) pairs as the prompt shows them."""
        return [(a.answer, a.score) for a in self.anchors]


@dataclass
class _Index:
    anchors: list[Anchor]
    vectorizer: object = None
    matrix: object = None
    exact: dict[str, Anchor] = field(default_factory=dict)


class AnchorBank:
    """Anchors by question (:func:`question_key`). Later anchors of the same answer replace earlier
    ones (a newer correction is the teacher's current word)."""

    def __init__(self) -> None:
        self._by_question: dict[str, dict[str, Anchor]] = {}
        self._index: dict[str, _Index] = {}

    def add(self, question: str, max_score: float, anchor: Anchor) -> None:
        if not anchor.answer.strip():
            return
        key = question_key(question, max_score)
        self._by_question.setdefault(key, {})[answer_key(anchor.answer)] = anchor
        self._index.pop(key, None)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_question.values())

    def __bool__(self) -> bool:
        return bool(self._by_question)

    def of(self, question: str, max_score: float) -> list[Anchor]:
        """The anchors of one question."""
        return list(self._by_question.get(question_key(question, max_score), {}).values())

    def questions(self) -> int:
        return len(self._by_question)

    def _indexed(self, key: str) -> _Index | None:
        if key not in self._by_question:
            return None
        if key not in self._index:
            anchors = list(self._by_question[key].values())
            vec = tfidf()
            matrix = vec.fit_transform([a.answer for a in anchors])
            self._index[key] = _Index(anchors, vec, matrix, {answer_key(a.answer): a for a in anchors})
        return self._index[key]

    def choose(self, question: str, max_score: float, answer: str, k: int) -> AnchorChoice:
        """The anchors for grading ``answer`` to ``question``: the exact one when the teacher graded
        this very answer, else up to ``k`` most similar (least similar first)."""
        idx = self._indexed(question_key(question, max_score))
        if idx is None:
            return AnchorChoice()
        same = idx.exact.get(answer_key(answer))
        if same is not None:
            return AnchorChoice(exact=same)
        if k <= 0:
            return AnchorChoice()
        sims = (idx.vectorizer.transform([answer]) @ idx.matrix.T).toarray()[0]
        top = sorted(np.argsort(-sims, kind="stable")[:k].tolist(), key=lambda j: (sims[j], -j))
        return AnchorChoice(anchors=tuple(idx.anchors[j] for j in top),
                            similarity=tuple(round(float(sims[j]), 4) for j in top))


def anchor_prompt_text(answer: str) -> str:
    """An anchor's answer as the prompt shows it: one line, at most ANCHOR_CHARS characters."""
    text = " ".join(answer.split())
    return text if len(text) <= ANCHOR_CHARS else text[: ANCHOR_CHARS - 1].rstrip() + "…"


def pick_to_grade_first(answers: Sequence[str], k: int, graded: Sequence[int] = ()) -> list[int]:
    """Which ``k`` more of a question's answers the teacher should grade, so that every other answer
    has a close anchor: with none ``graded`` yet, the most typical answer first; then each time the
    answer least like those already graded or picked (the most unusual), by TF-IDF similarity.
    Indices into ``answers``, never one of ``graded`` nor an empty answer."""
    live = [j for j, a in enumerate(answers) if a.strip()]
    todo = [j for j in live if j not in set(graded)]
    if k <= 0 or not todo:
        return []
    if len(todo) <= k:
        return todo
    m = tfidf().fit_transform([answers[j] for j in live])
    sims = (m @ m.T).toarray()
    pos = {j: n for n, j in enumerate(live)}
    taken = [pos[j] for j in graded if j in pos]
    picked: list[int] = []
    if not taken:
        picked = [int(np.argmax(sims.mean(axis=1)))]
        taken = list(picked)
    closest = sims[taken].max(axis=0)
    while len(picked) < k:
        closest[taken] = np.inf
        nxt = int(np.argmin(closest))
        picked.append(nxt)
        taken.append(nxt)
        closest = np.maximum(closest, sims[nxt])
    return [live[n] for n in picked]


def draw_anchors(groups: dict[str, list[int]], k: int, rng: random.Random) -> set[int]:
    """``k`` members of each group drawn at random (all of a group with k or fewer): the answers
    that serve as anchors in one draw of ``evaluate --anchors K`` and of training prompts."""
    out: set[int] = set()
    for members in groups.values():
        out.update(rng.sample(members, min(k, len(members))))
    return out


def bank_from(rows: Iterable[tuple[str, float, str, float, str]]) -> AnchorBank:
    """A bank from (question, max_score, answer, score, source) rows."""
    bank = AnchorBank()
    for question, max_score, answer, score, source in rows:
        bank.add(question, max_score, Anchor(answer=answer, score=float(score), source=source))
    return bank


# Training prompts: the share that shows no anchor (grading a question nobody has anchored yet).
NO_ANCHOR_SHARE = 0.25


def _counts(answers: Sequence[str]) -> np.ndarray:
    """The answers' n-gram counts under :func:`tfidf`'s analyzer, sublinear (1 + log tf), dense
    (one question's answers: tens of rows)."""
    from sklearn.feature_extraction.text import CountVectorizer

    params = tfidf().get_params()
    m = CountVectorizer(analyzer=params["analyzer"], ngram_range=params["ngram_range"]).fit_transform(answers)
    m = m.toarray().astype(float)
    seen = m > 0
    m[seen] = 1.0 + np.log(m[seen])
    return m


def _pool_similarities(tf: np.ndarray, query: int, pool: Sequence[int]) -> np.ndarray:
    """Similarity of answer ``query`` to each answer of ``pool`` as :func:`tfidf` fitted on the
    pool measures it (its vocabulary and smoothed idf), from the question's counts ``tf``."""
    rows = tf[list(pool)]
    df = (rows > 0).sum(axis=0)
    idf = np.where(df > 0, np.log((1 + len(pool)) / (1 + df)) + 1.0, 0.0)
    a = rows * idf
    q = tf[query] * idf
    a_norm, q_norm = np.linalg.norm(a, axis=1), np.linalg.norm(q)
    if q_norm == 0:
        return np.zeros(len(pool))
    return (a @ q) / (np.where(a_norm > 0, a_norm, 1.0) * q_norm)


def training_anchors(groups: list[list[str]], k: int, seed: int) -> list[list[list[tuple[int, float]]]]:
    """For each answer of each question (``groups``: the answers of one question), the other
    answers of that question its training prompt shows as anchors, least similar first, as
    (index in the group, similarity) pairs.

    Like grading: a teacher has graded some answers of the question (a pool of 1 to 2k others,
    drawn at random; none for NO_ANCHOR_SHARE of the prompts) and the prompt shows the k most
    similar of them, the similarity measured as :meth:`AnchorBank.choose` measures it (the
    vectorizer fitted on the graded answers). Deterministic for a seed."""
    rng = random.Random(seed)
    out: list[list[list[tuple[int, float]]]] = []
    for answers in groups:
        n = len(answers)
        if n < 2 or k <= 0:
            out.append([[] for _ in answers])
            continue
        try:
            tf = _counts(answers)
        except ValueError:  # not a single character n-gram in any answer (answers like "-")
            tf = None
        picks: list[list[tuple[int, float]]] = []
        for i in range(n):
            if rng.random() < NO_ANCHOR_SHARE:
                picks.append([])
                continue
            others = [j for j in range(n) if j != i]
            pool = rng.sample(others, min(len(others), rng.randint(1, 2 * k)))
            sims = _pool_similarities(tf, i, pool) if tf is not None else np.zeros(len(pool))
            top = sorted(np.argsort(-sims, kind="stable")[:k].tolist(), key=lambda c: (sims[c], -c))
            picks.append([(pool[c], round(float(sims[c]), 4)) for c in top])
        out.append(picks)
    return out

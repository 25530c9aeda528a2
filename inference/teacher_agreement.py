"""Agreement of each adapter with the teacher's corrections (the Review tab's): MAE, Pearson r and
QWK (``scoring.metrics.compute_metrics``) per question and overall, the counts behind a
confusion plot of model vs teacher scores, and the order of adapters in time for a trend.

A correction is the teacher's score for one answer to one question. Every adapter that graded the
same submission text is compared with it, not only the one whose grade was corrected, so a new run
is measured on the answers the teacher already checked. An adapter that graded one answer several
times counts its newest grade. Overall figures over questions with different maxima put scores on
a common 0-10 scale first (score / max * 10), as ``inference.evaluate`` does, and say so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.store import ReviewItem, Store
from scoring.metrics import scaled_metrics

SHOWN_METRICS = ("mae", "pearson_r", "qwk", "exact")


@dataclass(frozen=True)
class ScorePair:
    """One corrected answer as one adapter scored it."""

    grade_id: int
    correction_id: int
    question_label: str
    question: str
    max_score: float
    model_score: float
    teacher_score: float


@dataclass
class QuestionAgreement:
    """Agreement on one question (its label, text and maximum)."""

    question_label: str
    question: str
    max_score: float
    metrics: dict[str, Any]  # compute_metrics' result


@dataclass
class AdapterAgreement:
    """One adapter (or the base model alone) against the teacher."""

    adapter: str | None  # the adapter folder; None: the base model alone
    base_model: str
    label: str  # how people see it: <run>/<checkpoint>, or "<base> (base)"
    trained_at: float | None  # when the adapter was completed (its complete.json); None: unknown or base
    first_graded_at: str
    pairs: list[ScorePair]
    overall: dict[str, Any]  # compute_metrics' result plus "normalized_to_0_10"
    per_question: list[QuestionAgreement] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.pairs)

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "base_model": self.base_model, "label": self.label,
                "trained_at": self.trained_at, "first_graded_at": self.first_graded_at, "n": self.n,
                "overall": self.overall,
                "per_question": [{"question_label": q.question_label, "question": q.question,
                                  "max_score": q.max_score, **q.metrics} for q in self.per_question],
                "pairs": [p.__dict__ for p in self.pairs]}


def adapter_label(adapter: str | None, base_model: str) -> str:
    """<run>/<checkpoint> for an adapter in the checkpoints folder, else its path; the base alone
    is "<base> (base)"."""
    if adapter is None:
        return f"{base_model} (base)"
    from data import paths

    path = Path(adapter)
    try:
        return str(path.relative_to(paths.checkpoints_dir().resolve()))
    except ValueError:
        return str(path)


def _trained_at(adapter: str | None) -> float | None:
    if adapter is None:
        return None
    from data.run_folder import read_complete

    when = (read_complete(adapter) or {}).get("time")
    return float(when) if isinstance(when, (int, float)) else None


def agreement_metrics(teacher: list[float], model: list[float], maxes: list[float], *, n_boot: int = 1000) -> dict:
    """compute_metrics of model vs teacher scores; mixed maxima on a 0-10 scale (and said so)."""
    return scaled_metrics(teacher, model, maxes, n_boot=n_boot)


def _pairs_by_adapter(items: list[ReviewItem]) -> dict[tuple[str | None, str], list[ReviewItem]]:
    """Each adapter's newest grade of each corrected answer."""
    newest: dict[tuple[str | None, str, str], ReviewItem] = {}
    for q in sorted(items, key=lambda q: q.grade_id):
        newest[(q.adapter, q.base_model, q.answer_key)] = q
    out: dict[tuple[str | None, str], list[ReviewItem]] = {}
    for (adapter, base, _), q in newest.items():
        out.setdefault((adapter, base), []).append(q)
    return out


def teacher_agreement(store: Store | None = None, *, adapters: set[str | None] | None = None,
                      n_boot: int = 1000) -> list[AdapterAgreement]:
    """Agreement with the teacher for every adapter that graded a corrected answer (``adapters``:
    only these folders; None in the set is the base alone), ordered by time: the base model first,
    then adapters by when they were trained (unknown: by their first grade)."""
    store = store if store is not None else Store()
    items = store.corrected_review_items()
    out: list[AdapterAgreement] = []
    for (adapter, base), qs in _pairs_by_adapter(items).items():
        if adapters is not None and adapter not in adapters:
            continue
        qs.sort(key=lambda q: (q.question_label, q.question, q.grade_id))
        pairs = [ScorePair(q.grade_id, q.correction.id, q.question_label, q.question, q.max_score, q.model_score,
                           q.correction.teacher_score) for q in qs if q.correction is not None]
        overall = agreement_metrics([p.teacher_score for p in pairs], [p.model_score for p in pairs],
                                    [p.max_score for p in pairs], n_boot=n_boot)
        groups: dict[tuple[str, str, float], list[ScorePair]] = {}
        for p in pairs:
            groups.setdefault((p.question_label, p.question, p.max_score), []).append(p)
        per_question = [QuestionAgreement(label, question, top, agreement_metrics(
            [p.teacher_score for p in ps], [p.model_score for p in ps], [top] * len(ps), n_boot=n_boot))
            for (label, question, top), ps in groups.items()]
        out.append(AdapterAgreement(adapter=adapter, base_model=base, label=adapter_label(adapter, base),
                                    trained_at=_trained_at(adapter), first_graded_at=min(q.graded_at for q in qs),
                                    pairs=pairs, overall=overall, per_question=per_question))
    out.sort(key=lambda a: (a.adapter is not None, a.trained_at is None,
                            a.trained_at or 0.0, a.first_graded_at))
    return out


def confusion_counts(pairs: list[ScorePair]) -> tuple[list[int], list[list[int]]]:
    """(scores, counts): counts[i][j] is how many answers the teacher scored scores[i] and the
    model scores[j], both rounded to whole points (over 0..the largest maximum)."""
    top = int(round(max((p.max_score for p in pairs), default=0)))
    scores = list(range(top + 1))
    counts = [[0] * len(scores) for _ in scores]
    for p in pairs:
        t = min(max(int(round(p.teacher_score)), 0), top)
        m = min(max(int(round(p.model_score)), 0), top)
        counts[t][m] += 1
    return scores, counts


def _cell(m: dict) -> str:
    v = m.get("value")
    if v is None:
        return "n/a"
    if m.get("ci_low") is None:
        return f"{v:.3f}"
    return f"{v:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def format_overall(results: list[AdapterAgreement]) -> str:
    """Markdown: one row per adapter (oldest first), agreement over every corrected answer."""
    if not results:
        return "No corrections yet: correct some questions in the Review tab first."
    lines = ["| adapter | n | " + " | ".join(SHOWN_METRICS) + " |", "|---|---" + "|---" * len(SHOWN_METRICS) + "|"]
    for a in results:
        note = " (0-10 scale)" if a.overall.get("normalized_to_0_10") else ""
        lines.append(f"| {a.label}{note} | {a.n} | " + " | ".join(_cell(a.overall[k]) for k in SHOWN_METRICS) + " |")
    return "\n".join(lines)


def format_by_question(a: AdapterAgreement) -> str:
    """Markdown: one adapter's agreement question by question."""
    lines = ["| question | max | n | " + " | ".join(SHOWN_METRICS) + " |",
             "|---|---|---" + "|---" * len(SHOWN_METRICS) + "|"]
    for q in a.per_question:
        text = (q.question if len(q.question) <= 60 else q.question[:57] + "...").replace("|", "\\|")
        lines.append(f"| {q.question_label}: {text} | {q.max_score:g} | {q.metrics['n']} | "
                     + " | ".join(_cell(q.metrics[k]) for k in SHOWN_METRICS) + " |")
    return "\n".join(lines)


def format_agreement(results: list[AdapterAgreement]) -> str:
    """Markdown: the adapters' table (overall), then each adapter's by question."""
    if not results:
        return format_overall(results)
    parts = ["**Agreement with the teacher** (oldest adapter first)", "", format_overall(results)]
    for a in results:
        parts += ["", f"**{a.label}, by question**", "", format_by_question(a)]
    return "\n".join(parts)

"""The grades CSV: one shape for every place that writes one (``python -m inference batch`` and the
Grade tab's many-submissions download).

One row per question of each submission, so a spreadsheet or pandas reads the justifications
beside the scores; the submission's total, feedback, repairs and what graded it repeat on each of
its rows (filter or pivot on ``file`` for one row per submission).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from inference.repair import repair_messages

if TYPE_CHECKING:  # the engine imports torch lazily; writing a CSV should not need it
    from inference.engine import GradeResult

GRADES_CSV_COLUMNS = ("file", "question", "score", "max_score", "confidence", "needs_review", "justification",
                      "total", "max_total", "feedback", "repaired", "repairs", "scoring", "base_model", "adapter")


def write_grades_csv(path: str | Path, graded: Iterable[tuple[str, "GradeResult"]]) -> Path:
    """Write (submission name, GradeResult) pairs to ``path`` as the grades CSV (UTF-8, columns
    GRADES_CSV_COLUMNS, one row per question); returns the path."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(GRADES_CSV_COLUMNS)
        for name, res in graded:
            g = res.grade
            conf = res.confidence or [None] * len(g.items)
            for it, c, review in zip(g.items, conf, res.needs_review):
                w.writerow([name, it.question, it.score, it.max_score, "" if c is None else c, int(review),
                            it.justification or "", g.score, g.max_score,
                            g.feedback or "", int(res.repaired), repair_messages(res.repairs), res.scoring,
                            res.base_model, res.adapter or ""])
    return path

"""Item grading computes each question's shared prefix once (issue #14): grading many submissions
of a rubric together gives the grades each gets when graded alone, with and without an adapter."""
from __future__ import annotations

from pathlib import Path

import pytest

from data.loading import load_rubric
from data.markdown import read_markdown
from inference.engine import get_engine
from tests.conftest import random_lora_adapter
from tests.conftest import REPO

SUBMISSIONS = REPO / "data" / "samples" / "submissions"
RUBRICS = REPO / "data" / "samples" / "rubrics"


@pytest.fixture(scope="module")
def item_adapter(tiny_gpt_oss_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An item-level adapter with random, non-zero LoRA weights, so it changes the scores."""
    out = tmp_path_factory.mktemp("item_adapter") / "final"
    return random_lora_adapter(tiny_gpt_oss_dir, out, 3, {"name": "items", "example_unit": "item"})


def _items() -> list:
    """Every sample submission with its rubric: several rubrics, two or three submissions each."""
    out = []
    for path in sorted(SUBMISSIONS.glob("*.md")):
        rubric_file = next(r for r in sorted(RUBRICS.glob("*.json"), key=lambda r: -len(r.stem))
                           if path.stem.startswith(r.stem))
        out.append((path.name, read_markdown(path), load_rubric(rubric_file)))
    return out


@pytest.mark.parametrize("with_adapter", [False, True])
def test_grading_together_gives_the_grades_each_gets_alone(tiny_gpt_oss_dir: Path, item_adapter: Path,
                                                           with_adapter: bool) -> None:
    engine = get_engine(str(tiny_gpt_oss_dir), device="cpu")
    adapter = item_adapter if with_adapter else None
    items = _items()
    together = engine.grade_many(items, adapter=adapter, batch_size=4)
    finished: list[int] = []
    engine.grade_many(items, adapter=adapter, batch_size=4, on_batch=lambda done: finished.extend(i for i, _ in done))
    assert sorted(finished) == list(range(len(items)))  # every submission reported once, as its batch ends
    for (name, md, rubric), got in zip(items, together):
        alone = engine.grade(md, rubric, adapter=adapter, unit="item")
        assert got.unit == alone.unit == "item" and got.repairs == []
        assert [it.question for it in got.grade.items] == [q.question for q in rubric.questions]
        for a, b in zip(got.score_probs, alone.score_probs):
            assert a.keys() == b.keys()
            assert [a[k] for k in a] == pytest.approx([b[k] for k in b], abs=2e-4), name
        assert [it.score for it in got.grade.items] == pytest.approx([it.score for it in alone.grade.items],
                                                                     abs=0.011), name
    # The adapter is in the shared prefix too: its grades differ from the base's.
    if with_adapter:
        base = engine.grade_many(items, adapter=None, batch_size=4)
        assert [r.grade.score for r in base] != [r.grade.score for r in together]

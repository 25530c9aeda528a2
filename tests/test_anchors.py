"""Teacher anchors (issue #26): answers the teacher graded change the prompts of their own question
only, an answer the teacher graded is graded as the teacher graded it, the most similar anchors are
the ones shown (most similar last) and give way before the student's answer is cut, training prompts
draw anchors from the same question's other answers, and an ensemble of adapters averages their
score distributions."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from data.anchors import Anchor, AnchorBank, draw_anchors, pick_to_grade_first, training_anchors
from data.prompt_format import build_score_examples, encode_score_prompt, harmony_encoding
from data.rubric import GradedSubmission, Rubric, RubricQuestion
from inference.engine import get_engine
from tests.conftest import random_lora_adapter

RUBRIC = Rubric(questions=[
    RubricQuestion(question="What is a stack?", max_score=5, question_id="1", reference_answer="A LIFO list."),
    RubricQuestion(question="What is a queue?", max_score=5, question_id="2", reference_answer="A FIFO list.")])
MD = "## Question 1: What is a stack?\n\nA pile where the last item in comes out first.\n\n" \
     "## Question 2: What is a queue?\n\nFirst in, first out.\n"
STACK_ANSWERS = ["A list where you push and pop at the top, last in first out.",
                 "It is a data structure.",
                 "An array sorted by key.",
                 "A pile where the last item in comes out first, like plates."]


def _bank(rows: list[tuple[str, float]], question: str = "What is a stack?") -> AnchorBank:
    bank = AnchorBank()
    for n, (answer, score) in enumerate(rows):
        bank.add(question, 5, Anchor(answer, score, source=f"t{n}"))
    return bank


@pytest.fixture(scope="module")
def item_adapters(tiny_gpt_oss_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("anchor_adapters")
    cfg = {"example_unit": "item", "train_anchors": 3}
    return (random_lora_adapter(tiny_gpt_oss_dir, root / "a", 5, {"name": "a", **cfg}),
            random_lora_adapter(tiny_gpt_oss_dir, root / "b", 6, {"name": "b", **cfg}))


def test_the_most_similar_anchors_are_chosen_most_similar_last() -> None:
    bank = _bank([(a, s) for a, s in zip(STACK_ANSWERS, [5, 2, 0, 4.5])])
    choice = bank.choose("what is a STACK?", 5, "the last item pushed on the pile comes out first", k=2)
    assert choice.exact is None
    assert [a.source for a in choice.anchors] == ["t0", "t3"]  # the plates answer is the closest
    assert choice.similarity[0] <= choice.similarity[1]
    assert 4.5 <= choice.neighbour_score <= 5
    assert bank.choose("What is a queue?", 5, "FIFO", k=2).anchors == ()  # another question: none
    assert bank.choose("What is a stack?", 10, "LIFO", k=2).anchors == ()  # another maximum: another question


def test_an_answer_the_teacher_graded_is_matched_whatever_its_spacing_and_case() -> None:
    bank = _bank([("Last in, first out.", 5)])
    assert bank.choose("What is a stack?", 5, "  last IN first out ", k=3).exact.score == 5
    bank.add("What is a stack?", 5, Anchor("last in first out", 3, "newer"))  # the teacher's newer word counts
    assert bank.choose("What is a stack?", 5, "Last in, first out.", k=3).exact.source == "newer"


def test_grade_first_picks_the_most_typical_then_the_most_unusual_answers() -> None:
    answers = ["last in first out", "last in, first out!", "last in first out order", "a hash table of keys", ""]
    picked = pick_to_grade_first(answers, 2)
    assert picked[0] in (0, 1, 2) and picked[1] == 3
    assert sorted(pick_to_grade_first(answers, 9)) == [0, 1, 2, 3]  # all of them, never the empty answer


def test_draws_take_k_of_each_question_at_random() -> None:
    drawn = draw_anchors({"q1": list(range(10)), "q2": [10, 11]}, 3, random.Random(0))
    assert len(drawn & set(range(10))) == 3 and {10, 11} <= drawn


def test_anchors_give_way_before_the_student_answer_is_cut(gpt_oss_tokenizer) -> None:
    tok = gpt_oss_tokenizer
    answer = "The last element pushed is the first popped. " * 3
    anchors = [(f"anchor answer number {n} " * 12, n % 6) for n in range(6)]
    plain = encode_score_prompt(tok, "harmony", RUBRIC, 0, answer)
    full = encode_score_prompt(tok, "harmony", RUBRIC, 0, answer, anchors=anchors)
    text = harmony_encoding().decode(full.input_ids)
    assert full.n_anchors == 6 and "anchor answer number 5" in text and "4 of 5: anchor answer number 4" in text
    assert text.index("number 0") < text.index("number 5") < text.index("The last element pushed")
    budget = len(plain.input_ids) + 140  # room for the answer and one or two anchors, not six
    cut = encode_score_prompt(tok, "harmony", RUBRIC, 0, answer, budget, anchors=anchors)
    assert not cut.truncated and 0 < cut.n_anchors < 6 and len(cut.input_ids) <= budget
    assert "number 5" in harmony_encoding().decode(cut.input_ids)  # the most similar stay
    assert "number 0" not in harmony_encoding().decode(cut.input_ids)


def test_anchors_change_only_their_own_question_and_a_graded_answer_keeps_the_teachers_score(
        tiny_gpt_oss_dir: Path, item_adapters: tuple[Path, Path]) -> None:
    engine = get_engine(str(tiny_gpt_oss_dir), device="cpu")
    a, _ = item_adapters
    items = [("s1", MD, RUBRIC)]
    plain = engine.grade_items(items, adapter=a)[0]
    bank = _bank([(x, s) for x, s in zip(STACK_ANSWERS[:3], [5, 2, 0])])
    anchored = engine.grade_items(items, adapter=a, anchors=bank)[0]
    assert anchored.score_probs[1] == plain.score_probs[1]  # question 2 has no anchors: untouched
    assert anchored.score_probs[0] != plain.score_probs[0]  # question 1's prompt shows three
    assert sorted(anchored.anchors[0]["in_prompt"]) == ["t0", "t1", "t2"]  # as many as the adapter learnt (3)
    assert anchored.anchors[1] is None
    no_prompt = engine.grade_items(items, adapter=a, anchors=bank, anchors_shown=0)[0]
    assert no_prompt.score_probs == plain.score_probs  # compared, not shown
    assert no_prompt.anchors[0]["in_prompt"] == [] and no_prompt.anchors[0]["neighbour_score"] is not None

    bank.add("What is a stack?", 5, Anchor("A pile where the last item in comes out first.", 4.5, "correction 7"))
    graded = engine.grade_items(items, adapter=a, anchors=bank)[0]
    assert graded.grade.items[0].score == 4.5 and graded.confidence[0] == 1.0
    assert graded.anchors[0] == {"exact": "correction 7"} and graded.score_probs[0] is None
    assert graded.score_probs[1] == plain.score_probs[1]
    assert graded.grade.score == pytest.approx(4.5 + plain.grade.items[1].score, abs=0.011)


def test_an_ensemble_of_two_adapters_is_the_mean_of_their_distributions(
        tiny_gpt_oss_dir: Path, item_adapters: tuple[Path, Path]) -> None:
    engine = get_engine(str(tiny_gpt_oss_dir), device="cpu")
    a, b = item_adapters
    items = [("s1", MD, RUBRIC), ("s2", MD.replace("First in, first out.", "Like a line at a shop."), RUBRIC)]
    ra, rb = engine.grade_items(items, adapter=a), engine.grade_items(items, adapter=b)
    both = engine.grade_items(items, adapter=[a, b])
    for x, y, z in zip(ra, rb, both):
        assert z.ensemble == [str(a.resolve()), str(b.resolve())]
        for pa, pb, pz, item in zip(x.score_probs, y.score_probs, z.score_probs, z.grade.items):
            assert [pz[v] for v in pz] == pytest.approx([(pa[v] + pb[v]) / 2 for v in pa], abs=2e-4)
            assert item.score == pytest.approx(sum(int(v) * (pa[v] + pb[v]) / 2 for v in pa), abs=0.011)
    assert [r.grade.score for r in both] != [r.grade.score for r in ra]


def test_training_prompts_show_other_answers_of_the_same_question(gpt_oss_tokenizer) -> None:
    tok = gpt_oss_tokenizer
    subs = [GradedSubmission.model_validate({
        "submission_id": f"s{n}", "score": n % 6 + 1, "max_score": 10, "rubric_alignment": [
            {"question": "What is a stack?", "answer": f"stack answer {n}", "score": n % 6, "max_score": 5},
            {"question": "What is a queue?", "answer": f"queue answer {n}", "score": 1, "max_score": 5}]})
        for n in range(12)]
    plain, _ = build_score_examples(subs, tok, "harmony", 1024)
    anchored, _ = build_score_examples(subs, tok, "harmony", 1024, anchors=3, seed=1)
    again, _ = build_score_examples(subs, tok, "harmony", 1024, anchors=3, seed=1)
    assert [e.input_ids for e in anchored] == [e.input_ids for e in again]  # seeded
    assert [e.target for e in anchored] == [e.target for e in plain]
    counts = [e.n_anchors for e in anchored]
    assert 0 in counts and max(counts) == 3  # some prompts show none, none show more than asked
    for sub_n, e in enumerate(anchored[::2]):  # the stack question of each submission
        rubric_part = harmony_encoding().decode(e.input_ids).split("# Answer")[0]
        shown = [line.split(" of 5: ", 1)[1] for line in rubric_part.splitlines() if " of 5: " in line]
        assert len(shown) == e.n_anchors
        assert all(a.startswith("stack answer ") for a in shown)  # never another question's answers
        assert f"stack answer {sub_n}" not in shown  # never its own answer
    picks = training_anchors([[f"a{n}" for n in range(8)]], 3, seed=0)[0]
    assert all(n not in [j for j, _ in p] for n, p in enumerate(picks))


def test_training_prompts_measure_similarity_as_grading_does() -> None:
    # the validation pass chooses the review threshold and the anchor blend on these similarities,
    # so they must be the ones grading computes from the same graded answers
    from data.anchors import _counts, _pool_similarities

    answers = STACK_ANSWERS + ["Last in, first out: push and pop.", "A LIFO list of plates.", "-"]
    tf = _counts(answers)
    rng = random.Random(0)
    for _ in range(30):
        i = rng.randrange(len(answers))
        pool = rng.sample([j for j in range(len(answers)) if j != i], rng.randint(1, len(answers) - 1))
        bank = _bank([(answers[j], 1.0) for j in pool])
        choice = bank.choose("What is a stack?", 5, answers[i], k=len(pool))
        if choice.exact is not None:
            continue
        want = {a.answer: s for a, s in zip(choice.anchors, choice.similarity)}
        got = _pool_similarities(tf, i, pool)
        assert [round(float(got[c]), 4) for c in range(len(pool))] == pytest.approx(
            [want[answers[j]] for j in pool], abs=1e-4)


def test_evaluate_with_anchors_scores_only_the_other_answers_and_says_which_were_anchors(
        tiny_gpt_oss_dir: Path, item_adapters: tuple[Path, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    data = repo / "data" / "samples" / "graded" / "py-functions"
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "inference", "evaluate", "--adapter", str(item_adapters[0]), "--data", str(data),
         "--no-base", "--n-boot", "0", "--anchors", "3", "--anchor-draws", "2", "--json", str(report_path)],
        cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "anchors per question" in proc.stdout and "QWK of the accepted grades" in proc.stdout
    report = json.loads(report_path.read_text())
    n_items = report["n_items"]
    assert len(report["items"]) == n_items  # k = 0: every item, each with what a person needs to check it
    first = report["items"][0]
    assert {"question", "question_text", "human", "model", "confidence", "anchors", "probs"} <= first.keys()
    runs = report["anchors"]["by_k"]["3"]["runs"]
    assert len(runs) == 2 and runs[0]["anchors"] != runs[1]["anchors"]  # two different draws
    for run in runs:
        drawn = set(run["anchors"])
        questions = {(r["question_text"]) for r in report["items"]}
        assert len(drawn) == 3 * len(questions)  # three answers of each question (each has more than three)
        assert not drawn & {row["n"] for row in run["rows"]}  # anchors are never scored
        assert len(run["rows"]) == n_items - len(drawn) == run["items"]["n"]
        shown = [row["anchors"] for row in run["rows"] if row["anchors"] and "in_prompt" in row["anchors"]]
        assert shown and all(len(a["in_prompt"]) == 3 for a in shown)  # the adapter learnt 3
    curves = report["selective"]["by_k"]["3"]["curves"]
    assert curves["confidence"][-1]["coverage"] == 1.0 and curves["confidence"][-1]["n"] == 2 * len(runs[0]["rows"])


def test_grade_first_after_some_are_graded_picks_what_they_do_not_cover() -> None:
    answers = ["last in first out", "last in, first out!", "a hash table of keys", "a hash table, of keys", "fifo"]
    picked = pick_to_grade_first(answers, 2, graded=[0])
    assert 0 not in picked and 1 not in picked  # answer 1 is already covered by the graded answer 0
    assert set(picked) <= {2, 3, 4} and len(picked) == 2


def test_a_correction_becomes_an_anchor_at_once_and_grade_first_lists_the_answers_to_grade(
        tiny_gpt_oss_dir: Path, item_adapters: tuple[Path, Path]) -> None:
    from data.store import Store
    from inference.results import store_grade

    engine = get_engine(str(tiny_gpt_oss_dir), device="cpu")
    store = Store()
    answers = STACK_ANSWERS + ["Last in first out.", "LIFO: the last pushed is popped first."]
    subs = [MD.replace("A pile where the last item in comes out first.", a) for a in answers]
    for n, (md, r) in enumerate(zip(subs, engine.grade_many([(f"s{n}", md, RUBRIC) for n, md in enumerate(subs)],
                                                           adapter=item_adapters[0]))):
        store_grade(r, RUBRIC, f"s{n}.md", submission_md=md)
    first = store.review_items(order="grade-first", first_k=2)
    top = [q for q in first[:4]]
    assert {q.question_index for q in top} == {0, 1}  # two answers of each question come first
    assert len({q.answer for q in top if q.question_index == 0}) == 2

    target = next(q for q in first if q.question_index == 0 and q.answer == answers[2])
    store.add_correction(target.grade_id, 0, 1.5, "Not a stack.")
    bank = store.anchor_bank()
    assert len(bank.of("What is a stack?", 5)) == 1
    again = engine.grade(subs[2], RUBRIC, adapter=item_adapters[0], anchors=bank)
    assert again.grade.items[0].score == 1.5 and again.anchors[0] == {"exact": f"correction {store.corrections()[0].id}"}
    other = engine.grade(subs[0], RUBRIC, adapter=item_adapters[0], anchors=bank)  # shown, not copied
    assert other.anchors[0]["in_prompt"] == [f"correction {store.corrections()[0].id}"]
    after = store.review_items(order="grade-first", first_k=2)
    assert sum(q.question_index == 0 and q.correction is None for q in after[:2]) >= 1  # one more to grade there
    from app.review_tab import regrade_with_anchors

    msg = regrade_with_anchors(store.review_items(grade_ids=[target.grade_id]))
    assert msg.startswith("Regraded 1 submissions with 1 teacher-graded answers")
    newest = store.review_items(order="newest")[0]
    assert newest.grade_id > target.grade_id and newest.model_score == 1.5 and newest.confidence == 1.0

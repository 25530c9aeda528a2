"""The grading engine on the tiny GPT-OSS: adapters load and change outputs, switching adapters
keeps the one base in memory, each call grades with the adapter it names (also from several
threads at once), garbage output still becomes a valid grade, wrong adapters are refused with a
clear message, and the CLI prints JSON grades that land in the store."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from inference.adapters import AdapterError, export_merged
from inference.engine import GraderEngine, get_engine
from inference.results import store_grade
from inference.grades_csv import GRADES_CSV_COLUMNS
from inference.repair import NOTE_KINDS
from data.loading import load_rubric
from data.rubric import Rubric, RubricQuestion
from data.store import Store
from tests.conftest import REPO

RUBRICS = REPO / "data" / "samples" / "rubrics"
SUBMISSIONS = REPO / "data" / "samples" / "submissions"
RUBRIC = Rubric(questions=[RubricQuestion(question="What is a stack?", max_score=5, question_id="1"),
                           RubricQuestion(question="What is a queue?", max_score=3, question_id="2")])
MD = "## Question 1: What is a stack?\n\nLIFO.\n\n## Question 2: What is a queue?\n\nFIFO.\n"


def make_adapter(base_dir: Path, out: Path, seed: int, experts: bool = False) -> Path:
    """A LoRA adapter saved the way training saves one, with random non-zero B so it matters;
    ``experts`` also puts LoRA on the MoE expert weights (peft target_parameters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False,
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts else None)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(str(out))
    (out / "run_config.json").write_text(json.dumps({"name": out.name, "model": str(base_dir), "datasets": []}))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_gpt_oss_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_gpt_oss_dir, root / "a", 1), make_adapter(tiny_gpt_oss_dir, root / "b", 2, experts=True)


@pytest.fixture(scope="module")
def engine(tiny_gpt_oss_dir: Path) -> GraderEngine:
    return get_engine(str(tiny_gpt_oss_dir), device="cpu")


def test_adapter_changes_outputs_and_switching_keeps_the_base(engine: GraderEngine, adapters) -> None:
    a, b = adapters
    ids = engine.encode(MD, RUBRIC, 16)
    base = engine.next_token_logits(ids)
    base_obj = id(engine.model)
    la = engine.next_token_logits(ids, adapter=a)
    lb = engine.next_token_logits(ids, adapter=b)
    attached = dict(engine.adapters)  # the cached engine may hold other tests' adapters too
    la2 = engine.next_token_logits(ids, adapter=a)
    base2 = engine.next_token_logits(ids, adapter=None)
    assert not torch.allclose(base, la, atol=1e-4) and not torch.allclose(la, lb, atol=1e-4)
    assert torch.allclose(la, la2, atol=1e-5) and torch.allclose(base, base2, atol=1e-5)
    # One base model, in place: PEFT wraps the same object; each adapter was loaded once.
    assert id(engine.model) == base_obj and id(engine.peft.get_base_model()) == base_obj
    assert {str(Path(a).resolve()), str(Path(b).resolve())} <= set(engine.adapters)
    assert engine.adapters == attached  # switching back to a loaded nothing again
    assert get_engine(engine.base_model, device="cpu") is engine


def test_random_model_output_still_gives_a_valid_stored_grade(engine: GraderEngine, adapters) -> None:
    streamed: list[str] = []
    r = engine.grade(MD, RUBRIC, adapter=adapters[0], max_new_tokens=12, on_token=streamed.append)
    g = r.grade
    assert [i.question for i in g.items] == [q.question for q in RUBRIC.questions]
    assert all(0 <= i.score <= i.max_score for i in g.items) and g.score == sum(i.score for i in g.items)
    assert g.max_score == 8
    assert r.raw_text.startswith("".join(streamed))  # what streamed is what the model wrote
    if r.repaired:
        assert any(rep.kind not in NOTE_KINDS for rep in r.repairs)  # a fix, not only a note
    assert r.adapter == str(adapters[0].resolve())
    assert Store().grades() == []  # the engine stores nothing: the caller does
    grade_id = store_grade(r, RUBRIC, "s1.md")
    rows = Store().grades()
    assert rows[0]["id"] == grade_id
    assert rows[0]["submission_name"] == "s1.md" and rows[0]["adapter"] == str(adapters[0].resolve())
    assert rows[0]["base_model"] == engine.base_model and rows[0]["raw_text"] == r.raw_text


def test_grade_many_batches_in_order(engine: GraderEngine, adapters) -> None:
    items = [(f"s{k}.md", MD + "x" * k * 40, RUBRIC) for k in range(3)]
    batched = engine.grade_many(items, adapter=adapters[1], batch_size=3, max_new_tokens=6)
    for (name, _, rubric), result in zip(items, batched):
        store_grade(result, rubric, name)
    single = [engine.grade(md, rb, adapter=adapters[1], max_new_tokens=6) for _, md, rb in items]
    assert len(batched) == 3
    # Left padding must not change what greedy decoding writes (first attempt's text).
    for bt, sg in zip(batched, single):
        assert bt.raw_text.split("\n[retry]\n")[0] == sg.raw_text.split("\n[retry]\n")[0]
    assert [r["submission_name"] for r in Store().grades()[:3]] == ["s2.md", "s1.md", "s0.md"]
    assert {r.adapter for r in batched} == {str(adapters[1].resolve())}


def test_threads_grading_with_different_adapters_each_get_their_own(engine: GraderEngine, adapters) -> None:
    """The cached engine is shared (UI threads): each call grades with the adapter it names, whatever
    another thread asks for meanwhile."""
    choices = [adapters[0], None, adapters[1], adapters[0], None, adapters[1]]
    alone = {str(a): engine.grade(MD, RUBRIC, adapter=a, max_new_tokens=6, scoring="generated").raw_text
             for a in choices[:3]}
    got: dict[int, tuple] = {}

    def work(k: int) -> None:
        r = engine.grade(MD, RUBRIC, adapter=choices[k], max_new_tokens=6, scoring="generated")
        got[k] = (r.adapter, r.raw_text)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(choices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, a in enumerate(choices):
        assert got[k] == (str(a.resolve()) if a else None, alone[str(a)]), k


def test_bad_adapter_folders_give_clear_errors(engine: GraderEngine, tmp_path: Path) -> None:
    from data.model_zoo import build_tiny_gpt_oss

    with pytest.raises(AdapterError, match="does not exist"):
        engine.grade(MD, RUBRIC, adapter=tmp_path / "nope", max_new_tokens=1)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(AdapterError, match="only pickle weights"):
        engine.grade(MD, RUBRIC, adapter=pickled, max_new_tokens=1)
    other_base = build_tiny_gpt_oss(hidden_size=128)
    other = make_adapter(other_base, tmp_path / "other", 3)
    with pytest.raises(AdapterError) as e:
        engine.grade(MD, RUBRIC, adapter=other, max_new_tokens=1)
    assert "hidden 128" in str(e.value) and "hidden 64" in str(e.value) and str(other_base) in str(e.value)
    # Same check when the adapter does not say which base it belongs to: its weight shapes.
    (other / "run_config.json").unlink()
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="does not fit base"):
        engine.grade(MD, RUBRIC, adapter=other, max_new_tokens=1)


def test_export_merged_matches_the_adapter(engine: GraderEngine, adapters, tmp_path: Path) -> None:
    out = export_merged(adapters[0], tmp_path / "merged")
    assert (out / "model.safetensors").is_file() or list(out.glob("model*.safetensors"))
    merged = GraderEngine(str(out), device="cpu")
    ids = engine.encode(MD, RUBRIC, 16)
    assert torch.allclose(merged.next_token_logits(ids), engine.next_token_logits(ids, adapter=adapters[0]), atol=1e-4)


def test_cli_grade_prints_json_and_stores(tiny_gpt_oss_dir: Path, adapters, isolated_store: Path) -> None:
    rubric_file = sorted(RUBRICS.glob("*.json"))[0]
    subs = sorted(SUBMISSIONS.glob(rubric_file.stem + "*.md"))[:2]
    assert subs, "the sample data has submissions for each rubric"
    proc = subprocess.run(
        [sys.executable, "-m", "inference", "grade", "--adapter", str(adapters[0]), "--rubric", str(rubric_file),
         "--max-new-tokens", "8", "--device", "cpu", *map(str, subs)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    rubric = load_rubric(rubric_file)
    assert [o["file"] for o in out] == [str(s) for s in subs]
    for o in out:
        assert len(o["grade"]["items"]) == len(rubric.questions)
        assert o["grade"]["max_score"] == rubric.max_score and o["base_model"] == str(tiny_gpt_oss_dir)
    assert len(Store().grades()) == len(subs)
    # A missing adapter is a clear one-line error, not a traceback.
    bad = subprocess.run([sys.executable, "-m", "inference", "grade", "--adapter", "/no/such/adapter", "--rubric",
                          str(rubric_file), str(subs[0])], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_batch_and_evaluate_cli(tiny_gpt_oss_dir: Path, adapters, tmp_path: Path, capsys) -> None:
    from inference.__main__ import main

    rubric_file = sorted(RUBRICS.glob("*.json"))[0]
    folder = tmp_path / "subs"
    folder.mkdir()
    for p in sorted(SUBMISSIONS.glob(rubric_file.stem + "*.md"))[:2]:
        (folder / p.name).write_text(p.read_text())
    out = tmp_path / "out"
    assert main(["batch", "--adapter", str(adapters[0]), "--rubric", str(rubric_file), "--out-dir", str(out),
                 "--max-new-tokens", "4", "--device", "cpu", str(folder)]) == 0
    with open(out / "grades.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    jsonl = [json.loads(line) for line in (out / "grades.jsonl").read_text().splitlines()]
    # The grades CSV the Grade tab writes too: one row per question of each submission.
    questions = [q.question for q in load_rubric(rubric_file).questions]
    assert len(jsonl) == 2 and tuple(rows[0]) == GRADES_CSV_COLUMNS
    assert [(r["file"], r["question"]) for r in rows] == [(o["file"], q) for o in jsonl for q in questions]
    assert [float(r["total"]) for r in rows] == [o["grade"]["score"] for o in jsonl for _ in questions]
    assert len(Store().grades()) == 2

    graded = sorted((REPO / "data" / "samples" / "graded").rglob("*.json"))[0]
    report_file = tmp_path / "eval.json"
    assert main(["evaluate", "--adapter", str(adapters[0]), "--data", str(graded), "--max-new-tokens", "4",
                 "--n-boot", "50", "--json", str(report_file), "--scoring", "generated", "--device", "cpu"]) == 0
    report = json.loads(report_file.read_text())
    assert report["scoring"] == "generated"  # the flag reaches the grading, and the report says it
    preds = report["predictors"]
    assert set(preds) == {"adapter", "base zero-shot", "constant (training mean)"}
    for p in preds.values():
        for level in ("items", "submissions"):
            assert {"mae", "rmse", "pearson_r", "qwk", "exact", "within_1"} <= set(p[level])
    # The adapter's run says nothing about its data: the constant falls back to the data's mean, and says so.
    assert "evaluation data itself" in preds["constant (training mean)"]["source"]
    assert Store().evaluations()[0]["report"]["n_submissions"] == report["n_submissions"]
    assert "| adapter |" in capsys.readouterr().out


def _grade_as_written(rubric: Rubric, scores: list[float]):
    from data.rubric import Grade, GradeItem

    items = [GradeItem(question=q.question, score=s, max_score=q.max_score, justification="ok")
             for q, s in zip(rubric.questions, scores)]
    return Grade(score=sum(scores), max_score=rubric.max_score, items=items)


def test_expected_score_is_the_mean_of_the_models_own_score_distribution(engine: GraderEngine, adapters) -> None:
    """At each question's score, in the grade JSON as training writes it, the model's probabilities
    for 0..max are read and averaged. Checked against the next-token logits computed separately
    for each question's prefix (the same tokens training and the retry use)."""
    from data.prompt_format import target_text

    prompt = engine.encode(MD, RUBRIC, 64)
    written = _grade_as_written(RUBRIC, [4, 1])
    grade, probs = engine._expected_scores(prompt, written, RUBRIC, [True, True], adapter=adapters[0])
    text = target_text(written, RUBRIC)
    cut = [m.end() for m in __import__("re").finditer(r'"score":', text)]
    for i, q in enumerate(RUBRIC.questions):
        assert set(probs[i]) == {str(v) for v in range(int(q.max_score) + 1)}
        assert abs(sum(probs[i].values()) - 1) < 1e-3
        prefix = engine.tokenizer(text[: cut[i]], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        logits = engine.next_token_logits(prompt + list(prefix), adapter=adapters[0])
        value_ids = engine._value_ids(q.max_score)
        p = torch.softmax(logits[list(value_ids)], dim=-1)
        expected = float(sum(float(pi) * v for pi, v in zip(p, value_ids.values())))
        assert abs(grade.items[i].score - round(expected, 2)) <= 0.011, (i, grade.items[i].score, expected)
        assert 0 <= grade.items[i].score <= q.max_score
    assert abs(grade.score - sum(it.score for it in grade.items)) < 1e-9
    # a score the repair filled in (nothing read from the model) is left alone
    kept, probs2 = engine._expected_scores(prompt, written, RUBRIC, [True, False], adapter=adapters[0])
    assert kept.items[1].score == 1 and probs2[1] is None and probs2[0] == probs[0]


def test_grades_say_how_their_scores_were_made(engine: GraderEngine, adapters) -> None:
    gen = engine.grade(MD, RUBRIC, adapter=adapters[0], max_new_tokens=12, scoring="generated")
    assert gen.scoring == "generated" and gen.score_probs is None
    exp = engine.grade(MD, RUBRIC, adapter=adapters[0], max_new_tokens=12)  # the default
    assert exp.scoring in ("expected", "generated") and exp.to_dict()["scoring"] == exp.scoring
    if exp.scoring == "generated":  # random model: nothing read from its output to re-score
        assert not any(exp.score_probs or [])
    with pytest.raises(ValueError, match="scoring must be one of"):
        engine.grade(MD, RUBRIC, adapter=adapters[0], max_new_tokens=4, scoring="mean")


def test_expected_scores_of_a_batch_are_those_of_each_grade_alone(engine: GraderEngine, adapters) -> None:
    """grade_many reads the expected scores of a whole batch in a few right-padded passes; each
    grade gets the score distributions it gets graded alone (one pass of its own), whatever the
    lengths of its neighbours, and a row with nothing to read (a retried answer whose scores were
    filled in) is left as it is. Also for unconstrained answers that needed the guided retry."""
    answers = ["LIFO.", "Last in, first out: a pile of plates where only the top one can be taken. " * 2,
               "A stack.", "Push and pop at one end; " * 5]
    mds = [f"## Question 1: What is a stack?\n\n{a}\n\n## Question 2: What is a queue?\n\nFIFO.\n" for a in answers]
    lengths = [len(engine.encode(md, RUBRIC, 64)) for md in mds]
    assert max(lengths) - min(lengths) > 16  # padding wider than the sliding window (16)
    items = [(str(k), md, RUBRIC) for k, md in enumerate(mds)]
    for constrained in (True, False):
        kw = dict(adapter=adapters[0], unit="submission", max_new_tokens=64, constrained=constrained)
        batched = engine.grade_many(items, batch_size=4, **kw)
        alone = [engine.grade(md, RUBRIC, **kw) for md in mds]
        assert [r.raw_text for r in batched] == [r.raw_text for r in alone]
        if constrained:
            assert all(r.scoring == "expected" for r in batched), [r.repairs for r in batched]
        else:  # random weights write no JSON: the guided retry still runs, row by row
            assert any(r.retried for r in batched)
        for b, a in zip(batched, alone):
            assert b.scoring == a.scoring
            _same_reading((b.grade, b.score_probs), (a.grade, a.score_probs))
            assert b.grade.score == pytest.approx(sum(it.score for it in b.grade.items), abs=1e-9)
            assert set(b.timings) == {"prefill_s", "decode_s", "scoring_s"} and b.timings["scoring_s"] >= 0
    # Rows of several lengths, one whose scores were all filled in by repair: in input order.
    prompts = [engine.encode(md, RUBRIC, 64) for md in mds[:3]]
    rows = [(prompts[0], _grade_as_written(RUBRIC, [4, 1]), RUBRIC, [True, True]),
            (prompts[1], _grade_as_written(RUBRIC, [0, 0]), RUBRIC, [False, False]),
            (prompts[2], _grade_as_written(RUBRIC, [2, 3]), RUBRIC, [False, True])]
    many = engine._expected_scores_many(rows, adapter=adapters[0], batch_size=3)
    assert many[1] == (rows[1][1], [None, None])
    for got, (prompt, written, rubric, read) in zip(many, rows):
        _same_reading(got, engine._expected_scores(prompt, written, rubric, read, adapter=adapters[0]))


def _same_reading(got: tuple, want: tuple) -> None:
    """Two (grade, score_probs) readings agree: the same questions read, the same probabilities
    and scores (rounded to 4 and 2 decimals: equal up to a flip of the last digit)."""
    (g1, p1), (g2, p2) = got, want
    assert [p is None for p in p1 or []] == [p is None for p in p2 or []]
    for a, b in zip(p1 or [], p2 or []):
        if a is not None:
            assert a.keys() == b.keys() and all(abs(a[v] - b[v]) <= 1.01e-4 for v in a), (a, b)
    assert [it.score for it in g1.items] == pytest.approx([it.score for it in g2.items], abs=0.0101)
    assert g1.score == pytest.approx(sum(it.score for it in g1.items), abs=1e-9)

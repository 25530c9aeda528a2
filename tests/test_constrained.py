"""Whole grades decoded under the rubric's schema (issue #14): even a random model writes a valid
grade that needs no repair, and a tuned adapter gives the same scores with the constraint as
without it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data.loading import load_graded
from data.markdown import render_submission_markdown
from data.rubric import Grade, GradeItem, Rubric, RubricQuestion
from inference.constrained import grade_json_schema, reserve_chars
from inference.engine import get_engine
from tests.conftest import REPO

GRADED = REPO / "data" / "samples" / "graded" / "algebra-linear"


def _sample():
    sub = load_graded([sorted(GRADED.glob("*.json"))[0]]).submissions[0]
    return sub, sub.rubric(), render_submission_markdown(sub)


def test_the_schema_is_the_grade_as_training_writes_it() -> None:
    from data.prompt_format import question_labels, target_text

    sub, rubric, _ = _sample()
    schema = grade_json_schema(rubric)
    assert list(schema["properties"]) == ["items", "score", "max_score", "feedback"]
    items = schema["properties"]["items"]["prefixItems"]
    assert [it["properties"]["question"]["const"] for it in items] == question_labels(rubric)
    assert [list(it["properties"]) for it in items] == [["question", "justification", "score", "max_score"]] * len(items)
    assert [it["properties"]["score"]["maximum"] for it in items] == [q.max_score for q in rubric.questions]
    # The training target has exactly these keys, in this order.
    target = json.loads(target_text(sub.grade(), rubric))
    assert list(target) == list(schema["properties"])
    assert all(list(it) == [k for k in ["question", "justification", "score", "max_score"] if k in it]
               for it in target["items"])


def test_the_schema_writes_a_maximum_as_training_does() -> None:
    """A maximum of 7/3 is written 2.333 in the prompt and the target: the schema's constant and
    bound must be that number too, or a grade written as trained could not be decoded."""
    from data.prompt_format import instructions, target_text
    from data.rubric import Grade, GradeItem, Rubric, RubricQuestion

    rubric = Rubric(questions=[RubricQuestion(question="Why?", max_score=7 / 3, question_id="1")])
    schema = grade_json_schema(rubric)
    item = schema["properties"]["items"]["prefixItems"][0]["properties"]
    target = json.loads(target_text(Grade(score=1, max_score=7 / 3, items=[
        GradeItem(question="1", score=1, max_score=7 / 3)]), rubric))
    assert item["max_score"]["const"] == item["score"]["maximum"] == target["items"][0]["max_score"] == 2.333
    assert schema["properties"]["max_score"]["const"] == target["max_score"] == 2.333
    assert "(max 2.333 points)" in instructions(rubric)


@pytest.mark.parametrize("max_new_tokens", [96, 400])
def test_a_random_model_writes_a_valid_grade_without_repairs(tiny_gpt_oss_dir: Path, max_new_tokens: int) -> None:
    """The tiny GPT-OSS has random weights: unconstrained it writes noise (every question repaired
    to 0); constrained, its answer is a grade of this rubric as it stands, whatever the budget."""
    engine = get_engine(str(tiny_gpt_oss_dir), device="cpu")
    _, rubric, md = _sample()
    free = engine.grade(md, rubric, unit="submission", constrained=False, retry=False, max_new_tokens=max_new_tokens)
    assert free.repaired
    result = engine.grade(md, rubric, unit="submission", max_new_tokens=max_new_tokens)
    assert result.repairs == [] and not result.repaired and not result.retried
    written = json.loads(result.raw_text)  # the answer itself is the JSON, nothing around it
    assert [it["question"] for it in written["items"]] == ["1", "2", "3", "4"]
    assert written["score"] == pytest.approx(sum(it["score"] for it in written["items"]))
    assert written["max_score"] == rubric.max_score
    for it, q in zip(written["items"], rubric.questions):
        assert 0 <= it["score"] <= q.max_score and it["max_score"] == q.max_score
    if max_new_tokens >= reserve_chars(rubric):  # a budget below the smallest grade is raised to it
        assert result.new_tokens <= max_new_tokens + 12  # (+ the forced opening, in the prompt)
    # Batched, with several rubrics at once: each row under its own rubric.
    other = load_graded([sorted((REPO / "data" / "samples" / "graded" / "py-functions").glob("*.json"))[0]])
    sub2 = other.submissions[0]
    many = engine.grade_many([("a", md, rubric), ("b", render_submission_markdown(sub2), sub2.rubric())],
                             unit="submission", max_new_tokens=max_new_tokens)
    assert [r.repairs for r in many] == [[], []]
    assert [len(r.grade.items) for r in many] == [len(rubric.questions), len(sub2.rubric().questions)]


RUBRIC = Rubric(questions=[RubricQuestion(question="What is a stack?", max_score=5, question_id="1"),
                           RubricQuestion(question="What is a queue?", max_score=3, question_id="2")])
MD = "## Question 1: What is a stack?\n\nLIFO.\n\n## Question 2: What is a queue?\n\nFIFO.\n"
HUMAN = Grade(score=6, max_score=8, feedback="Good.",
              items=[GradeItem(question="What is a stack?", score=4, max_score=5, justification="Right, brief."),
                     GradeItem(question="What is a queue?", score=2, max_score=3, justification="Right.")])


@pytest.fixture(scope="module")
def tuned_adapter(tiny_gpt_oss_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter tuned (overfitted, in seconds) until it writes the human grade of one
    submission by itself, greedily."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.prompt_format import detect_format, encode_example

    tok = AutoTokenizer.from_pretrained(str(tiny_gpt_oss_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gpt_oss_dir), dtype=torch.float32)
    ex = encode_example(tok, detect_format(tok, model.config.model_type), RUBRIC, MD, HUMAN, 4096)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ids, n = torch.tensor([ex.input_ids]), len(ex.input_ids) - ex.prompt_len
    learnt = False
    for step in range(1, 301):
        model.train()
        logits = model(input_ids=ids, logits_to_keep=n + 1).logits[0, :-1]  # the grade's tokens only
        torch.nn.functional.cross_entropy(logits.float(), ids[0, -n:]).backward()
        opt.step()
        opt.zero_grad()
        if step % 25 == 0:
            model.eval()
            with torch.no_grad():
                out = model.generate(input_ids=ids[:, : ex.prompt_len], max_new_tokens=n, do_sample=False)
            if out[0, ex.prompt_len :].tolist() == ex.input_ids[ex.prompt_len :]:
                learnt = True
                break
    assert learnt, "the adapter did not learn to write the grade in 300 steps"
    out = tmp_path_factory.mktemp("tuned") / "final"
    model.save_pretrained(str(out))
    (out / "run_config.json").write_text(json.dumps({"name": "tuned", "model": str(tiny_gpt_oss_dir), "datasets": [],
                                                     "example_unit": "submission"}))
    return out


def test_constrained_and_free_grading_of_a_tuned_adapter_agree(tiny_gpt_oss_dir: Path, tuned_adapter: Path) -> None:
    engine = get_engine(str(tiny_gpt_oss_dir), device="cpu")
    free = engine.grade(MD, RUBRIC, adapter=tuned_adapter, constrained=False, retry=False, scoring="generated")
    assert free.repairs == [], f"the tuned adapter writes a valid grade by itself: {free.raw_text[:300]}"
    constrained = engine.grade(MD, RUBRIC, adapter=tuned_adapter, scoring="generated")
    assert constrained.repairs == []
    assert [it.score for it in constrained.grade.items] == [it.score for it in free.grade.items] == [4, 2]
    assert constrained.grade.score == free.grade.score == 6


def _forced_spans(rubric: Rubric, written: dict) -> list[str]:
    """The spans of a grade of ``rubric`` that no model could choose otherwise: each item's close
    and the next item's opening, and the total after the items (the sum of what was written)."""
    from data.prompt_format import question_labels

    def num(x: float) -> str:
        return json.dumps(int(x) if float(x).is_integer() else x)

    labels = question_labels(rubric)
    spans = [f'"max_score":{num(q.max_score)}}},{{"question":{json.dumps(nxt)},"'
             for q, nxt in zip(rubric.questions, labels[1:])]
    total = sum(it["score"] for it in written["items"])
    return spans + [f'],"score":{num(total)},"max_score":{num(rubric.max_score)},"feedback":"']


def test_forced_spans_are_written_without_model_steps(tiny_gpt_oss_dir: Path) -> None:
    """Jump-forward decoding: after the token the model chose, the schema's forced continuation
    (an item's close and the next one's opening, the total) goes into the model in the same
    step. Several rubrics in one batch, each row with chunks of its own width: every grade is
    valid as written, has its forced spans verbatim, its strings within their bounds, and took
    fewer model steps than it has tokens, by more than the forced opening in the prompt."""
    from data.prompt_format import encode_answer_text
    from inference.constrained import FEEDBACK_MAX_CHARS, JUSTIFICATION_MAX_CHARS, forced_opening

    engine = get_engine(str(tiny_gpt_oss_dir), device="cpu")
    items = []
    for folder in sorted((REPO / "data" / "samples" / "graded").iterdir())[:4]:
        sub = load_graded([sorted(folder.glob("*.json"))[0]]).submissions[0]
        items.append((folder.name, render_submission_markdown(sub), sub.rubric()))
    assert len({it[2].model_dump_json() for it in items}) == len(items) >= 3
    results = engine.grade_many(items, unit="submission", max_new_tokens=600, batch_size=len(items),
                                scoring="generated")
    grammars = engine._grade_grammars()
    encode = lambda text: encode_answer_text(engine.tokenizer, engine.format, text)  # noqa: E731
    for (_, _, rubric), result in zip(items, results):
        assert result.repairs == [] and not result.repaired, result.raw_text[:300]
        written = json.loads(result.raw_text)
        assert [it["score"] for it in written["items"]] == [it.score for it in result.grade.items]
        for span in _forced_spans(rubric, written):
            assert span in result.raw_text
        assert all(len(it.get("justification", "")) <= JUSTIFICATION_MAX_CHARS for it in written["items"])
        assert len(written["feedback"]) <= FEEDBACK_MAX_CHARS
        opening = forced_opening(grammars, rubric, encode, engine._decode)
        # Each item after the first starts inside a forced span: at least one step saved per item.
        assert result.model_steps <= result.new_tokens - len(opening) - len(rubric.questions), \
            (result.model_steps, result.new_tokens)
    # A single grade streams the answer as it grows, forced spans included.
    pieces: list[str] = []
    one = engine.grade(items[0][1], items[0][2], unit="submission", max_new_tokens=200, scoring="generated",
                       on_token=pieces.append)
    assert one.repairs == [] and len(pieces) > 1 and "".join(pieces) == one.raw_text
    assert one.model_steps < one.new_tokens


def test_a_grade_is_the_same_alone_and_in_a_batch(tiny_gpt_oss_dir: Path) -> None:
    """In a batch, rows feed chunks of different widths: each is padded inside its step, the
    positions come from the attention mask, and the sliding-window layers (16 tokens here) take
    their window over positions, so the pads inside the cache cost a row nothing: its grade does
    not depend on its neighbours."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.model_zoo import tiny_gpt_oss_config
    from inference.engine import GraderEngine

    config = tiny_gpt_oss_config()
    assert config.sliding_window == 16 and "sliding_attention" in config.layer_types
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)  # these weights take different paths on the answers below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    engine = GraderEngine("tiny-gpt-oss, seed 2", model=model,
                          tokenizer=AutoTokenizer.from_pretrained(str(tiny_gpt_oss_dir)))
    answers = ["LIFO.", "FIFO.", "A pile.", "A line.", "Last in.", "First in.", "Stack.", "Queue.", "Plates."]
    mds = [f"## Question 1: What is a stack?\n\n{a}\n\n## Question 2: What is a queue?\n\n{b}\n"
           for a in answers for b in answers if a != b]
    lengths = [len(engine.encode(md, RUBRIC, 200)) for md in mds]
    common = max(set(lengths), key=lengths.count)
    same = [md for md, n in zip(mds, lengths) if n == common][:4]
    assert len(same) == 4
    alone = [engine.grade(md, RUBRIC, unit="submission", max_new_tokens=200, scoring="generated") for md in same]
    batched = engine.grade_many([(str(k), md, RUBRIC) for k, md in enumerate(same)], unit="submission",
                                max_new_tokens=200, batch_size=len(same), scoring="generated")
    assert [r.repairs for r in batched] == [[]] * len(same)
    assert [r.raw_text for r in batched] == [r.raw_text for r in alone]
    assert [r.model_steps for r in batched] == [r.model_steps for r in alone]
    # The rows took different paths: some wrote a justification where others went on to the
    # score, so their chunks differed in width and some were padded inside a step.
    assert len({r.model_steps for r in alone}) > 1


def test_special_tokens_never_get_into_a_grade(tiny_gpt_oss_dir: Path) -> None:
    """xgrammar takes GPT-OSS's reserved tokens (``<|reserved_200204|>``) for plain text, so a
    string of the grammar lets them in. The decoder forbids the tokenizer's special and added
    tokens everywhere (the stop tokens aside): with every logit of them pushed far above the
    rest, the random model still writes none, and its grade is valid."""
    import xgrammar as xgr

    from data.prompt_format import encode_answer_text
    from inference.constrained import forced_opening

    engine = get_engine(str(tiny_gpt_oss_dir), device="cpu")
    tok = engine.tokenizer
    grammars = engine._grade_grammars()
    encode = lambda text: encode_answer_text(tok, engine.format, text)  # noqa: E731
    forbidden = set(grammars.forbidden_ids(encode).tolist())
    reserved = tok.convert_tokens_to_ids("<|reserved_200204|>")
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    assert reserved in forbidden and special - set(engine.stop_ids) == forbidden
    assert not forbidden & set(engine.stop_ids) and not forbidden & set(encode('{"items":[{"a b 0.5'))
    # The grammar alone takes the reserved token inside a string.
    matcher = xgr.GrammarMatcher(grammars.compiled(RUBRIC))
    for t in forced_opening(grammars, RUBRIC, encode, engine._decode) + encode('justification":"'):
        assert matcher.accept_token(t)
    assert matcher.accept_token(reserved)

    pushed = torch.tensor(sorted(special - set(engine.stop_ids)))
    ids = engine.encode(MD, RUBRIC, 96)

    def push(module, args, out):  # a logit bias: every forbidden token ahead of all others
        out[..., pushed] += 1e4
        return out

    hook = engine.model.get_output_embeddings().register_forward_hook(push)
    try:
        assert int(engine.next_token_logits(ids).argmax()) in forbidden  # the model wants one
        result = engine.grade(MD, RUBRIC, unit="submission", max_new_tokens=300, scoring="generated")
    finally:
        hook.remove()
    assert result.repairs == []
    written = json.loads(result.raw_text)
    strings = [it.get("justification", "") for it in written["items"]] + [written["feedback"]]
    assert any(strings) and "<|" not in result.raw_text  # text was written, none of them in it
    assert not set(encode(result.raw_text)) & forbidden


def test_string_bounds_count_characters_split_across_tokens() -> None:
    """A byte-level token can end inside a UTF-8 character; the grammar then takes only its
    continuation bytes (not the closing quote), so the decoder counts the open string in
    characters, a split one once, and knows how many bytes it still needs."""
    from inference.constrained import _utf8_chars

    text = "ab€😀".encode()  # 1 + 1 + 3 + 4 bytes
    assert [_utf8_chars(text[:n]) for n in range(len(text) + 1)] == [
        (0, 0), (1, 0), (2, 0), (3, 2), (3, 1), (3, 0), (4, 3), (4, 2), (4, 1), (4, 0)]


def test_score_distributions_are_read_while_decoding(tiny_gpt_oss_dir: Path) -> None:
    """With expected scores, the decoder keeps each item's score distribution from the logits of
    the step that starts the score: what a forward pass over the prompt and exactly the tokens
    it decoded gives there. The engine then runs no second pass over the prompt (the model
    runs once per decoding step), and a grade reads the same in a batch as alone."""
    import functools

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.model_zoo import tiny_gpt_oss_config
    from data.prompt_format import encode_answer_text
    from inference.constrained import decode_grades
    from inference.engine import GraderEngine

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = AutoModelForCausalLM.from_config(tiny_gpt_oss_config(), dtype=torch.float32).eval()
    engine = GraderEngine("tiny-gpt-oss, seed 2", model=model,
                          tokenizer=AutoTokenizer.from_pretrained(str(tiny_gpt_oss_dir)))
    prompt = engine.encode(MD, RUBRIC, 200)
    with torch.inference_mode():
        decoded = decode_grades(model, [prompt], [RUBRIC], grammars=engine._grade_grammars(),
                                encode=functools.partial(encode_answer_text, engine.tokenizer, engine.format),
                                decode=engine._decode, max_new_tokens=200, stop_ids=engine.stop_ids,
                                pad_id=engine.pad_id, value_ids=engine._value_ids)[0]
        logits = model(input_ids=torch.tensor([prompt + decoded.tokens])).logits[0].float()
    assert decoded.score_probs is not None and all(p is not None for p in decoded.score_probs), decoded.score_probs
    # Each item's score position: the decoded tokens up to its '"score":'.
    ends = [j for j in range(1, len(decoded.tokens) + 1)
            if engine._decode(decoded.tokens[:j]).endswith('"score":')][: len(RUBRIC.questions)]
    assert len(ends) == len(RUBRIC.questions)
    for q, j, got in zip(RUBRIC.questions, ends, decoded.score_probs):
        values = engine._value_ids(q.max_score)
        want = torch.softmax(logits[len(prompt) + j - 1, list(values)], dim=-1).tolist()
        assert list(got) == list(range(int(q.max_score) + 1))
        assert list(got.values()) == pytest.approx(want, abs=1e-4)
        assert decoded.tokens[j] in values  # the score starts with a value token

    calls: list[int] = []
    hook = model.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        alone = engine.grade(MD, RUBRIC, unit="submission", max_new_tokens=200)
    finally:
        hook.remove()
    assert alone.scoring == "expected" and len(calls) == alone.model_steps  # no second pass
    for got, want in zip(alone.score_probs, decoded.score_probs):
        assert got == {str(v): round(p, 4) for v, p in want.items()}
    assert [it.score for it in alone.grade.items] == [
        round(sum(v * p for v, p in want.items()), 2) for want in decoded.score_probs]

    answers = ["LIFO.", "A pile.", "Last in, first out: plates. " * 3, "Stack."]
    mds = [f"## Question 1: What is a stack?\n\n{a}\n\n## Question 2: What is a queue?\n\nFIFO.\n" for a in answers]
    batched = engine.grade_many([(str(k), md, RUBRIC) for k, md in enumerate(mds)], unit="submission",
                                max_new_tokens=200, batch_size=4)
    for md, b in zip(mds, batched):
        a = engine.grade(md, RUBRIC, unit="submission", max_new_tokens=200)
        assert b.raw_text == a.raw_text and b.scoring == a.scoring == "expected"
        for pb, pa in zip(b.score_probs, a.score_probs):
            assert pb.keys() == pa.keys() and all(abs(pb[v] - pa[v]) <= 1.01e-4 for v in pb), (pb, pa)
        assert [it.score for it in b.grade.items] == pytest.approx([it.score for it in a.grade.items], abs=0.0101)
        assert b.grade.score == pytest.approx(sum(it.score for it in b.grade.items), abs=1e-9)
        assert set(b.timings) == {"prefill_s", "decode_s", "scoring_s"} and b.timings["scoring_s"] >= 0

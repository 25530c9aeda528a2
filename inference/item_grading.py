"""Item-level grading: each rubric question of a submission scored from one forward pass.

Each question alone (its answer cut from the submission's sections, or the whole text when the
headings do not match the rubric) is encoded to its score position (``data.prompt_format``'s
item-level section) and the model's distribution over 0..max is read there: the score is its
expected value, the confidence comes from its spread. Nothing is generated, so every item grade is
valid by construction; a submission's grade is the sum of its questions.
"""
from __future__ import annotations

import copy
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data.anchors import AnchorBank, AnchorChoice
from data.markdown import split_sections
from data.prompt_format import ScoreExample, encode_score_prompt, target_text
from data.rubric import Grade, GradeItem, Rubric
from inference.adapters import Adapter, adapter_run_config
from scoring.calibration import load_anchor_blend, load_calibration
from inference.results import GradeResult
from scoring.distribution import expected_score, item_confidence
from scoring.selective import load_review, review_thresholds

# Anchors compared with an answer even where its prompt shows fewer (or none): the neighbour
# score and the nearest similarity that confidence and reports use.
NEIGHBOURS = 5


@dataclass
class _Question:
    """One question of one submission to grade: its prompt (None when the teacher graded this very
    answer: it takes the teacher's score) and the anchors chosen for it."""

    example: ScoreExample | None
    choice: AnchorChoice


def grade_items(engine, items: list[tuple[str, str, Rubric]], *, adapter: str | Path | list | None = None,
                batch_size: int = 16, progress: Callable[[int], None] | None = None,
                calibrate: bool | None = None,
                on_batch: Callable[[list[tuple[int, GradeResult]]], None] | None = None,
                share_prefix: bool | None = None, anchors: AnchorBank | None = None,
                anchors_shown: int | None = None) -> list[GradeResult]:
    """Grade (name, markdown, rubric) triples question by question with ``engine``, without
    generation (see the module docstring). Results come back in input order.

    - ``adapter``: a folder, None (the base alone), or a list of folders: an ensemble, whose
      score distributions are averaged before the expected score is taken.
    - ``anchors``: the teacher's graded answers (``data.anchors.AnchorBank``). An answer the
      teacher graded takes the teacher's score (confidence 1); any other answer's prompt shows
      the ``anchors_shown`` most similar anchors of its question (None: as many as the adapter
      was trained with, ``train_anchors``; 0 for an adapter trained without them), and its
      score blends in what they suggest, and spreads out, as much as helped on validation
      (``anchor_blend.json``).
    - ``calibrate``: map expected scores through the calibration stored with the adapter (not for
      ensembles); None: only where it helped on held-out validation (``scoring.calibration``).
    - Questions whose values are not single tokens get the number the model writes there.
    - ``share_prefix`` (None: on the CPU only): every submission's copy of a question starts with
      the same tokens (the one-question instructions, up to the anchors or the student's answer);
      that prefix goes through the model once per call and its KV cache is reused for each answer
      (:func:`_shared_prefixes`). Faster on a CPU; on a GPU many small batches are slower than one
      large one (BENCHMARKS.md, "Grading speed"), with the same scores either way.
    - Submissions are taken ``batch_size`` at a time, those of one rubric together; after each
      batch ``progress(n)`` and ``on_batch([(input index, result), ...])`` report the submissions
      just finished, so a caller can write them out before the rest is graded."""
    keys = [engine._attach(a) for a in (adapter if isinstance(adapter, list) else [adapter])]
    shown = anchors_in_prompt(keys[0]) if anchors_shown is None else anchors_shown
    cal = load_calibration(keys[0]) if calibrate is not False and len(keys) == 1 else None
    if cal is not None and calibrate is None and not cal.helps:
        cal = None
    thresholds = review_thresholds(load_review(keys[0]))  # None: GradeResult's default applies
    blend = load_anchor_blend(keys[0]) if shown else None
    # Encode every question first (cheap next to the model): the shared prefixes are found
    # over the whole call, so one computed prefix serves all the batches of its rubric.
    questions, encode_s = _encode_questions(engine, items, anchors, shown)
    rubric_keys = [rubric.model_dump_json() for _, _, rubric in items]
    if share_prefix is None:
        share_prefix = engine.device.type == "cpu"
    prefixes = _PrefixCaches(questions, rubric_keys, share_prefix, keys)
    # One rubric's submissions together: its prefixes are freed before the next rubric's are made.
    first_seen = {k: n for n, k in reversed(list(enumerate(rubric_keys)))}
    order = sorted(range(len(items)), key=lambda i: (first_seen[rubric_keys[i]], i))
    step = max(1, batch_size)
    results: list[GradeResult | None] = [None] * len(items)
    for start in range(0, len(order), step):
        chunk = order[start : start + step]
        t0 = time.perf_counter()
        probs = _distributions(engine, chunk, questions, rubric_keys, keys, prefixes, step)
        written = _written_scores(engine, chunk, questions, probs, keys[0])
        model_share = (time.perf_counter() - t0) / len(chunk)
        done = []
        for i in chunk:
            results[i] = _item_result(engine, items[i][2], i, questions[i], probs, written, cal, keys,
                                      {"encode_s": round(encode_s[i], 4), "model_s": round(model_share, 4)},
                                      thresholds, blend)
            done.append((i, results[i]))
        if on_batch:
            on_batch(done)
        if progress:
            progress(len(chunk))
    return results  # type: ignore[return-value]


def anchors_in_prompt(adapter_dir: str | None) -> int:
    """How many anchors an adapter's prompts show (:attr:`inference.adapters.Adapter.anchors_shown`;
    0 for the base alone)."""
    if adapter_dir is None:
        return 0
    return Adapter(Path(adapter_dir), adapter_run_config(adapter_dir) or {}).anchors_shown


def _encode_questions(engine, items: list[tuple[str, str, Rubric]], anchors: AnchorBank | None,
                      shown: int) -> tuple[list[list[_Question]], list[float]]:
    """Every question of every submission, encoded to its score position with its anchors, and
    the time each submission took."""
    limit = getattr(engine.model.config, "max_position_embeddings", None)
    questions: list[list[_Question]] = []
    encode_s: list[float] = []
    for _, md, rubric in items:
        t0 = time.perf_counter()
        answers = split_sections(md, rubric) or [md.strip()] * len(rubric.questions)
        row = []
        for k, answer in enumerate(answers):
            q = rubric.questions[k]
            choice = (anchors.choose(q.question, q.max_score, answer, max(shown, NEIGHBOURS))
                      if anchors else AnchorChoice())
            example = None if choice.exact else encode_score_prompt(
                engine.tokenizer, engine.format, rubric, k, answer, limit - 8 if isinstance(limit, int) else None,
                choice.for_prompt()[-shown:] if shown else ())
            row.append(_Question(example, choice))
        questions.append(row)
        encode_s.append(time.perf_counter() - t0)
    return questions, encode_s


class _PrefixCaches:
    """The shared prompt prefixes of a call (see :func:`_shared_prefixes`) and their KV caches, one
    per adapter, each freed when the last answer after it has been read."""

    def __init__(self, questions: list[list[_Question]], rubric_keys: list[str], enabled: bool,
                 adapters: list[str | None]) -> None:
        encoded = [[q.example for q in row] for row in questions]
        self.length = _shared_prefixes(encoded, rubric_keys) if enabled else {}
        per_group = Counter((rubric_keys[i], k) for i, row in enumerate(encoded) for k, ex in enumerate(row)
                            if ex is not None and ex.value_ids and (rubric_keys[i], k) in self.length)
        self.left = {(a, g): n for a in adapters for g, n in per_group.items()}  # answers still to read
        self.kv: dict[tuple, object] = {}

    def reader(self, engine, model, adapter: str | None, group, first_ids: list[int]):
        """What the answers after ``group``'s prefix are read through (the model itself when the
        group shares none), and that prefix's length."""
        import torch

        from scoring.head import base_causal_lm

        n = self.length.get(group, 0)
        if not n:
            return model, 0
        lm = base_causal_lm(model)
        if (adapter, group) not in self.kv:
            ids = torch.tensor([first_ids[:n]], device=engine.device)
            self.kv[(adapter, group)] = lm.model(input_ids=ids, use_cache=True).cache
        return _AfterPrefix(lm, self.kv[(adapter, group)], n), n

    def read(self, adapter: str | None, group, n: int) -> None:
        if (adapter, group) in self.left:
            self.left[(adapter, group)] -= n
            if self.left[(adapter, group)] <= 0:
                self.kv.pop((adapter, group), None)


def _distributions(engine, chunk: list[int], questions: list[list[_Question]], rubric_keys: list[str],
                   adapters: list[str | None], prefixes: _PrefixCaches,
                   step: int) -> dict[tuple[int, int], list[float]]:
    """{(submission, question): the distribution over 0..max} for the chunk's questions that the
    model scores, averaged over ``adapters``."""
    import torch

    from scoring.head import collate_scores, score_log_probs

    groups: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for i in chunk:
        for k, q in enumerate(questions[i]):
            if q.example is not None and q.example.value_ids:
                groups.setdefault((rubric_keys[i], k), []).append((i, k))
    sums: dict[tuple[int, int], list[float]] = {}
    for adapter in adapters:
        for g, members in groups.items():
            members.sort(key=lambda ik: len(questions[ik[0]][ik[1]].example.input_ids))  # less padding
            with engine._using(adapter) as model, torch.inference_mode():
                first = questions[members[0][0]][members[0][1]].example.input_ids
                reader, n_prefix = prefixes.reader(engine, model, adapter, g, first)
                lengths = [len(questions[i][k].example.input_ids) - n_prefix for i, k in members]
                for part in padding_bounded_batches(members, lengths, step):
                    exs = [questions[i][k].example for i, k in part]
                    if n_prefix:
                        exs = [ScoreExample(input_ids=ex.input_ids[n_prefix:], value_ids=ex.value_ids,
                                            max_score=ex.max_score) for ex in exs]
                    rows = score_log_probs(reader, collate_scores(exs, engine.pad_id, engine.device))
                    for (i, k), row in zip(part, rows.exp().float().cpu().tolist()):
                        p = row[: len(questions[i][k].example.value_ids)]
                        sums[(i, k)] = [a + b for a, b in zip(sums[(i, k)], p)] if (i, k) in sums else p
            prefixes.read(adapter, g, len(members))
    return {ik: [x / len(adapters) for x in p] for ik, p in sums.items()}


def _written_scores(engine, chunk: list[int], questions: list[list[_Question]],
                    probs: dict[tuple[int, int], list[float]], adapter: str | None) -> dict[tuple[int, int], float]:
    """The number the model writes at the score position, for questions whose values are not
    single tokens (no distribution to read)."""
    written: dict[tuple[int, int], float] = {}
    for i in chunk:
        for k, q in enumerate(questions[i]):
            if q.example is not None and (i, k) not in probs:
                text = engine._decode(engine._generate([q.example.input_ids], 8, adapter)[0])
                m = re.match(r"\s*(\d+(?:\.\d+)?)", text)
                written[(i, k)] = min(max(float(m.group(1)), 0.0), q.example.max_score) if m else 0.0
    return written


def _item_result(engine, rubric: Rubric, i: int, questions: list[_Question], probs: dict, written: dict,
                 cal, adapters: list[str | None], timings: dict[str, float],
                 thresholds: tuple[float | None, float | None], blend) -> GradeResult:
    """One submission's grade from its questions' distributions (or anchors, or written numbers);
    ``thresholds``: the review thresholds for grades without and with anchors."""
    items, probs_out, conf, raw, used = [], [], [], [], []
    for k, q in enumerate(questions):
        p = probs.get((i, k))
        max_score = rubric.questions[k].max_score
        if q.choice.exact is not None:
            score, c = q.choice.exact.score, 1.0
        else:
            score = expected_score(p) if p is not None else written[(i, k)]
            if blend is not None and p is not None:
                score = blend.apply(score, q.choice.neighbour_score, max_score)
            c = (item_confidence(p, q.choice.neighbour_score, q.choice.nearest_similarity, grade=score)
                 if p is not None else None)
        raw.append(round(score, 3))
        if cal is not None and p is not None:
            score = cal.apply(score, max_score)
        items.append(GradeItem(question=rubric.questions[k].question, score=round(score, 2), max_score=max_score))
        probs_out.append({str(v): round(x, 4) for v, x in enumerate(p)} if p is not None else None)
        conf.append(c)
        used.append(_anchors_used(q))
    grade = Grade(score=round(sum(it.score for it in items), 2), max_score=rubric.max_score, items=items, feedback="")
    return GradeResult(
        grade=grade, raw_text=target_text(grade, rubric), repaired=False, repairs=[],
        latency_s=timings["encode_s"] + timings["model_s"], base_model=engine.base_model, adapter=adapters[0],
        prompt_tokens=sum(len(q.example.input_ids) for q in questions if q.example is not None),
        scoring="generated" if any(key[0] == i for key in written) else "expected",
        score_probs=probs_out, unit="item", confidence=conf, raw_scores=raw, calibrated=cal is not None,
        timings=timings, anchors=used if any(used) else None,
        ensemble=[a for a in adapters if a is not None] if len(adapters) > 1 else None,
        review_threshold=thresholds[0], anchored_review_threshold=thresholds[1])


def _anchors_used(q: _Question) -> dict | None:
    """What a report says about one question's anchors: the exact one, or those in its prompt
    (least similar first), their similarity and the score their nearest neighbours suggest."""
    c = q.choice
    if c.exact is not None:
        return {"exact": c.exact.source or True}
    if not c.anchors:
        return None
    n = q.example.n_anchors if q.example is not None else 0
    return {"in_prompt": [a.source for a in c.anchors[len(c.anchors) - n:]] if n else [],
            "nearest_similarity": c.nearest_similarity, "neighbour_score": round(c.neighbour_score, 3)}


# A prefix shorter than this is not worth a separate pass (and its own forward per batch).
MIN_SHARED_PREFIX = 16
# At most this share of a batch's tokens may be padding: a long answer among short ones gets a
# batch of its own (on the sample submissions, one free-form essay padded its three-row batches
# to 2.2x their tokens).
MAX_PADDING_SHARE = 0.2


def padding_bounded_batches(rows: list, lengths: list[int], batch_size: int) -> list[list]:
    """``rows`` (sorted by ``lengths``, ascending) cut into batches of at most ``batch_size`` whose
    padding stays within MAX_PADDING_SHARE of their tokens."""
    batches: list[list] = []
    part: list = []
    real = 0
    for row, n in zip(rows, lengths):
        if part and (len(part) >= batch_size or n * (len(part) + 1) * (1 - MAX_PADDING_SHARE) > real + n):
            batches.append(part)
            part, real = [], 0
        part.append(row)
        real += n
    return batches + ([part] if part else [])


def _shared_prefixes(encoded: list[list], rubric_keys: list[str]) -> dict[tuple[str, int], int]:
    """For each (rubric, question) asked of two or more submissions: how many leading tokens all
    their prompts share (the one-question instructions up to the student's answer). At least one
    token is left to every prompt, since the score is read after its last token. Taken from the
    tokens themselves, so a reused prefix is exactly what each prompt would have computed."""
    groups: dict[tuple[str, int], list[list[int]]] = {}
    for exs, rubric_key in zip(encoded, rubric_keys):
        for k, ex in enumerate(exs):
            if ex is not None and ex.value_ids:
                groups.setdefault((rubric_key, k), []).append(ex.input_ids)
    out = {}
    for g, prompts in groups.items():
        if len(prompts) < 2:
            continue
        first, n = prompts[0], min(len(p) for p in prompts) - 1
        for p in prompts[1:]:
            n = next((j for j in range(n) if p[j] != first[j]), n)
        if n >= MIN_SHARED_PREFIX:
            out[g] = n
    return out


class _AfterPrefix:
    """A causal LM whose body continues from a computed prefix: what
    :func:`scoring.head.score_log_probs` reads scores through (it calls ``.model(input_ids=,
    attention_mask=)``, ``.get_output_embeddings()`` and ``.config``), so the item scores keep their
    one home there. Each call gets its own copy of the prefix cache, repeated for the batch (a
    forward appends to the cache it is given)."""

    def __init__(self, lm, cache, prefix_len: int) -> None:
        self.lm, self.cache, self.prefix_len = lm, cache, prefix_len
        self.config = lm.config

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def model(self, *, input_ids, attention_mask):
        import torch

        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(input_ids.shape[0])
        seen = torch.ones((input_ids.shape[0], self.prefix_len), dtype=attention_mask.dtype,
                          device=attention_mask.device)
        return self.lm.model(input_ids=input_ids, attention_mask=torch.cat([seen, attention_mask], dim=1),
                             cache=cache, use_cache=True)

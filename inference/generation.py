"""Whole grades written by the model (``example_unit="submission"``): the grade JSON decoded greedily
under the rubric's schema, parsed and repaired, its scores then read as expected values.

- Prompts come from ``data.prompt_format.encode_prompt`` (the tokens training used) and generation
  stops at ``stop_token_ids``. Decoding is greedy with the KV cache; tokens stream to a callback.
  By default it is constrained to the rubric's grade schema (``inference.constrained``, xgrammar):
  the answer is a valid grade by construction, its forced opening is part of the prompt, its later
  forced spans go into the model with the token before them (jump-forward:
  ``GradeResult.model_steps`` against ``new_tokens``), and repair is left for what the constraint
  cannot cover (xgrammar not installed, ``constrained=False``). The answer goes through
  ``inference.repair.parse_grade``; if it holds no JSON at all, one guided retry forces the grade
  JSON's opening (as training writes it) up to the first score, makes that score start with the
  most likely digit, and lets the model write the rest; if that fails too, every question scores
  0 and the grade says why.
- Scores are the model's expected score by default (``scoring="expected"``): with the grade JSON
  written as training writes it, one forward pass reads, at each question's score, the model's
  probabilities for the values 0..max and takes their mean (``grade_many`` reads a whole batch's
  grades in a few right-padded passes, only the score positions through the LM head, with the
  same results as one pass per grade). A grade decoded under its grammar needs no such pass: the
  decoder keeps those probabilities from the logits of the step that starts each score
  (``DecodedGrade.score_probs``); the pass is for free decoding, a retry, or a score read there
  without them. ``scoring="generated"`` keeps the digits the model wrote.
"""
from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from data.rubric import Grade, Rubric
from inference.item_grading import padding_bounded_batches
from inference.repair import Repair, parse_grade, scores_read_from_output, zero_grade
from inference.results import GradeResult

SCORINGS = ("expected", "generated")


@dataclass
class _Answer:
    """A model's answer read as a grade, before its scores are re-read (``scoring="expected"``)."""

    raw: str
    new: list[int]
    grade: Grade
    repaired: bool
    repairs: list[Repair]
    retried: bool


# --------------------------------------------------------------------------- streaming


class _CallbackStreamer:
    """A transformers streamer (put/end) that decodes incrementally and hands new text to a
    callback; generate() and inference.constrained.decode_grades call it synchronously, so no
    thread is needed."""

    def __init__(self, tokenizer, on_token: Callable[[str], None], stop_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.on_token = on_token
        self.stop_ids = set(stop_ids)
        self.ids: list[int] = []
        self.sent = 0
        self.skip_prompt = True

    def put(self, value) -> None:
        if self.skip_prompt:  # the first put() is the prompt
            self.skip_prompt = False
            return
        for t in value.reshape(-1).tolist():
            if t not in self.stop_ids:
                self.ids.append(int(t))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            return
        if len(text) > self.sent:
            self.on_token(text[self.sent :])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if len(text) > self.sent:
            self.on_token(text[self.sent :])
            self.sent = len(text)


class _StepClock:
    """A streamer that only notes when decoding started (its first put() is the prompt, from
    generate() or inference.constrained.decode_grades) and when the first new tokens came out
    (the second): the prefill, as against the decoding."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self._puts = 0

    def put(self, value) -> None:
        self._puts += 1
        if self._puts == 2:
            self.first_token = time.perf_counter()

    def end(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    @property
    def prefill_s(self) -> float:
        return (self.first_token or time.perf_counter()) - self.started


class WholeGrades:
    """The engine's whole-grade methods (mixed into ``inference.engine.GraderEngine``, whose model,
    tokenizer, format and adapters they use)."""

    def grade_whole(self, submission_md: str, rubric: Rubric, *, adapter: str | Path | None, scoring: str,
                    max_new_tokens: int, on_token: Callable[[str], None] | None, retry: bool,
                    constrained: bool) -> GradeResult:
        """One submission's grade written by the model (``GraderEngine.grade`` with unit "submission")."""
        with self._lock:
            key = self._attach(adapter)
            t0 = time.perf_counter()
            prompt = self.encode(submission_md, rubric, max_new_tokens)
            streamer = _CallbackStreamer(self.tokenizer, on_token, self.stop_ids) if on_token else None
            steps: list[int] = []
            decoded_probs: list | None = [] if scoring == "expected" else None
            new = self._generate([prompt], max_new_tokens, key, streamer=streamer,
                                 rubrics=[rubric] if constrained else None, steps=steps, score_probs=decoded_probs)[0]
            result = self._finish(prompt, new, rubric, max_new_tokens, t0, key, scoring=scoring, retry=retry,
                                  decoded_probs=decoded_probs[0] if decoded_probs else None)
            result.model_steps = steps[0]
            return result


    def grade_whole_many(self, items: list[tuple[str, str, Rubric]], *, adapter: str | Path | None, scoring: str,
                         batch_size: int, max_new_tokens: int, progress: Callable[[int], None] | None,
                         retry: bool, on_batch: Callable[[list[tuple[int, GradeResult]]], None] | None,
                         constrained: bool) -> list[GradeResult]:
        """Submissions' grades written by the model in batches (``GraderEngine.grade_many`` with unit
        "submission"), results in input order."""
        key = self._attach(adapter)
        prompts = [self.encode(md, rubric, max_new_tokens) for _, md, rubric in items]
        # Similar lengths together: less padding. Results go back to input order.
        order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
        results: list[GradeResult | None] = [None] * len(items)
        for start in range(0, len(order), max(1, batch_size)):
            chunk = order[start : start + batch_size]
            with self._lock:  # per batch: a single grade from another thread may run between batches
                clock = _StepClock()
                steps: list[int] = []
                decoded_probs: list = []
                news = self._generate([prompts[i] for i in chunk], max_new_tokens, key, streamer=clock,
                                      rubrics=[items[i][2] for i in chunk] if constrained else None, steps=steps,
                                      score_probs=decoded_probs if scoring == "expected" else None)
                share = (time.perf_counter() - clock.started) / len(chunk)
                prefill = clock.prefill_s / len(chunk)
                answers, own = [], []  # each answer parsed (and retried) on its own, timed alone
                for i, new in zip(chunk, news):
                    t_i = time.perf_counter()
                    answers.append(self._answer(prompts[i], new, items[i][2], max_new_tokens, key, retry))
                    own.append(time.perf_counter() - t_i)
                scored: list = [(a.grade, None) for a in answers]
                if scoring == "expected":
                    # From the distributions read while decoding; the rest (free decoding, a
                    # retry, a score not read) in a few passes together, each charged its share.
                    again = []
                    for r, (i, a) in enumerate(zip(chunk, answers)):
                        t_r = time.perf_counter()
                        read = scores_read_from_output(a.repairs, items[i][2])
                        got = None if a.retried else self._expected_from_decoding(
                            a.grade, read, decoded_probs[r] if r < len(decoded_probs) else None)
                        if got is None:
                            again.append((r, read))
                        else:
                            scored[r] = got
                        own[r] += time.perf_counter() - t_r
                    if again:
                        t_s = time.perf_counter()
                        passed = self._expected_scores_many(
                            [(prompts[chunk[r]], answers[r].grade, items[chunk[r]][2], read) for r, read in again],
                            adapter=key, batch_size=batch_size)
                        pass_share = (time.perf_counter() - t_s) / len(again)
                        for (r, _), got in zip(again, passed):
                            scored[r] = got
                            own[r] += pass_share
                for i, answer, (grade, probs), own_s, n_steps in zip(chunk, answers, scored, own, steps):
                    answer.grade = grade
                    scoring_s = own_s  # its parsing, its scores, and its share of a scoring pass
                    results[i] = self._result(prompts[i], answer, probs, share + scoring_s, key)
                    results[i].model_steps = n_steps
                    results[i].timings = {"prefill_s": round(prefill, 4), "decode_s": round(share - prefill, 4),
                                          "scoring_s": round(scoring_s, 4)}
            if on_batch:
                on_batch([(i, results[i]) for i in chunk])
            if progress:
                progress(len(chunk))
        return results  # type: ignore[return-value]

    def encode(self, submission_md: str, rubric: Rubric, max_new_tokens: int) -> list[int]:
        """The prompt tokens for a submission. Its Markdown is first normalised to the sections
        training rendered (when its headings match the rubric), so every caller (CLI, UI, batch)
        grades exactly what the model was trained on."""
        from data.markdown import normalize_submission
        from data.prompt_format import encode_prompt

        submission_md = normalize_submission(submission_md, rubric)

        limit = getattr(self.model.config, "max_position_embeddings", None)
        max_prompt = limit - max_new_tokens if isinstance(limit, int) and limit > max_new_tokens else None
        return encode_prompt(self.tokenizer, self.format, rubric, submission_md, max_prompt_tokens=max_prompt)

    def _grade_grammars(self):
        """xgrammar's compiled grade grammars for this tokenizer (built on first use), or None
        when xgrammar is not installed (grades are then generated freely and repaired)."""
        if self._grammars is None:
            try:
                from inference.constrained import GradeGrammars
            except ImportError:
                return None
            vocab = getattr(self.model.get_output_embeddings(), "out_features", None) or self.model.config.vocab_size
            self._grammars = GradeGrammars(self.tokenizer, int(vocab), self.stop_ids)
        return self._grammars

    def _generate(self, batch_ids: list[list[int]], max_new_tokens: int, adapter: str | None,
                  streamer=None, rubrics: list[Rubric] | None = None,
                  steps: list[int] | None = None, score_probs: list | None = None) -> list[list[int]]:
        """Greedy decoding with the KV cache over left-padded prompts, with ``adapter`` (None: the
        base alone); new tokens per row, cut at the first stop token. With ``rubrics`` (one per
        row), decoding is constrained to each rubric's grade (inference.constrained.decode_grades:
        the forced opening joins the prompt and is the start of the row's new tokens; later forced
        spans go in with the token before them, one model step each). ``steps``, when given, gets
        each row's number of model forward passes (the prefill included); ``score_probs``, when
        given, each row's item score distributions read while decoding under the grammar
        (:attr:`inference.constrained.DecodedGrade.score_probs`; None for a row decoded freely)."""
        import torch
        from transformers import GenerationConfig

        grammars = self._grade_grammars() if rubrics else None
        if grammars is not None:
            from data.prompt_format import encode_answer_text
            from inference.constrained import decode_grades

            # (Each row's budget is raised to what the smallest grade of its rubric takes.)
            with self._using(adapter) as model, torch.inference_mode():
                decoded = decode_grades(model, batch_ids, rubrics, grammars=grammars,
                                        encode=functools.partial(encode_answer_text, self.tokenizer, self.format),
                                        decode=self._decode, max_new_tokens=max_new_tokens, stop_ids=self.stop_ids,
                                        pad_id=self.pad_id, streamer=streamer,
                                        value_ids=self._value_ids if score_probs is not None else None)
            if steps is not None:
                steps.extend(d.steps for d in decoded)
            if score_probs is not None:
                score_probs.extend(d.score_probs for d in decoded)
            return [d.tokens for d in decoded]
        width = max(len(x) for x in batch_ids)
        ids = torch.full((len(batch_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, x in enumerate(batch_ids):
            ids[k, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[k, width - len(x):] = 1
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, eos_token_id=self.stop_ids or None,
            pad_token_id=self.pad_id,
        )
        with self._using(adapter) as model, torch.inference_mode():
            out = model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                 generation_config=gen_cfg, streamer=streamer)
        if score_probs is not None:
            score_probs.extend([None] * len(batch_ids))
        rows = []
        stops = set(self.stop_ids)
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            rows.append(row[:cut])
            if steps is not None:
                steps.append(min(cut + 1, len(row)))  # one step per token, the stop token's included
        return rows

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _json_opening(self, rubric: Rubric) -> str:
        """The start of the grade JSON as training writes it, up to the first item's score:
        the retry's forced beginning."""
        from data.prompt_format import target_text

        text = target_text(zero_grade(rubric), rubric)
        m = re.search(r'"score":', text)
        return text[: m.end()] if m else '{"items":['

    def _digit_ids(self) -> list[int]:
        ids = []
        for d in "0123456789":
            enc = self.tokenizer(d, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.append(enc[0])
        return ids

    def _retry(self, prompt: list[int], rubric: Rubric, max_new_tokens: int,
               adapter: str | None) -> tuple[str, list[int]]:
        """Guided second try: the grade JSON's opening up to the first score is forced, the score
        must start with a digit (the most likely one), then the model writes the rest freely."""
        opening = self._json_opening(rubric)
        # Encoded as text (special-token look-alikes split), as the prompt format encodes answers.
        forced = list(self.tokenizer(opening, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        digits = self._digit_ids()
        if opening.endswith('"score":') and digits:
            logits = self.next_token_logits(prompt + forced, adapter=adapter)
            forced.append(max(digits, key=lambda t: float(logits[t])))
            opening = opening + self._decode(forced[-1:])
        new = self._generate([prompt + forced], max_new_tokens, adapter)[0]
        return opening + self._decode(new), new

    def _answer(self, prompt: list[int], new: list[int], rubric: Rubric, max_new_tokens: int,
                adapter: str | None, retry: bool) -> _Answer:
        """The model's answer read as a grade (repaired where needed), with the one guided retry
        when it holds no JSON at all (see :meth:`_retry`)."""
        raw = self._decode(new)
        grade, repaired, repairs = parse_grade(raw, rubric)
        retried = False
        if retry and _no_json(repairs):
            # One bounded, guided retry (see _retry).
            raw2, new2 = self._retry(prompt, rubric, max_new_tokens, adapter)
            grade2, repaired2, repairs2 = parse_grade(raw2, rubric)
            retried = True
            if not _no_json(repairs2):
                raw, new, grade = raw + "\n[retry]\n" + raw2, new2, grade2
                repairs = [Repair("retried", "no JSON in the first answer; retried with the JSON opening and a "
                                             "digit score forced")] + repairs2
                repaired = True
            else:
                raw = raw + "\n[retry]\n" + raw2
                repairs = [Repair("no_json", "no JSON grade found in the model output (also after one retry with "
                                             "the JSON opening forced); every question scored 0")]
                repaired = True
        return _Answer(raw=raw, new=new, grade=grade, repaired=repaired, repairs=repairs, retried=retried)

    def _result(self, prompt: list[int], answer: _Answer, probs: list[dict[str, float] | None] | None,
                latency_s: float, adapter: str | None) -> GradeResult:
        return GradeResult(grade=answer.grade, raw_text=answer.raw, repaired=answer.repaired, repairs=answer.repairs,
                           latency_s=latency_s, base_model=self.base_model, adapter=adapter,
                           prompt_tokens=len(prompt), new_tokens=len(answer.new), retried=answer.retried,
                           scoring="expected" if probs and any(probs) else "generated", score_probs=probs)

    def _finish(self, prompt: list[int], new: list[int], rubric: Rubric, max_new_tokens: int, t0: float,
                adapter: str | None, scoring: str, retry: bool,
                decoded_probs: list[dict[int, float] | None] | None = None) -> GradeResult:
        """One grade from the model's answer: parsed (and retried), then, with ``scoring="expected"``,
        its scores from the distributions read while decoding (``decoded_probs``, see
        :meth:`_expected_from_decoding`), else read in one forward pass of its own."""
        answer = self._answer(prompt, new, rubric, max_new_tokens, adapter, retry)
        probs = None
        if scoring == "expected":
            read = scores_read_from_output(answer.repairs, rubric)
            got = None if answer.retried else self._expected_from_decoding(answer.grade, read, decoded_probs)
            if got is None:
                got = self._expected_scores(prompt, answer.grade, rubric, read, adapter=adapter)
            answer.grade, probs = got
        return self._result(prompt, answer, probs, time.perf_counter() - t0, adapter)

    def _expected_from_decoding(self, grade: Grade, read: list[bool],
                                decoded_probs: list[dict[int, float] | None] | None,
                                ) -> tuple[Grade, list[dict[str, float] | None]] | None:
        """:meth:`_expected_scores` from the score distributions read while the grade was decoded
        under its grammar (inference.constrained.decode_grades: the same logits, at the same
        positions, without a second pass over the prompt), rounded as there; None when some
        question whose score was read from the output has no such distribution (then the pass
        is needed)."""
        if decoded_probs is None:
            return None
        dists: dict[int, dict[int, float]] = {}
        for i, item in enumerate(grade.items):
            if not (i < len(read) and read[i]) or not self._value_ids(item.max_score):
                continue  # filled in by repair, or values not single tokens: its score is kept
            dist = decoded_probs[i] if i < len(decoded_probs) else None
            if dist is None:
                return None
            dists[i] = dist
        return _with_expected_scores(grade, dists)

    def _value_ids(self, max_score: float) -> dict[int, int] | None:
        """{token id: value} for the whole-number scores 0..max_score when each is one token: the
        prompt format's value tokens, the same ones item-level grading reads."""
        from data.prompt_format import score_value_ids

        ids = score_value_ids(self.tokenizer, self.format, max_score)
        return None if ids is None else {t: v for v, t in enumerate(ids)}

    def _expected_scores(self, prompt: list[int], grade: Grade, rubric: Rubric, read: list[bool], *,
                         adapter: str | Path | None) -> tuple[Grade, list[dict[str, float] | None]]:
        """Replace each score the model wrote by its expected value under ``adapter`` (see the module
        docstring).
        Questions whose score was filled in by repair, whose values are not single tokens, or whose
        max is not a whole number keep their score."""
        return self._expected_scores_many([(prompt, grade, rubric, read)], adapter=adapter)[0]

    def _expected_scores_many(self, rows: list[tuple[list[int], Grade, Rubric, list[bool]]], *,
                              adapter: str | Path | None, batch_size: int | None = None,
                              ) -> list[tuple[Grade, list[dict[str, float] | None]]]:
        """:meth:`_expected_scores` for several (prompt, grade, rubric, read) rows at once: each row
        is its prompt and its grade as training writes it; rows sorted by length go through the
        model together (right-padded, at most ``batch_size`` a pass and MAX_PADDING_SHARE of
        padding, :func:`inference.item_grading.padding_bounded_batches`), and only the hidden states at the score
        positions go through the LM head. With right padding every real token keeps its position
        and sees only the tokens before it, so a row reads what it would alone."""
        import torch

        from data.prompt_format import target_text
        from scoring.head import base_causal_lm

        plans = []  # per row: (its tokens, prompt length, {item: (answer token index, value ids)})
        for prompt, grade, rubric, read in rows:
            text = target_text(grade, rubric)
            enc = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                                 return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
            token_at = {start: k for k, (start, end) in enumerate(offsets) if end > start}
            starts = [m.end() for m in re.finditer(r'"score":', text)][: len(grade.items)]
            wanted: dict[int, tuple[int, dict[int, int]]] = {}
            for i, (item, ch) in enumerate(zip(grade.items, starts)):
                values = self._value_ids(item.max_score)
                k = token_at.get(ch)
                if i < len(read) and read[i] and values and k is not None and ids[k] in values:
                    wanted[i] = (k, values)
            plans.append((list(prompt) + ids, len(prompt), wanted))
        dists: list[dict[int, dict[int, float]]] = [{} for _ in rows]  # per row: item -> {value: prob}
        todo = sorted((n for n, plan in enumerate(plans) if plan[2]), key=lambda n: len(plans[n][0]))
        if not todo:  # no score to read: no pass
            return [_with_expected_scores(grade, {}) for _, grade, _, _ in rows]
        step = max(1, batch_size or len(todo))
        with self._using(adapter) as model, torch.inference_mode():
            lm = base_causal_lm(model)
            head = lm.get_output_embeddings()
            cap = getattr(lm.config, "final_logit_softcapping", None)
            for part in padding_bounded_batches(todo, [len(plans[n][0]) for n in todo], step):
                width = max(len(plans[n][0]) for n in part)
                ids = torch.full((len(part), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                where: list[tuple[int, int, int]] = []  # (row in rows, item, gathered row)
                pick_row, pick_pos = [], []
                for r, n in enumerate(part):
                    tokens, n_prompt, wanted = plans[n]
                    ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                    mask[r, : len(tokens)] = 1
                    for i, (k, _) in wanted.items():  # the hidden state before answer token k predicts it
                        where.append((n, i, len(pick_row)))
                        pick_row.append(r)
                        pick_pos.append(n_prompt + k - 1)
                hidden = lm.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  use_cache=False).last_hidden_state
                logits = head(hidden[torch.tensor(pick_row, device=self.device),
                                     torch.tensor(pick_pos, device=self.device)])
                if cap:  # as the model's own forward does (Gemma)
                    logits = torch.tanh(logits / cap) * cap
                logits = logits.float()
                for n, i, g in where:
                    values = plans[n][2][i][1]
                    p = torch.softmax(logits[g, list(values)], dim=-1).cpu().tolist()
                    dists[n][i] = dict(zip(values.values(), p))
        return [_with_expected_scores(grade, d) for (_, grade, _, _), d in zip(rows, dists)]


def _with_expected_scores(grade: Grade, dists: dict[int, dict[int, float]],
                          ) -> tuple[Grade, list[dict[str, float] | None]]:
    """``grade`` with item i's score replaced by the expected value of ``dists[i]`` ({value:
    probability}, rounded to 2 decimals) and the total re-summed, and each item's probabilities
    (rounded to 4; None for items not in ``dists``, whose scores are kept)."""
    probs: list[dict[str, float] | None] = [None] * len(grade.items)
    if not dists:
        return grade, probs
    items = list(grade.items)
    for i, dist in dists.items():
        probs[i] = {str(v): round(p, 4) for v, p in dist.items()}
        items[i] = items[i].model_copy(update={"score": round(sum(p * v for v, p in dist.items()), 2)})
    return grade.model_copy(update={"items": items, "score": round(sum(it.score for it in items), 2)}), probs


def check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, not {scoring!r}")


def _no_json(repairs: list[Repair]) -> bool:
    """parse_grade found no JSON at all (its first repair says so)."""
    return bool(repairs) and repairs[0].kind == "no_json"

"""Constrained decoding of whole grades: the model can only write a grade the rubric accepts.

:func:`grade_json_schema` turns a rubric into the JSON schema of its grade as training writes it
(``data.prompt_format.target_text``): the fields in training order (items -> score -> max_score
-> feedback; each item question -> justification? -> score -> max_score), the exact question
labels, each score a number within [0, max] (at most 6 decimals), the maxima fixed, strings
bounded. The same schema is what a server such as vLLM takes for guided decoding
(``guided_json`` / ``response_format``), so a grade served there has the same shape.

:class:`GradeLogitsProcessor` applies it inside ``transformers``' ``generate`` with xgrammar (the
structured-generation library vLLM and SGLang use), one grammar matcher per row, plus what a
static schema cannot say:

- the total is the sum of the item scores: once the items are closed, ``,"score":<sum>,
  "max_score":<max>,"feedback":"`` is forced token by token;
- the answer fits its token budget: when only the tokens that the rest of the grade may need
  are left, an open string is closed at once, so a grade always ends with its stop token. The
  budget is ``max_new_tokens``, raised where needed to :func:`reserve_chars` (a grade of the
  rubric with empty strings: no valid grade is shorter, and none fits in less).

The forced opening (``{"items":[{"question":"<label>","``) is not generated at all: the engine
appends it to the prompt (:func:`forced_opening`), one prefill instead of a step per token.
"""
from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessor

from data.prompt_format import question_labels

if TYPE_CHECKING:
    from data.rubric import Rubric

# Upper bounds for the free text, in characters (the token budget may close them sooner).
JUSTIFICATION_MAX_CHARS = 400
FEEDBACK_MAX_CHARS = 800
# Room for any number of a grade: the schema's scores are at most "0." and 6 decimals (8
# characters); the forced total, a sum, may have more digits before the point.
_MAX_NUMBER_CHARS = 12


def _num(x: float) -> int | float:
    x = round(float(x), 6)
    return int(x) if x.is_integer() else x


def _text(max_chars: int) -> dict[str, Any]:
    """A JSON string of at most ``max_chars`` characters, without escapes or control characters
    (a raw tab or newline inside a string is not JSON; the grammar's default string allows them)."""
    return {"type": "string", "pattern": r'^[^"\\\u0000-\u001f]{0,%d}$' % max_chars}


def grade_json_schema(rubric: "Rubric", *, justification_chars: int = JUSTIFICATION_MAX_CHARS,
                      feedback_chars: int = FEEDBACK_MAX_CHARS) -> dict[str, Any]:
    """The JSON schema of a grade of ``rubric``, as training writes it (see the module docstring).
    Justifications are optional, as in training data without them."""

    def item(label: str, max_score: float) -> dict[str, Any]:
        return {"type": "object",
                "properties": {"question": {"const": label},
                               "justification": _text(justification_chars),
                               "score": {"type": "number", "minimum": 0, "maximum": _num(max_score)},
                               "max_score": {"const": _num(max_score)}},
                "required": ["question", "score", "max_score"], "additionalProperties": False}

    items = [item(lab, q.max_score) for lab, q in zip(question_labels(rubric), rubric.questions)]
    return {"type": "object",
            "properties": {"items": {"type": "array", "prefixItems": items, "items": False,
                                     "minItems": len(items), "maxItems": len(items)},
                           "score": {"type": "number", "minimum": 0, "maximum": _num(rubric.max_score)},
                           "max_score": {"const": _num(rubric.max_score)},
                           "feedback": _text(feedback_chars)},
            "required": ["items", "score", "max_score", "feedback"], "additionalProperties": False}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def reserve_chars(rubric: "Rubric") -> int:
    """An upper bound, in characters, on a grade of ``rubric`` with every string empty and every
    number as long as allowed: what must stay in the token budget once a string is closed (a
    token is at least one character)."""
    items = [{"question": lab, "justification": "", "score": 0, "max_score": _num(q.max_score)}
             for lab, q in zip(question_labels(rubric), rubric.questions)]
    text = _dumps({"items": items, "score": 0, "max_score": _num(rubric.max_score), "feedback": ""})
    return len(text) + _MAX_NUMBER_CHARS * (len(items) + 1)


class GradeGrammars:
    """xgrammar's view of one tokenizer and vocabulary, and the compiled grammar of each rubric's
    grade (compiled once per schema: a rubric grades many submissions)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> None:
        import xgrammar as xgr

        self.tokenizer = tokenizer
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.vocab_size = vocab_size
        self._compiled = functools.lru_cache(maxsize=64)(self._compile)

    def _compile(self, schema_json: str):
        return self.compiler.compile_json_schema(schema_json, any_whitespace=False, separators=(",", ":"),
                                                 strict_mode=True)

    def compiled(self, rubric: "Rubric"):
        return self._compiled(_dumps(grade_json_schema(rubric)))


def forced_opening(grammars: GradeGrammars, rubric: "Rubric", encode, decode) -> list[int]:
    """The tokens every grade of ``rubric`` starts with (``{"items":[{"question":"<label>","``),
    as training tokenizes them: the longest run of the tokens of a grade as training writes it
    (``encode``: the prompt format's answer encoding) that stays within the grammar's forced
    start. A forced string tokenized on its own could end mid-token (``"`` where training has
    ``","``) and lead the model off the path it learnt. [] when the grammar does not take them."""
    import xgrammar as xgr

    from data.prompt_format import target_text
    from inference.repair import zero_grade

    matcher = xgr.GrammarMatcher(grammars.compiled(rubric))
    forced = matcher.find_jump_forward_string()
    ids: list[int] = []
    text = ""
    for t in encode(target_text(zero_grade(rubric), rubric)):
        piece = decode([t])
        if not forced.startswith(text + piece):
            break
        ids.append(t)
        text += piece
    for t in ids:
        if not matcher.accept_token(t):
            return []
    return ids


class GradeLogitsProcessor(LogitsProcessor):
    """Masks each row's next-token logits to what its rubric's grade grammar allows (see the module
    docstring). One instance per ``generate`` call; rows are matched to ``rubrics`` in order and
    start after their ``openings`` (already in the prompt)."""

    def __init__(self, grammars: GradeGrammars, rubrics: list["Rubric"], openings: list[list[int]],
                 max_new_tokens: int, encode, decode) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.rubrics, self.encode, self.decode = rubrics, encode, decode
        self.matchers = []
        for rubric, opening in zip(rubrics, openings):
            m = xgr.GrammarMatcher(grammars.compiled(rubric))
            for t in opening:
                m.accept_token(t)
            self.matchers.append(m)
        self.texts = [decode(o) for o in openings]  # what each row has written (for the total)
        self.budget = [max_new_tokens] * len(rubrics)  # tokens each row may still write
        self.reserve = [reserve_chars(r) for r in rubrics]
        self.forced: list[list[int]] = [[] for _ in rubrics]
        self.total_done = [False] * len(rubrics)
        self.broken = [False] * len(rubrics)  # a token the grammar refused: left to repair
        quote = encode('"')
        self.quote = quote[0] if len(quote) == 1 else None
        self.bitmask = xgr.allocate_token_bitmask(len(rubrics), grammars.vocab_size)
        self.started = False

    def _after_token(self, row: int, token: int) -> None:
        m = self.matchers[row]
        if self.broken[row] or m.is_terminated():
            return
        self.budget[row] -= 1
        if not m.accept_token(token):
            self.broken[row] = True
            return
        if self.forced[row]:
            self.forced[row].pop(0)
        self.texts[row] += self.decode([token])
        if not self.total_done[row]:
            self._force_total(row)

    def _force_total(self, row: int) -> None:
        """Once the items are closed: the total (their sum), the maximum and the feedback's opening."""
        text = self.texts[row]
        end = _items_end(text)
        if end is None:
            return
        self.total_done[row] = True
        rubric = self.rubrics[row]
        try:
            items = json.loads(text[: end + 1] + "}")["items"]
            total = sum(float(it["score"]) for it in items)
        except (ValueError, KeyError, TypeError):
            return  # the grammar kept it well formed; if not, repair sees it
        rest = f',"score":{_dumps(_num(total))},"max_score":{_dumps(_num(rubric.max_score))},"feedback":"'
        written = text[end + 1 :]
        if not rest.startswith(written):
            return
        self.forced[row] = list(self.encode(rest[len(written):]))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.started:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                self._after_token(row, int(token))
        self.started = True
        self.xgr.reset_token_bitmask(self.bitmask)  # all allowed: rows finished or broken stay free
        only: dict[int, int] = {}
        for row, m in enumerate(self.matchers):
            if self.broken[row] or m.is_terminated():
                continue  # generate pads finished rows; a broken one writes freely and is repaired
            m.fill_next_token_bitmask(self.bitmask, row)
            if self.forced[row]:
                only[row] = self.forced[row][0]
            elif self.quote is not None and self.budget[row] <= self.reserve[row] and _in_string(self.texts[row]):
                only[row] = self.quote  # out of room: close the string now
        scores = scores.contiguous()  # the last position's logits are a strided view; the kernel needs rows
        self.xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        for row, token in only.items():
            keep = scores[row, token].clone()
            if not torch.isfinite(keep):  # not allowed here (e.g. a key being written): the grammar decides
                if self.forced[row]:
                    self.forced[row] = []
                continue
            scores[row] = float("-inf")
            scores[row, token] = keep
        return scores


def _in_string(text: str) -> bool:
    """Inside a JSON string at the end of ``text`` (the grammar's strings hold no escapes)."""
    return text.count('"') % 2 == 1


def _items_end(text: str) -> int | None:
    """Index of the "]" that closes the items array, or None while it is open."""
    depth, in_str = 0, False
    for i, ch in enumerate(text):
        if ch == '"':
            in_str = not in_str
        elif in_str:
            continue
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth == 0:
                return i
    return None

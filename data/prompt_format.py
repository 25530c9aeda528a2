"""THE prompt format: how a (rubric, submission) pair becomes tokens, for training and inference.

Defined once so that the prompt a model is trained on and the prompt it grades with are the same
tokens. Three renderings of the same content:

- ``harmony`` (GPT-OSS): rendered by OpenAI's ``openai-harmony``. System message (reasoning
  effort low), developer message = :func:`instructions`, user message = the submission Markdown,
  and the grade as the assistant's ``final`` channel message. The prompt ends with
  ``<|start|>assistant<|channel|>final<|message|>`` so the model answers straight in the final
  channel; a training example ends with ``<|return|>``, token-exact with
  ``render_conversation_for_training``.
- ``chat_template`` (models whose tokenizer has one): system = instructions, user = submission,
  ``add_generation_prompt=True``; then the grade and the template's end-of-turn token.
- ``plain`` (base models such as Gemma 3 270M): a fixed text template, then the grade and EOS.

The grade (the target) is compact one-line JSON, items first so the model grades each question
before it writes the total::

    {"items":[{"question":"1.1","justification":"...","score":3.5,"max_score":5}, ...],
     "score":25,"max_score":35,"feedback":"..."}

``items[].question`` is the question's *label*, not its text: the rubric's ``question_id`` or,
without one, its 1-based position -- the same label the submission's Markdown headings use
(``## Question 1.1: ...``). It keeps targets short (long essay prompts are not copied into every
answer) and maps back to the rubric with :func:`match_question` (``inference.repair`` matches the
same labels). ``justification`` appears only when the training data has one; it comes before the
score so the model argues first and scores second.

Student text is never read as control tokens: harmony encodes message content as plain text,
and for the other formats the rubric and submission are encoded with special tokens split.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

from data.anchors import anchor_prompt_text
from data.rubric import Grade, GradedSubmission, GradeItem, Rubric

if TYPE_CHECKING:  # heavy imports only for type checkers
    from openai_harmony import HarmonyEncoding

log = logging.getLogger(__name__)

Format = Literal["harmony", "chat_template", "plain"]
FORMATS: tuple[Format, ...] = ("harmony", "chat_template", "plain")

TRUNCATION_MARK = "\n\n[...]"  # what a cut submission ends with, so the model sees it was cut
IGNORE_INDEX = -100  # label value the loss ignores (PyTorch / HF convention)

# The GPT-OSS control tokens (o200k_harmony ids) that the harmony format relies on.
HARMONY_START, HARMONY_CHANNEL, HARMONY_MESSAGE = 200006, 200005, 200008
HARMONY_RETURN, HARMONY_CALL, HARMONY_END = 200002, 200012, 200007

PLAIN_SUBMISSION_HEADER = "\n\n## Submission\n\n"
PLAIN_ANSWER_HEADER = "\n\n## Grade (JSON)\n"


class PromptTooLongError(ValueError):
    """Even an empty submission leaves no room: instructions + grade exceed the length limit."""


# --------------------------------------------------------------------------- the content


def question_labels(rubric: Rubric) -> list[str]:
    """Each question's label: its ``question_id``, else its 1-based position (as the Markdown
    headings of a submission and ``inference.repair`` use)."""
    return rubric.labels()


def match_question(label: str, rubric: Rubric) -> int | None:
    """Index of the rubric question that ``label`` (a label, ``Question 1.2``, or the question's
    text) names, or None (:meth:`data.rubric.Rubric.find_question`)."""
    return rubric.find_question(label)


def score_number(x: float) -> int | float:
    """THE way a score is written, in prompts, targets and the grade schema: a short JSON number,
    4 rather than 4.0, at most 3 decimals (fewer tokens)."""
    x = round(float(x), 3)
    return int(x) if x.is_integer() else x


def _fmt_num(x: float) -> str:
    return json.dumps(score_number(x))


def response_example(rubric: Rubric) -> str:
    """The JSON shape the grader must answer with: the first question's item spelled out (the
    rest follow the same pattern; listing them all would cost tokens on every prompt)."""
    lab, q = question_labels(rubric)[0], rubric.questions[0]
    item = (
        f'{{"question":{json.dumps(lab)},"justification":"<why>","score":<0 to {_fmt_num(q.max_score)}>,'
        f'"max_score":{_fmt_num(q.max_score)}}}'
    )
    more = ",..." if len(rubric.questions) > 1 else ""
    return (
        f'{{"items":[{item}{more}],"score":<sum of item scores>,"max_score":{_fmt_num(rubric.max_score)},'
        f'"feedback":"<feedback to the student>"}}'
    )


Anchors = Sequence[tuple[str, float]]  # (answer, teacher's score) of the one question, least similar first


def instructions(rubric: Rubric, anchors: Anchors = ()) -> str:
    """The grader's instructions: the rubric (labels, questions, max scores, reference answers
    when present) and the exact JSON to answer with. ``anchors`` (a one-question rubric only):
    answers to that question the teacher graded, listed under it (``data.anchors``)."""
    if anchors and len(rubric.questions) != 1:
        raise ValueError("anchors go with a one-question rubric (item-level prompts)")
    lines = [
        "You grade a student's submission against the rubric below. The submission is the user "
        "message, one Markdown section per question.",
    ]
    if rubric.title:
        lines += ["", f"Assignment: {rubric.title}"]
    lines += ["", f"# Rubric ({len(rubric.questions)} questions, {_fmt_num(rubric.max_score)} points in total)"]
    for lab, q in zip(question_labels(rubric), rubric.questions):
        lines += ["", f"## Question {lab} (max {_fmt_num(q.max_score)} points)", q.question.strip()]
        if q.reference_answer and q.reference_answer.strip():
            lines.append(f"Reference answer: {q.reference_answer.strip()}")
        if anchors:
            lines += ["", "Answers to this question that the teacher graded (the most similar to the student's last):"]
            lines += [f"- {_fmt_num(score)} of {_fmt_num(q.max_score)}: {anchor_prompt_text(answer)}"
                      for answer, score in anchors]
    lines += [
        "",
        "# Answer",
        "Reply with one JSON object on one line and nothing else, in exactly this shape:",
        response_example(rubric),
        f"Give one item per question, in rubric order ({', '.join(question_labels(rubric))}), with "
        '"question" set to the question\'s label. '
        "Each score is a number from 0 to that question's max_score; \"score\" is the sum of the "
        'item scores. "justification" is optional.',
    ]
    return "\n".join(lines)


def target_text(grade: Grade, rubric: Rubric | None = None) -> str:
    """The grade as the model must write it: compact one-line JSON, keys in the order
    items -> score -> max_score -> feedback; each item question -> justification? -> score -> max_score.

    With ``rubric``, ``items[].question`` becomes the question's label (matched by label or text,
    else by position); without it the item's ``question`` is written as is.
    """
    labels = question_labels(rubric) if rubric is not None else None
    items: list[dict[str, Any]] = []
    for k, item in enumerate(grade.items):
        question = item.question
        if labels is not None:
            # Same position first (a rubric may repeat a question text), then by label or text.
            same = k < len(labels) and item.question in (rubric.questions[k].question, labels[k])  # type: ignore[union-attr]
            idx = k if same else match_question(item.question, rubric)  # type: ignore[arg-type]
            if idx is None and k < len(labels):
                idx = k
            if idx is not None:
                question = labels[idx]
        obj: dict[str, Any] = {"question": question}
        if item.justification:
            obj["justification"] = item.justification
        obj["score"] = score_number(item.score)
        obj["max_score"] = score_number(item.max_score)
        items.append(obj)
    out = {"items": items, "score": score_number(grade.score), "max_score": score_number(grade.max_score), "feedback": grade.feedback}
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------- format detection


def _token_id(tokenizer: Any, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else None


def _is_harmony_tokenizer(tokenizer: Any) -> bool:
    return (
        _token_id(tokenizer, "<|start|>") == HARMONY_START
        and _token_id(tokenizer, "<|channel|>") == HARMONY_CHANNEL
        and _token_id(tokenizer, "<|message|>") == HARMONY_MESSAGE
    )


def detect_format(tokenizer: Any, model_type: str | None) -> Format:
    """gpt_oss (or an o200k_harmony tokenizer when the model type is unknown) -> harmony;
    a tokenizer with a chat template -> chat_template; else plain."""
    if model_type == "gpt_oss" or (model_type is None and _is_harmony_tokenizer(tokenizer)):
        return "harmony"
    if getattr(tokenizer, "chat_template", None):
        return "chat_template"
    return "plain"


# --------------------------------------------------------------------------- harmony


@functools.lru_cache(maxsize=1)
def harmony_encoding() -> "HarmonyEncoding":
    """openai-harmony's GPT-OSS encoding, loaded offline (see data.tokenizer_offline)."""
    from data.tokenizer_offline import ensure_harmony_env

    ensure_harmony_env()
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def _harmony_conversation(instruction_text: str, submission_md: str, target: str | None = None) -> list[Any]:
    """The harmony conversation: system, developer (instructions), user (submission) and, for
    training, the assistant's final-channel grade. No date in the system message: the prompt
    must not change from one day to the next."""
    from openai_harmony import DeveloperContent, Message, ReasoningEffort, Role, SystemContent

    msgs = [
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort.LOW)),
        Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(instruction_text)),
        Message.from_role_and_content(Role.USER, submission_md),
    ]
    if target is not None:
        msgs.append(Message.from_role_and_content(Role.ASSISTANT, target).with_channel("final"))
    return msgs


def _harmony_prompt(rubric: Rubric, submission_md: str, anchors: Anchors = ()) -> list[int]:
    head, tail = _harmony_frame(instructions(rubric, anchors))
    body = harmony_encoding().encode(submission_md, allowed_special=set(), disallowed_special=())
    return head + list(body) + tail


@functools.lru_cache(maxsize=512)
def _harmony_frame(instruction_text: str) -> tuple[list[int], list[int]]:
    """The prompt's tokens before and after the user message's content, rendered once per
    instructions (a question's copies in a batch share them). The content is encoded between
    special tokens, so head + its tokens + tail is token for token the whole conversation rendered
    (tested), and the grader answers straight in the final channel, without an analysis message."""
    from openai_harmony import Conversation, Role

    ids = list(harmony_encoding().render_conversation_for_completion(
        Conversation.from_messages(_harmony_conversation(instruction_text, "")), Role.ASSISTANT))
    end = len(ids) - 1 - ids[::-1].index(HARMONY_END)  # the empty user message's <|end|>
    return ids[:end], ids[end:] + [HARMONY_CHANNEL] + _final_channel_ids() + [HARMONY_MESSAGE]


@functools.lru_cache(maxsize=1)
def _final_channel_ids() -> list[int]:
    # Encoded once: each encode() with the default disallowed_special="all" compiles a regex of
    # all ~1,100 special tokens (most of the encode time of a question's prompt).
    return harmony_encoding().encode("final", allowed_special=set(), disallowed_special=())


# --------------------------------------------------------------------------- chat template / plain


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ordinary text -> ids; strings that look like special tokens stay plain text."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _encode_template(tokenizer: Any, text: str) -> list[int]:
    """Template text (its control tokens are real special tokens)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_SYS_SLOT = "GRADERSYSTEMSLOT7f3a"
_USER_SLOT = "GRADERUSERSLOT9c1e"


def _render_chat(tokenizer: Any, system: str | None, user: str, assistant: str | None = None) -> str:
    msgs: list[dict[str, str]] = []
    if system is not None:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": user})
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=assistant is None)


@functools.lru_cache(maxsize=16)
def _chat_skeleton(tokenizer: Any) -> tuple[list[tuple[str, str]], bool]:
    """The chat template rendered around two placeholders, split into (kind, text) pieces.

    Rendering once with placeholders and encoding the template's own text apart from the rubric
    and submission lets us encode user text with special tokens split (a student who writes
    ``<end_of_turn>`` cannot end the turn), and makes re-rendering during truncation cheap.
    Templates that refuse a system role get the instructions at the top of the user message.
    """
    try:
        text = _render_chat(tokenizer, _SYS_SLOT, _USER_SLOT)
        has_system = _SYS_SLOT in text
    except Exception:  # e.g. "System role not supported"
        has_system = False
    if not has_system:
        text = _render_chat(tokenizer, None, _SYS_SLOT + "\n\n" + _USER_SLOT)
    pieces: list[tuple[str, str]] = []
    for part in re.split(f"({_SYS_SLOT}|{_USER_SLOT})", text):
        if part == _SYS_SLOT:
            pieces.append(("system", ""))
        elif part == _USER_SLOT:
            pieces.append(("user", ""))
        elif part:
            pieces.append(("template", part))
    if [k for k, _ in pieces if k != "template"] != ["system", "user"]:
        raise ValueError("the tokenizer's chat template did not render the system and user messages once each")
    return pieces, has_system


def _chat_prompt(tokenizer: Any, rubric: Rubric, submission_md: str, anchors: Anchors = ()) -> list[int]:
    pieces, _ = _chat_skeleton(tokenizer)
    ids: list[int] = []
    for kind, text in pieces:
        if kind == "template":
            ids += _encode_template(tokenizer, text)
        elif kind == "system":
            ids += _encode_text(tokenizer, instructions(rubric, anchors))
        else:
            ids += _encode_text(tokenizer, submission_md)
    return ids


def plain_prompt_text(rubric: Rubric, submission_md: str, anchors: Anchors = ()) -> str:
    """The plain template (models without a chat template), as text."""
    return instructions(rubric, anchors) + PLAIN_SUBMISSION_HEADER + submission_md.strip() + PLAIN_ANSWER_HEADER


def _plain_prompt(tokenizer: Any, rubric: Rubric, submission_md: str, anchors: Anchors = ()) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _encode_text(tokenizer, plain_prompt_text(rubric, submission_md, anchors))


@functools.lru_cache(maxsize=16)
def _chat_end_token(tokenizer: Any) -> int | None:
    """The token the chat template puts right after an assistant message (``<|im_end|>``,
    ``<end_of_turn>``, ``<|eot_id|>`` ...): what the model must learn to stop with."""
    try:
        text = _render_chat(tokenizer, None, "Hi", "GRADERANSWERSLOT")
    except Exception:
        return None
    after = text.split("GRADERANSWERSLOT", 1)[-1]
    ids = _encode_template(tokenizer, after)
    special = set(tokenizer.all_special_ids) | {
        tid for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", False)
    }
    for tid in ids:
        if tid in special:
            return tid
        if tokenizer.decode([tid]).strip():
            return None  # real text before any special token: no usable end token
    return None


# --------------------------------------------------------------------------- encode


def stop_token_ids(tokenizer: Any, fmt: Format) -> list[int]:
    """Token ids that end the grader's answer: harmony <|return|>, <|call|>, <|end|>; other
    formats the end-of-turn token of the chat template and the tokenizer's EOS."""
    if fmt == "harmony":
        return [HARMONY_RETURN, HARMONY_CALL, HARMONY_END]
    out: list[int] = []
    if fmt == "chat_template":
        end = _chat_end_token(tokenizer)
        if end is not None:
            out.append(end)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
    return out


def end_token_id(tokenizer: Any, fmt: Format) -> int:
    """The single token a training example ends with (the first stop token)."""
    ids = stop_token_ids(tokenizer, fmt)
    if not ids:
        raise ValueError("the tokenizer has no EOS token: set tokenizer.eos_token so the model can learn to stop")
    return ids[0]


def _check_format(tokenizer: Any, fmt: Format) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "harmony" and not _is_harmony_tokenizer(tokenizer):
        raise ValueError("the harmony format needs the GPT-OSS (o200k_harmony) tokenizer")
    if fmt == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("format chat_template: this tokenizer has no chat template; use plain")


def _render_prompt(tokenizer: Any, fmt: Format, rubric: Rubric, submission_md: str, anchors: Anchors = ()) -> list[int]:
    if fmt == "harmony":
        return _harmony_prompt(rubric, submission_md, anchors)
    if fmt == "chat_template":
        return _chat_prompt(tokenizer, rubric, submission_md, anchors)
    return _plain_prompt(tokenizer, rubric, submission_md, anchors)


def _cut_submission(submission_md: str, keep_chars: int) -> str:
    return submission_md[:keep_chars].rstrip() + TRUNCATION_MARK


def encode_prompt_checked(
    tokenizer: Any, fmt: Format, rubric: Rubric, submission_md: str, max_prompt_tokens: int | None = None,
    anchors: Anchors = (),
) -> tuple[list[int], bool]:
    """:func:`encode_prompt` that also says whether the submission was cut.

    Over-long prompts keep the longest head of the submission (found by binary search on
    characters, each candidate re-rendered) that fits, ending with ``[...]``. The rubric is
    never cut: when even an empty submission does not fit, PromptTooLongError.
    """
    _check_format(tokenizer, fmt)
    ids = _render_prompt(tokenizer, fmt, rubric, submission_md, anchors)
    if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
        return ids, False
    shortest = _render_prompt(tokenizer, fmt, rubric, _cut_submission(submission_md, 0), anchors)
    if len(shortest) > max_prompt_tokens:
        raise PromptTooLongError(
            f"the instructions alone take {len(shortest)} tokens, more than the {max_prompt_tokens} allowed "
            "for the prompt; raise max_length (or shorten the rubric's reference answers)"
        )
    lo, hi, best = 0, len(submission_md) - 1, shortest  # lo chars always fit; hi+1 never checked yet
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cand = _render_prompt(tokenizer, fmt, rubric, _cut_submission(submission_md, mid), anchors)
        if len(cand) <= max_prompt_tokens:
            lo, best = mid, cand
        else:
            hi = mid - 1
    return best, True


def encode_prompt(
    tokenizer: Any, fmt: Format, rubric: Rubric, submission_md: str, max_prompt_tokens: int | None = None
) -> list[int]:
    """The prompt tokens, ending exactly where the grade JSON begins (harmony:
    ``...<|start|>assistant<|channel|>final<|message|>``). Inference uses this; training uses
    :func:`encode_example`, whose ``input_ids`` start with the same tokens."""
    return encode_prompt_checked(tokenizer, fmt, rubric, submission_md, max_prompt_tokens)[0]


def encode_target(tokenizer: Any, fmt: Format, target: str) -> list[int]:
    """The grade's tokens followed by the end token (harmony ``<|return|>``)."""
    if fmt == "harmony":
        body = harmony_encoding().encode(target, allowed_special=set(), disallowed_special=())
    else:
        body = _encode_text(tokenizer, target)
    return list(body) + [end_token_id(tokenizer, fmt)]


def preview(tokenizer: Any, fmt: Format, rubric: Rubric, submission_md: str, grade: Grade | None = None) -> str:
    """The prompt (and, with ``grade``, the target and end token) exactly as the model sees it,
    decoded with special tokens shown: for a "show the prompt" view and for debugging."""
    ids = encode_prompt(tokenizer, fmt, rubric, submission_md)
    if grade is not None:
        ids = ids + encode_target(tokenizer, fmt, target_text(grade, rubric))
    if fmt == "harmony":
        return harmony_encoding().decode(ids)
    return tokenizer.decode(ids, skip_special_tokens=False)


@dataclass
class EncodedExample:
    """One training example. ``labels`` is ``IGNORE_INDEX`` on the prompt, so the loss covers
    only the grade and its end token."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool


def encode_example(
    tokenizer: Any, fmt: Format, rubric: Rubric, submission_md: str, grade: Grade, max_length: int
) -> EncodedExample:
    """prompt + grade + end token, at most ``max_length`` tokens. Over-long: the submission is
    cut (never the grade), ``truncated`` is True. PromptTooLongError when the grade and the
    instructions alone do not fit."""
    target = encode_target(tokenizer, fmt, target_text(grade, rubric))
    budget = max_length - len(target)
    if budget <= 0:
        raise PromptTooLongError(f"the grade alone takes {len(target)} tokens; max_length {max_length} is too small")
    prompt, truncated = encode_prompt_checked(tokenizer, fmt, rubric, submission_md, budget)
    return EncodedExample(
        input_ids=prompt + target,
        labels=[IGNORE_INDEX] * len(prompt) + target,
        prompt_len=len(prompt),
        truncated=truncated,
    )


def build_training_examples(
    submissions: list[GradedSubmission], tokenizer: Any, fmt: Format, max_length: int
) -> tuple[list[EncodedExample], int]:
    """Every graded submission as a training example: (examples, number whose submission was cut).

    Each submission's answers are rendered to the Markdown a student would hand in
    (``data.markdown.render_submission_markdown``), graded against ``sub.rubric()`` with
    ``sub.grade()`` as the target. A submission whose instructions + grade alone exceed
    ``max_length`` cannot be used without cutting the rubric or the grade: it is skipped with a
    logged warning (so ``len(submissions) - len(examples)`` were too long to use); if that
    leaves nothing, PromptTooLongError.
    """
    from data.markdown import render_submission_markdown

    examples: list[EncodedExample] = []
    n_cut = n_dropped = 0
    for k, sub in enumerate(submissions):
        try:
            ex = encode_example(tokenizer, fmt, sub.rubric(), render_submission_markdown(sub), sub.grade(), max_length)
        except PromptTooLongError as e:
            n_dropped += 1
            log.warning("skipped submission %s: %s", sub.submission_id or f"#{k}", e)
            continue
        examples.append(ex)
        n_cut += ex.truncated
    if n_dropped and not examples:
        raise PromptTooLongError(
            f"all {n_dropped} submissions need more than max_length={max_length} tokens for the "
            "instructions and grade alone; raise max_length"
        )
    return examples, n_cut


# --------------------------------------------------------------------------- one question at a time
#
# Item-level grading: each rubric question is its own example, a one-question rubric (the
# question, its reference answer, its maximum, its label kept) and the student's answer to it as a
# one-section submission. The model reads up to the item's score in the grade JSON as training
# writes it (``{"items":[{"question":"<label>","score":``) and its next token is the score: the
# grade is the expected value of its distribution over the whole numbers 0..max. No generation,
# so every item grade is valid by construction, and a submission's grade is assembled from its
# questions (total = sum). Training fits that distribution to the humans' scores (soft when
# several graders scored the item).


@dataclass
class ScoreExample:
    """One question of one submission, encoded to the score position.

    ``input_ids`` end where the score's token comes next; ``value_ids[v]`` is the token of the
    score ``v`` (0..max). ``target`` (training only) is the human distribution over those values.
    ``value_ids`` is None when the values are not single tokens (a maximum of 10 with a tokenizer
    that splits digits): such a question is scored from the written number instead.
    """

    input_ids: list[int]
    value_ids: list[int] | None
    max_score: float
    target: list[float] | None = None
    human_score: float | None = None
    truncated: bool = False
    n_anchors: int = 0  # teacher-graded answers of the question in the prompt (data.anchors)
    neighbour_score: float | None = None  # the score those anchors suggest (data.anchors.neighbour_score)
    nearest_similarity: float | None = None  # the most similar anchor's similarity (0..1)
    question: str | None = None  # which question it is (data.anchors.question_key), for held-out checks


def question_rubric(rubric: Rubric, k: int) -> Rubric:
    """Question ``k`` alone as a rubric, keeping its label (so the prompt names it as before)."""
    q = rubric.questions[k]
    return Rubric(title=rubric.title, questions=[q.model_copy(update={"question_id": question_labels(rubric)[k]})])


def score_prefix_text(label: str) -> str:
    """The grade JSON as training writes it for one item, up to that item's score."""
    text = target_text(Grade(score=0, max_score=1, items=[GradeItem(question=label, score=0, max_score=1)]))
    return text[: text.index('"score":') + len('"score":')]


def encode_answer_text(tokenizer: Any, fmt: Format, text: str) -> list[int]:
    """Grade text as the answer side encodes it (harmony: o200k without special tokens)."""
    if fmt == "harmony":
        return list(harmony_encoding().encode(text, allowed_special=set(), disallowed_special=()))
    return _encode_text(tokenizer, text)


@functools.lru_cache(maxsize=64)
def _value_ids(tokenizer: Any, fmt: Format, max_score: float) -> tuple[int, ...] | None:
    if max_score != int(max_score) or not 1 <= max_score <= 100:
        return None
    encs = [encode_answer_text(tokenizer, fmt, str(v)) for v in range(int(max_score) + 1)]
    if any(len(e) != 1 for e in encs) or len({e[0] for e in encs}) != len(encs):
        return None
    return tuple(e[0] for e in encs)


def score_value_ids(tokenizer: Any, fmt: Format, max_score: float) -> list[int] | None:
    """Token of each whole score 0..max_score, or None when some value is not a single token."""
    ids = _value_ids(tokenizer, fmt, float(max_score))
    return None if ids is None else list(ids)


def soft_score_target(scores: list[float], max_score: float) -> list[float]:
    """The human distribution over 0..max: each grader's score split linearly between its two
    neighbouring whole numbers (3.5 -> half on 3, half on 4), graders weighted equally. Its mean
    is the graders' mean score."""
    n = int(max_score)
    q = [0.0] * (n + 1)
    for s in scores:
        s = min(max(float(s), 0.0), float(n))
        lo = int(s)
        frac = s - lo
        q[lo] += (1 - frac) / len(scores)
        if frac > 1e-9:
            q[lo + 1] += frac / len(scores)
    return q


def encode_score_prompt(
    tokenizer: Any, fmt: Format, rubric: Rubric, k: int, answer: str, max_prompt_tokens: int | None = None,
    anchors: Anchors = (),
) -> ScoreExample:
    """Question ``k`` of ``rubric`` with the student's ``answer``: the prompt plus the grade JSON
    up to the score (see the section comment). ``anchors``: teacher-graded answers of the question
    shown with it, least similar first; when the prompt is too long they give way (least similar
    first) before the student's answer is cut. Over-long answers are cut like submissions."""
    from data.markdown import render_question_markdown

    one = question_rubric(rubric, k)
    q, label = one.questions[0], one.questions[0].question_id or "1"
    prefix = encode_answer_text(tokenizer, fmt, score_prefix_text(label))
    budget = None if max_prompt_tokens is None else max_prompt_tokens - len(prefix)
    if budget is not None and budget <= 0:
        raise PromptTooLongError(f"max_length {max_prompt_tokens} leaves no room for the question's prompt")
    md = render_question_markdown(label, q.question, answer)
    anchors = list(anchors)
    while True:
        try:
            prompt, truncated = encode_prompt_checked(tokenizer, fmt, one, md, budget, anchors)
        except PromptTooLongError:
            if not anchors:
                raise
            anchors = anchors[1:]
            continue
        if not (truncated and anchors):
            break
        anchors = anchors[1:]
    return ScoreExample(input_ids=prompt + prefix, value_ids=score_value_ids(tokenizer, fmt, q.max_score),
                        max_score=q.max_score, truncated=truncated, n_anchors=len(anchors))


def build_score_examples(
    submissions: list[GradedSubmission], tokenizer: Any, fmt: Format, max_length: int, *,
    anchors: int = 0, seed: int = 0,
) -> tuple[list[ScoreExample], int]:
    """Every scored question of every graded submission as a training example (item-level):
    (examples, number whose answer was cut). The target is the human distribution over 0..max,
    from the item's ``grader_scores`` when it has them, else its ``score``. Questions whose values
    are not single tokens, or whose prompt cannot fit, are left out (logged).

    ``anchors`` > 0: each prompt shows up to that many other answers of the same question with
    their human scores, as grading with teacher anchors does (``data.anchors.training_anchors``
    draws them, seeded by ``seed``), so the model learns to use them; some prompts get none, so
    it still grades questions nobody has anchored."""
    from data.anchors import neighbour_score, question_key, training_anchors

    flat = [(sub, k, item) for sub in submissions for k, item in enumerate(sub.rubric_alignment)]
    keys = [question_key(item.question, sub.item_max_scores()[k]) for sub, k, item in flat]
    shown: list[list[tuple[str, float]]] = [[] for _ in flat]
    suggested: list[float | None] = [None] * len(flat)
    nearest: list[float | None] = [None] * len(flat)
    if anchors > 0:
        groups: dict[str, list[int]] = {}
        for n, (_, _, item) in enumerate(flat):
            if item.answer.strip():
                groups.setdefault(keys[n], []).append(n)
        picks = training_anchors([[flat[n][2].answer for n in members] for members in groups.values()], anchors, seed)
        for members, chosen in zip(groups.values(), picks):
            for n, pairs in zip(members, chosen):
                shown[n] = [(flat[members[j]][2].answer, flat[members[j]][2].score) for j, _ in pairs]
                suggested[n] = neighbour_score([score for _, score in shown[n]], [sim for _, sim in pairs])
                nearest[n] = max((sim for _, sim in pairs), default=None)
    examples: list[ScoreExample] = []
    n_cut = n_dropped = 0
    rubrics: dict[int, Rubric] = {}
    for n, (sub, k, item) in enumerate(flat):
        rubric = rubrics.setdefault(id(sub), sub.rubric())
        try:
            ex = encode_score_prompt(tokenizer, fmt, rubric, k, item.answer, max_length - 1, shown[n])
        except PromptTooLongError as e:
            n_dropped += 1
            log.warning("skipped question %s of %s: %s", k + 1, sub.submission_id or "a submission", e)
            continue
        if ex.value_ids is None:
            n_dropped += 1
            continue
        graders = item.grader_scores or [item.score]
        ex.target = soft_score_target(graders, ex.max_score)
        ex.human_score = float(item.score)
        ex.neighbour_score = suggested[n]
        ex.nearest_similarity = nearest[n]
        ex.question = keys[n]
        examples.append(ex)
        n_cut += ex.truncated
    if n_dropped:
        log.warning("%d questions left out of item-level training (prompt too long, or scores that "
                    "are not single tokens for this tokenizer)", n_dropped)
    return examples, n_cut

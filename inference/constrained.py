"""Constrained decoding of whole grades: the model can only write a grade the rubric accepts.

:func:`grade_json_schema` turns a rubric into the JSON schema of its grade as training writes it
(``data.prompt_format.target_text``): the fields in training order (items -> score -> max_score
-> feedback; each item question -> justification? -> score -> max_score), the exact question
labels, each score a number within [0, max] (at most 6 decimals), the maxima fixed, strings
bounded. The same schema is what a server such as vLLM takes for guided decoding
(``guided_json`` / ``response_format``), so a grade served there has the same shape.

:func:`decode_grades` decodes a batch of grades under it with xgrammar (the structured-generation
library vLLM and SGLang use), one grammar matcher per row, greedily with the model's KV cache,
plus what a static schema cannot say:

- the total is the sum of the item scores: once the items are closed, ``,"score":<sum>,
  "max_score":<max>,"feedback":"`` is forced;
- the answer fits its token budget: when only the tokens that the rest of the grade may need
  are left, an open string is closed at once, so a grade always ends complete. The budget is
  ``max_new_tokens``, raised where needed to :func:`reserve_chars` (a grade of the rubric with
  empty strings: no valid grade is shorter, and none fits in less);
- the strings' character bounds: the compiled grammar's strings are unbounded and the decoder
  keeps each within its bound (tokens longer than the room left are masked; at the bound the
  string is closed). Written into the grammar as ``{0,400}`` the bound made every bitmask inside a
  justification cost ~80 ms instead of ~0.06 ms (xgrammar 0.2.9, GPT-OSS vocabulary, this CPU):
  seconds per step for a batch of 64.

The tokenizer's special and added tokens (GPT-OSS's ``<|reserved_...|>``, chat-template
markers) are plain text to xgrammar, so its strings would take them; the decoder forbids them
everywhere in the grade (:meth:`GradeGrammars.forbidden_ids`), the stop tokens aside.

Forced spans are not sampled token by token (jump-forward decoding). The forced opening
(``{"items":[{"question":"<label>","``) joins the prompt (:func:`forced_opening`). After every
token the model chooses, the matcher's forced continuation (``find_jump_forward_string``: e.g.
``max_score":5},{"question":"2","`` once an item's score is followed by a comma) and the row's
forced total are encoded as training encodes answers and go into the model in the same forward
step as the chosen token: one step for the whole span. Rows of a batch then feed chunks of
different widths; each is left-padded inside its step (attention mask 0), the mask keeps growing
with the cache and positions come from it (``cumsum(mask) - 1``), so every real token has its
exact position. The cache then has holes (the pads). transformers' sliding-window layers (Gemma 3,
GPT-OSS) cover a window of cache slots, not of positions, and their cache keeps only the last
slots: with a window of 16 and 5 pads inside it a next-token logit moved by 0.3 (tiny GPT-OSS),
and batched grades differed from the same grades alone. For models with sliding layers the
decoder therefore keeps every layer's whole cache and gives the model its own masks: causal over
real tokens, and for sliding layers the window taken over positions (:func:`_step_masks`), so a
row sees what it would alone. Those are dense additive masks, which eager and sdpa attention
take; flex attention wants a BlockMask instead.

Given ``value_ids``, the decoder also reads each item's score distribution from the logits it
computes anyway: at the step whose logits predict the first token of an item's score (the text
ends with ``"score":`` inside the items; the total is forced), the softmax (float32) of the raw
logits, before any masking, at the value tokens 0..max of that item
(:attr:`DecodedGrade.score_probs`). Expected scores then need no second pass over the prompt.
"""
from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from data.prompt_format import question_labels, score_number

if TYPE_CHECKING:
    from data.rubric import Rubric

# Upper bounds for the free text, in characters (the token budget may close them sooner).
JUSTIFICATION_MAX_CHARS = 400
FEEDBACK_MAX_CHARS = 800
# Room for any number of a grade: the schema's scores are at most "0." and 6 decimals (8
# characters); the forced total, a sum, may have more digits before the point.
_MAX_NUMBER_CHARS = 12


def _text(max_chars: int | None) -> dict[str, Any]:
    """A JSON string of at most ``max_chars`` characters (None: unbounded), without escapes or
    control characters (a raw tab or newline inside a string is not JSON)."""
    bound = "*" if max_chars is None else "{0,%d}" % max_chars
    return {"type": "string", "pattern": r'^[^"\\\u0000-\u001f]%s$' % bound}


def grade_json_schema(rubric: "Rubric", *, justification_chars: int | None = JUSTIFICATION_MAX_CHARS,
                      feedback_chars: int | None = FEEDBACK_MAX_CHARS) -> dict[str, Any]:
    """The JSON schema of a grade of ``rubric``, as training writes it (see the module docstring).
    Justifications are optional, as in training data without them. A bound of None leaves that
    string unbounded (what :class:`GradeGrammars` compiles: :func:`decode_grades` keeps the
    bounds itself)."""

    def item(label: str, max_score: float) -> dict[str, Any]:
        return {"type": "object",
                "properties": {"question": {"const": label},
                               "justification": _text(justification_chars),
                               "score": {"type": "number", "minimum": 0, "maximum": score_number(max_score)},
                               "max_score": {"const": score_number(max_score)}},
                "required": ["question", "score", "max_score"], "additionalProperties": False}

    items = [item(lab, q.max_score) for lab, q in zip(question_labels(rubric), rubric.questions)]
    return {"type": "object",
            "properties": {"items": {"type": "array", "prefixItems": items, "items": False,
                                     "minItems": len(items), "maxItems": len(items)},
                           "score": {"type": "number", "minimum": 0, "maximum": score_number(rubric.max_score)},
                           "max_score": {"const": score_number(rubric.max_score)},
                           "feedback": _text(feedback_chars)},
            "required": ["items", "score", "max_score", "feedback"], "additionalProperties": False}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def reserve_chars(rubric: "Rubric") -> int:
    """An upper bound, in characters, on a grade of ``rubric`` with every string empty and every
    number as long as allowed: what must stay in the token budget once a string is closed (a
    token is at least one character)."""
    items = [{"question": lab, "justification": "", "score": 0, "max_score": score_number(q.max_score)}
             for lab, q in zip(question_labels(rubric), rubric.questions)]
    text = _dumps({"items": items, "score": 0, "max_score": score_number(rubric.max_score), "feedback": ""})
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
        self.stop_ids = list(stop_ids)
        self._compiled = functools.lru_cache(maxsize=64)(self._compile)
        self._forbidden: torch.Tensor | None = None

    def _compile(self, schema_json: str):
        return self.compiler.compile_json_schema(schema_json, any_whitespace=False, separators=(",", ":"),
                                                 strict_mode=True)

    def compiled(self, rubric: "Rubric"):
        """The grammar of ``rubric``'s grade with unbounded strings (see the module docstring)."""
        return self._compiled(_dumps(grade_json_schema(rubric, justification_chars=None, feedback_chars=None)))

    def forbidden_ids(self, encode: Callable[[str], list[int]]) -> torch.Tensor:
        """The tokens no grade may hold: the tokenizer's special tokens (``all_special_ids``) and
        its added tokens that the answer encoding (``encode``) never writes for their own text
        (special ones such as GPT-OSS's ``<|reserved_200204|>``), less the stop tokens (the
        grammar allows those only where the grade may end). To xgrammar they are plain text, so
        inside a string the grammar alone lets them in; training never put them in an answer
        (special-token look-alikes are encoded as text). Non-special added tokens that the
        answer encoding writes (e.g. a tokenizer's whitespace runs) stay allowed."""
        if self._forbidden is None:
            tok = self.tokenizer
            ids = {int(i) for i in (getattr(tok, "all_special_ids", None) or [])}
            for i, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
                if getattr(added, "special", True) or list(encode(str(getattr(added, "content", added)))) != [int(i)]:
                    ids.add(int(i))
            ids -= set(self.stop_ids)
            self._forbidden = torch.tensor(sorted(i for i in ids if 0 <= i < self.vocab_size), dtype=torch.long)
        return self._forbidden

    @functools.cached_property
    def vocab_bytes(self) -> list[bytes]:
        """Each token's bytes (a byte-level token may hold part of a UTF-8 character)."""
        return list(self.info.decoded_vocab)

    @functools.cached_property
    def token_bytes(self) -> torch.Tensor:
        """Each token's length in bytes (at least the characters it adds to a text)."""
        return torch.tensor([len(b) for b in self.vocab_bytes] + [0] * (self.vocab_size - len(self.vocab_bytes)))


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
    ids = _within(list(encode(target_text(zero_grade(rubric), rubric))), matcher.find_jump_forward_string(), decode)
    for t in ids:
        if not matcher.accept_token(t):
            return []
    return ids


# Continuations a forced span may be followed by in a grade (a key or text, a digit, a space...):
# its last token counts as forced only if the encoder keeps it whatever follows (a tokenizer may
# merge the span's end with the next characters, as training's encoding of the whole grade does).
_PROBES = ("a", "A", "0", " ", ".", "-")


def _within(tokens: list[int], forced: str, decode) -> list[int]:
    """The leading ``tokens`` whose decoded text stays a prefix of ``forced``."""
    out: list[int] = []
    text = ""
    for t in tokens:
        piece = decode([t])
        if not piece or not forced.startswith(text + piece):
            break
        out.append(t)
        text += piece
    return out


def forced_tokens(forced: str, encode, decode) -> list[int]:
    """``forced`` (a span the grammar allows no alternative to) as training tokenizes it in a
    grade: its tokens under ``encode`` (the prompt format's answer encoding) up to the last one
    that stays the same whatever text follows (see ``_PROBES``)."""
    if not forced:
        return []
    common: list[int] | None = None
    for probe in _PROBES:
        ids = _within(list(encode(forced + probe)), forced, decode)
        if common is None:
            common = ids
        else:
            n = next((k for k, (a, b) in enumerate(zip(common, ids)) if a != b), min(len(common), len(ids)))
            common = common[:n]
        if not common:
            break
    return common or []


@dataclass
class DecodedGrade:
    """One row's answer: its tokens (the forced opening first, no stop token) and how many model
    forward passes chose them (the prefill included). ``steps < len(tokens)``: the rest were
    forced spans written without a step of their own."""

    tokens: list[int]
    steps: int
    # per item: {score value: probability} read at its score position (raw logits, softmax over
    # the values 0..max), None where not read (values not single tokens, the chosen first token
    # not a value token); None for the whole row when the grammar refused a token or no
    # ``value_ids`` was given
    score_probs: list[dict[int, float] | None] | None = None


class _Row:
    """One grade being decoded: its grammar matcher, its text so far, its budget and forced total."""

    def __init__(self, grammars: GradeGrammars, rubric: "Rubric", opening: list[int], budget: int,
                 encode, decode, quote: int | None) -> None:
        import xgrammar as xgr

        self.rubric, self.encode, self.decode, self.quote = rubric, encode, decode, quote
        self.matcher = xgr.GrammarMatcher(grammars.compiled(rubric))
        for t in opening:
            self.matcher.accept_token(t)
        self.tokens = list(opening)
        self.text = decode(opening)
        self.vocab_bytes = grammars.vocab_bytes
        self.data = b"".join(self._bytes(t) for t in opening)  # the text as bytes (characters may be split in text)
        self.budget = budget  # tokens it may still write (the opening is part of the prompt)
        self.reserve = reserve_chars(rubric)
        self.total: tuple[int, str] | None = None  # (where the items close, the forced text after them)
        self.total_done = False
        self.bracket = False  # a "]" written since the items were last looked at
        self.broken = False  # a token the grammar refused: the row writes freely, repair sees it
        self.done = False
        self.steps = 0
        self.score_probs: list[dict[int, float] | None] = [None] * len(rubric.questions)

    def _bytes(self, token: int) -> bytes:
        return self.vocab_bytes[token] if token < len(self.vocab_bytes) else b""

    def _write(self, token: int) -> None:
        piece = self.decode([token])
        self.tokens.append(token)
        self.text += piece
        self.data += self._bytes(token)
        self.bracket = self.bracket or "]" in piece
        self.budget -= 1

    def _total_rest(self) -> str:
        """What is still to write of the forced total (the items' sum, the maximum and the
        feedback's opening), "" before the items are closed or once it is written."""
        if not self.total_done:
            end = _items_end(self.text) if self.bracket else None  # (a scan of the whole text)
            self.bracket = False
            if end is None:
                return ""
            self.total_done = True
            try:
                items = json.loads(self.text[: end + 1] + "}")["items"]
                total = sum(float(it["score"]) for it in items)
            except (ValueError, KeyError, TypeError):
                return ""  # the grammar kept it well formed; if not, repair sees it
            rest = f',"score":{_dumps(score_number(total))},"max_score":{_dumps(score_number(self.rubric.max_score))},"feedback":"'
            self.total = (end, rest)
        if self.total is None:
            return ""
        end, rest = self.total
        written = self.text[end + 1 :]
        return rest[len(written):] if rest.startswith(written) else ""

    def room(self) -> int | None:
        """Characters the open string may still take (None outside strings): its bound less what
        it holds (a character still missing bytes counts as one); 0 once only the reserve is left
        of the budget."""
        if not _in_string(self.text):
            return None
        start = self.data.rfind(b'"') + 1  # (no byte of a multi-byte UTF-8 character is a quote)
        bound = FEEDBACK_MAX_CHARS if self.data.endswith(b'"feedback":"', 0, start) else JUSTIFICATION_MAX_CHARS
        chars, _ = _utf8_chars(self.data[start:])
        return 0 if self.budget <= self.reserve else bound - chars

    def score_item(self) -> int | None:
        """The item whose score the next token starts (the text ends with an item's
        ``"score":``; strings hold no quotes, so each such key is one), None elsewhere."""
        if self.done or self.broken or not self.text.endswith('"score":'):
            return None
        i = self.text.count('"score":') - 1
        return i if i < len(self.rubric.questions) else None  # (the items' total comes after them)

    def pending(self) -> int:
        """Continuation bytes the text's last character still needs (a byte-level token can end
        inside a character; the grammar then allows nothing else, not even a closing quote)."""
        return _utf8_chars(self.data[-4:])[1]

    def only(self) -> int | None:
        """The one token this row must write next, where the grammar alone would allow more: the
        forced total's next token, or a closing quote once the open string has no room left."""
        if self.broken:
            return None
        rest = self._total_rest()
        if rest:
            ids = list(self.encode(rest))
            return ids[0] if ids else None
        room = self.room()
        if self.quote is not None and room is not None and room <= 0 and not self.pending():
            return self.quote
        return None

    def take(self, token: int, stop_ids: set[int]) -> list[int]:
        """Write the token the model chose, then every forced token after it (jump-forward); the
        tokens to feed the model next (none once the row is done)."""
        self.steps += 1
        if token in stop_ids:
            self.done = True
            return []
        self._write(token)
        if not self.broken and not self.matcher.accept_token(token):
            self.broken = True
        chunk = [token]
        while not self.broken and self.budget > 0 and not self.matcher.is_completed():
            jump = self.matcher.find_jump_forward_string()
            rest = self._total_rest()
            forced = rest if rest.startswith(jump) else jump  # the total goes on where the grammar stops
            ids = forced_tokens(forced, self.encode, self.decode)[: self.budget]
            accepted = 0
            for t in ids:
                if not self.matcher.accept_token(t):
                    break
                self._write(t)
                accepted += 1
            chunk += ids[:accepted]
            if accepted == 0:
                break
        # Complete: the stop token is all the grammar allows next, so no step is spent on it.
        self.done = self.budget <= 0 or (not self.broken and self.matcher.is_completed())
        return [] if self.done else chunk


def _sliding_window(config) -> int | None:
    """The window of the model's sliding-window layers, None when it has none."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def _step_masks(mask: torch.Tensor, width: int, window: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Additive attention masks (0 or the dtype's minimum; batch x 1 x width x slots) for the
    last ``width`` slots of ``mask`` (batch x slots, 1 for real tokens): "full_attention" lets a
    token see the real tokens up to itself; "sliding_attention" only those whose position is less
    than ``window`` before its own (positions count real tokens, so pads in between take no room)."""
    slots = mask.shape[1]
    real = mask.bool()
    pos = mask.cumsum(-1) - 1
    q_slot = torch.arange(slots - width, slots, device=mask.device)
    k_slot = torch.arange(slots, device=mask.device)
    seen = (k_slot[None, :] <= q_slot[:, None])[None] & real[:, None, :]  # batch x width x slots
    near = (pos[:, -width:, None] - pos[:, None, :]) < window
    low = torch.finfo(dtype).min
    full = torch.zeros(seen.shape, dtype=dtype, device=mask.device).masked_fill_(~seen, low)
    sliding = torch.zeros(seen.shape, dtype=dtype, device=mask.device).masked_fill_(~(seen & near), low)
    return {"full_attention": full[:, None], "sliding_attention": sliding[:, None]}


def _cache_kwarg(model) -> str:
    """The name the model's forward takes its KV cache by: ``cache`` in newer transformers
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    from scoring.head import base_causal_lm

    params = inspect.signature(type(base_causal_lm(model)).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def decode_grades(model, prompts: list[list[int]], rubrics: list["Rubric"], *, grammars: GradeGrammars,
                  encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], max_new_tokens: int,
                  stop_ids: list[int], pad_id: int, streamer=None,
                  value_ids: Callable[[float], dict[int, int] | None] | None = None) -> list[DecodedGrade]:
    """Greedy decoding of one grade per prompt, each under its rubric's grammar, with jump-forward
    over forced spans (see the module docstring). Each row's budget after its forced opening is
    ``max_new_tokens``, raised to its own rubric's :func:`reserve_chars` where that is more (so a
    row's grade does not depend on the rubrics beside it). ``streamer`` (transformers'
    put/end protocol, as ``generate`` drives it): ``put`` gets the first row's prompt, then after
    each step that row's new tokens (its forced opening with the first ones), then ``end``.
    ``value_ids`` (a max score -> {token id: value} for the values 0..max, None when some value
    is not one token): read each item's score distribution as it is decoded (see the module
    docstring)."""
    stops = set(stop_ids)
    quote = list(encode('"'))
    rows = [_Row(grammars, rubric, forced_opening(grammars, rubric, encode, decode),
                 max(max_new_tokens, reserve_chars(rubric)), encode, decode, quote[0] if len(quote) == 1 else None)
            for rubric in rubrics]
    feed = _Feed(model, len(rows), pad_id)
    masker = _GrammarMasker(grammars, encode, len(rows), feed.device)
    values_of: dict[float, dict[int, int] | None] = {}
    if streamer is not None:
        streamer.put(torch.tensor(prompts[0]))
    chunks = [p + r.tokens for p, r in zip(prompts, rows)]  # the prefill: prompts and openings
    first = True
    while True:
        logits = feed(chunks)
        reading = {} if value_ids is None else _score_readings(rows, logits, value_ids, values_of)
        chosen = masker.choose(rows, logits)
        for k, (i, values, probs) in reading.items():  # kept where the score starts with a value token
            if chosen[k] in values:
                rows[k].score_probs[i] = {v: float(p) for v, p in zip(values.values(), probs.tolist())}
        chunks = []
        for k, row in enumerate(rows):
            before = len(row.tokens)
            chunks.append([] if row.done else row.take(int(chosen[k]), stops))
            if k == 0 and streamer is not None:
                streamer.put(torch.tensor(row.tokens[0 if first else before:], dtype=torch.long))
        first = False
        if all(row.done for row in rows):
            break
    if streamer is not None:
        streamer.end()
    return [DecodedGrade(tokens=row.tokens, steps=row.steps,
                         score_probs=None if value_ids is None or row.broken else row.score_probs) for row in rows]


class _Feed:
    """One forward step of the batch with its KV cache: new tokens of each row (any number,
    left-padded to the longest), their positions counted in real tokens, and the attention mask
    (with sliding-window layers, explicit masks: every layer keeps its whole cache). Returns the
    last position's logits (fp32)."""

    def __init__(self, model, batch: int, pad_id: int) -> None:
        from transformers import DynamicCache

        from scoring.head import base_causal_lm

        self.model, self.batch, self.pad_id = model, batch, pad_id
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        config = base_causal_lm(model).config
        self.window = _sliding_window(config.get_text_config() if hasattr(config, "get_text_config") else config)
        self.cache = DynamicCache() if self.window is not None else DynamicCache(config=config)
        self.cache_kw = _cache_kwarg(model)
        self.mask = torch.zeros((batch, 0), dtype=torch.long, device=self.device)

    def __call__(self, chunks: list[list[int]]) -> torch.Tensor:
        width = max(len(c) for c in chunks)
        ids = torch.full((self.batch, width), self.pad_id, dtype=torch.long)
        step_mask = torch.zeros((self.batch, width), dtype=torch.long)
        for k, c in enumerate(chunks):
            if c:
                ids[k, width - len(c):] = torch.tensor(c, dtype=torch.long)
                step_mask[k, width - len(c):] = 1
        self.mask = mask = torch.cat([self.mask, step_mask.to(self.device)], dim=1)
        positions = (mask.cumsum(-1) - 1)[:, -width:].masked_fill(mask[:, -width:] == 0, 1)
        attention = mask if self.window is None else _step_masks(mask, width, self.window, self.dtype)
        out = self.model(input_ids=ids.to(self.device), attention_mask=attention, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        return out.logits[:, -1, :].float()


def _score_readings(rows: list["_Row"], logits: torch.Tensor, value_ids: Callable[[float], dict[int, int] | None],
                    values_of: dict[float, dict[int, int] | None]) -> dict[int, tuple[int, dict[int, int], torch.Tensor]]:
    """For each row at an item's score: (item index, {token id: value}, the distribution over the
    values from the raw logits). ``values_of`` caches ``value_ids`` by maximum."""
    reading = {}
    for k, row in enumerate(rows):
        i = row.score_item()
        if i is None:
            continue
        max_score = float(row.rubric.questions[i].max_score)
        if max_score not in values_of:
            values_of[max_score] = value_ids(max_score)
        values = values_of[max_score]
        if values:
            reading[k] = (i, values, torch.softmax(logits[k, list(values)], dim=-1))
    return reading


class _GrammarMasker:
    """Each live row's next token under its grammar: the grammar's token mask, no special tokens,
    no token longer than the room left in a bounded string, and a forced token where only one
    can come (jump-forward). Finished and broken rows stay free."""

    def __init__(self, grammars: GradeGrammars, encode: Callable[[str], list[int]], batch: int,
                 device: torch.device) -> None:
        import xgrammar

        self.xgr, self.grammars, self.device = xgrammar, grammars, device
        self.bitmask = xgrammar.allocate_token_bitmask(batch, grammars.vocab_size)
        self.token_bytes = grammars.token_bytes.to(device)
        self.forbidden = grammars.forbidden_ids(encode).to(device)
        self.longest = int(grammars.token_bytes.max())

    def choose(self, rows: list["_Row"], logits: torch.Tensor) -> list[int]:
        xgr = self.xgr
        xgr.reset_token_bitmask(self.bitmask)
        only: dict[int, int] = {}
        short: dict[int, int] = {}  # row -> room left in its open string, where a token may not fit
        for k, row in enumerate(rows):
            if row.done or row.broken:
                continue
            row.matcher.fill_next_token_bitmask(self.bitmask, k)
            t = row.only()
            if t is not None:
                only[k] = t
            elif (room := row.room()) is not None and room + (pending := row.pending()) < self.longest:
                # a token's continuation bytes of a split character add no character
                short[k] = max(room, 0) + pending
        xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(self.device), vocab_size=self.grammars.vocab_size)
        logits[:, self.forbidden] = float("-inf")  # special tokens: plain text to the grammar, never in a grade
        for k, room in short.items():  # the string's bound: no token longer than its room (the quote fits)
            logits[k, : self.token_bytes.shape[0]].masked_fill_(self.token_bytes > room, float("-inf"))
        chosen = logits.argmax(-1).tolist()
        if only:
            keys = list(only)
            allowed = torch.isfinite(logits[keys, [only[k] for k in keys]]).tolist()
            for k, ok in zip(keys, allowed):
                if ok:  # not allowed here (e.g. a key being written): the grammar decides
                    chosen[k] = only[k]
        return chosen


def _utf8_chars(data: bytes) -> tuple[int, int]:
    """The characters in UTF-8 ``data`` (a last one still missing bytes counted), and how many
    continuation bytes that last character still needs (0 when it is complete)."""
    chars = len(data) - sum(1 for b in data if 0x80 <= b < 0xC0)  # every byte but continuations
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:
            return chars, 0
        if b >= 0xC0:  # the last character's lead byte
            size = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return chars, max(size - back, 0)
    return chars, 0


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

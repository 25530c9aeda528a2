"""The grading engine: a base model loaded once, LoRA adapters attached by folder, grades that are
always valid.

- One :class:`GraderEngine` per base model (:func:`get_engine` caches them). Every call names its
  adapter: ``grade(..., adapter=FOLDER)`` (None: the base alone, inside PEFT's ``disable_adapter``
  context). The engine switches to it and grades under one lock, so a cached engine shared by UI
  threads carries no "active adapter" a caller could see or race on. Adapters are attached with
  PEFT once (``PeftModel.from_pretrained`` for the first, ``load_adapter`` for the next) and
  switched with ``set_adapter``: switching never reloads the base.
- Only safetensors adapters are loaded (a pickle can run code when it is unpickled); an adapter
  trained for another base model is refused with both models named.
- Prompts come from ``data.prompt_format.encode_prompt`` (the tokens training used) and
  generation stops at ``stop_token_ids``. Decoding is greedy with the KV cache; tokens stream to a
  callback. By default it is constrained to the rubric's grade schema (``inference.constrained``,
  xgrammar): the answer is a valid grade by construction, its forced opening is part of the
  prompt, its later forced spans go into the model with the token before them (jump-forward:
  ``GradeResult.model_steps`` against ``new_tokens``), and repair is left for what the
  constraint cannot cover (xgrammar not installed, ``constrained=False``). The answer goes through ``inference.repair.parse_grade``; if it holds no JSON at all,
  one guided retry forces the grade JSON's opening (as training writes it) up to the first score,
  makes that score start with the most likely digit, and lets the model write the rest; if that
  fails too, every question scores 0 and the grade says why.
- Scores are the model's expected score by default (``scoring="expected"``): with the grade JSON
  written as training writes it, one forward pass reads, at each question's score, the model's
  probabilities for the values 0..max and takes their mean (``grade_many`` reads a whole
  batch's grades in a few right-padded passes, only the score positions through the LM head, with
  the same results as one pass per grade). A grade decoded under its grammar needs no such pass:
  the decoder keeps those probabilities from the logits of the step that starts each score
  (inference.constrained, ``DecodedGrade.score_probs``); the pass is for free decoding, a retry,
  or a score read there without them. On Mohler (bench/mohler_quality.py,
  H200) the same adapter reached r 0.42 that way against 0.15 for the greedy digit.
  ``scoring="generated"`` keeps the digits the model wrote.
- The engine does not write the store: callers record a grade with :func:`store_grade` (the
  base model and adapter that made it come with the result).
"""
from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from data.rubric import Grade, GradeItem, Rubric
from data.run_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FINAL, RUN_CONFIG, RunFolder
from inference.repair import Repair, parse_grade, scores_read_from_output, zero_grade

# CPU threads that wait for the others sleep instead of spinning. With torch's default (spinning)
# every op stalls whenever another process holds a core: on this project's 2-core machine,
# shared with a training run or a test suite, a Gemma forward pass took 2.5-7x longer on 2
# threads than on 1; waiting passively, 2 threads were as fast as 1 under load (BENCHMARKS.md
# "Grading speed"). OpenMP reads it when torch is first imported, which the engine does lazily.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SCORINGS = ("expected", "generated")


class AdapterError(ValueError):
    """An adapter folder that cannot be used: missing, not safetensors, or for another base."""


@dataclass
class GradeResult:
    """One grading: the valid grade, what the model wrote, what was repaired, and what made it."""

    grade: Grade
    raw_text: str
    repaired: bool
    repairs: list[Repair]
    latency_s: float
    base_model: str
    adapter: str | None  # resolved adapter folder, None for the base alone
    prompt_tokens: int = 0
    new_tokens: int = 0
    retried: bool = False
    scoring: str = "generated"  # how the item scores were made: "expected" or "generated"
    # per question: {value: probability} the expected score came from (None where it was not used)
    score_probs: list[dict[str, float] | None] | None = None
    unit: str = "submission"  # "item": each question scored on its own (no generation); see grade_items
    # per question (item-level grading): confidence from the score distribution, the expected score
    # before calibration, and whether the calibration stored with the adapter was applied
    confidence: list[float | None] | None = None
    raw_scores: list[float | None] | None = None
    calibrated: bool = False
    # where the time went, this grade's share of its batch: item unit {"encode_s", "model_s"};
    # submission unit {"prefill_s", "decode_s", "scoring_s"}
    timings: dict[str, float] | None = None
    # submission unit: the model forward passes that wrote the answer (the prefill included); fewer
    # than new_tokens where forced spans of the grade schema went in without a step of their own
    model_steps: int = 0

    @property
    def needs_review(self) -> list[bool]:
        """Per question: the model was unsure (confidence below inference.scoring.REVIEW_THRESHOLD)."""
        from inference.scoring import needs_review

        return [needs_review(c) for c in (self.confidence or [None] * len(self.grade.items))]

    def to_dict(self) -> dict:
        return {
            "grade": self.grade.model_dump(),
            "repaired": self.repaired,
            "repairs": [r.to_dict() for r in self.repairs],
            "raw_text": self.raw_text,
            "latency_s": round(self.latency_s, 3),
            "base_model": self.base_model,
            "adapter": self.adapter,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "scoring": self.scoring,
            "score_probs": self.score_probs,
            "unit": self.unit,
            "confidence": self.confidence,
            "needs_review": self.needs_review,
            "raw_scores": self.raw_scores,
            "calibrated": self.calibrated,
            "timings": self.timings,
            "model_steps": self.model_steps,
        }


@dataclass
class _Answer:
    """A model's answer read as a grade, before its scores are re-read (``scoring="expected"``)."""

    raw: str
    new: list[int]
    grade: Grade
    repaired: bool
    repairs: list[Repair]
    retried: bool


# --------------------------------------------------------------------------- adapter folders


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return data


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """The adapter folder, checked: it exists, has adapter_config.json and safetensors weights.
    A folder whose weights are only pickles (.bin/.pt) is refused: unpickling can run code."""
    folder = Path(adapter_dir).expanduser()
    if not folder.exists():
        raise AdapterError(f"adapter folder {folder} does not exist (give a run's final/ or checkpoint-N/ folder)")
    if not folder.is_dir():
        raise AdapterError(f"adapter {folder} is a file; give the folder that holds {ADAPTER_CONFIG}")
    if not (folder / ADAPTER_CONFIG).is_file():
        final = folder / FINAL
        hint = f" (did you mean {final}?)" if (final / ADAPTER_CONFIG).is_file() else ""
        raise AdapterError(f"{folder} has no {ADAPTER_CONFIG}: not a PEFT adapter folder{hint}")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
                f"the studio loads {ADAPTER_WEIGHTS} only. Convert it with safetensors "
                "(load it in a trusted environment and save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterError(f"{folder} has no {ADAPTER_WEIGHTS}")
    return folder.resolve()


def base_model_of_adapter(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on: run_config.json "model", else
    adapter_config.json "base_model_name_or_path"."""
    folder = Path(adapter_dir).expanduser()
    if not folder.exists():
        raise AdapterError(f"adapter folder {folder} does not exist")
    for cand in (folder / RUN_CONFIG, RunFolder(folder.parent).config):
        if cand.is_file():
            try:
                model = json.loads(cand.read_text()).get("model")
            except (OSError, ValueError, AttributeError):
                model = None
            if isinstance(model, str) and model:
                return model
    if (folder / ADAPTER_CONFIG).is_file():
        model = _read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
        if isinstance(model, str) and model:
            return model
    raise AdapterError(
        f"{folder}: cannot tell which base model this adapter belongs to (no {RUN_CONFIG} with \"model\", "
        f"no base_model_name_or_path in {ADAPTER_CONFIG}); pass --base MODEL"
    )


def _config_summary(cfg) -> dict:
    get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    text = get("text_config")
    if text is not None and get("hidden_size") is None:  # multimodal configs nest the LM's
        return _config_summary(text)
    return {"model_type": get("model_type"), "hidden_size": get("hidden_size"), "vocab_size": get("vocab_size"),
            "num_hidden_layers": get("num_hidden_layers")}


def _describe(summary: dict) -> str:
    return (f"{summary.get('model_type')}, hidden {summary.get('hidden_size')}, vocab {summary.get('vocab_size')}, "
            f"{summary.get('num_hidden_layers')} layers")


def _adapter_base_summary(spec: str) -> dict | None:
    """The config summary of the adapter's base when it is on this machine (without building it)."""
    try:
        if spec.startswith("embedded:"):
            from data.model_zoo import embedded_model

            embedded = embedded_model(spec)
            if embedded is None:
                return None
            folder = embedded.folder()
            if not (folder / "config.json").is_file() and embedded.config is not None:
                return _config_summary(embedded.config())  # known without building it
        else:
            folder = Path(spec).expanduser()
        if (folder / "config.json").is_file():
            return _config_summary(json.loads((folder / "config.json").read_text()))
    except Exception:  # unknown or unreadable: the weight shapes still get checked
        return None
    return None


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def _torch_dtype(dtype, device):
    """The dtype to load in: fp32 on CPU (bf16 is ~60x slower there), bf16 on GPUs, unless asked."""
    import torch

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[dtype]
    return dtype


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


# --------------------------------------------------------------------------- the engine


def check_adapter_fits(model, base_model: str, adapter_dir: str | Path, *,
                       base_path: str | Path | None = None) -> None:
    """Refuse (AdapterError) an adapter trained for another base than ``model`` (loaded from
    ``base_model``, found at ``base_path``): compare the adapter's base (run_config model /
    base_model_name_or_path, and its config when it is on this machine) and its LoRA weight shapes
    with the model."""
    folder = Path(adapter_dir)
    summary = _config_summary(model.config)
    try:
        claimed = base_model_of_adapter(folder)
    except AdapterError:
        claimed = None
    ours = [base_model] + ([str(base_path)] if base_path is not None else [])
    if claimed is not None and not any(_same_model(claimed, name) for name in ours):
        theirs = _adapter_base_summary(claimed)
        if theirs is not None and any(theirs.get(k) is not None and theirs.get(k) != summary.get(k) for k in theirs):
            raise AdapterError(
                f"adapter {folder} was trained for base model {claimed!r} ({_describe(theirs)}), but the loaded "
                f"base is {base_model!r} ({_describe(summary)}); grade with --base {claimed}"
            )
    # The weights themselves: every LoRA matrix must fit the module it attaches to.
    from safetensors import safe_open

    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            m = re.match(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
            if not m:
                continue
            # Several LoRA'd parameters of one module (target_parameters) nest as base_layer.
            target, which = re.sub(r"(\.base_layer)+$", "", m.group(1)), m.group(2)
            shape = f.get_slice(key).get_shape()
            mod = modules.get(target)
            expected = None
            if mod is not None and hasattr(mod, "in_features"):
                expected = mod.in_features if which == "A" else mod.out_features
                got = shape[1] if which == "A" else shape[0]
            elif mod is None and target in params:  # target_parameters (e.g. GPT-OSS experts)
                continue
            elif mod is None:
                raise AdapterError(
                    f"adapter {folder} attaches to {target}, which the base {base_model!r} "
                    f"({_describe(summary)}) does not have: it was made for {claimed or 'another base model'}"
                )
            if expected is not None and got != expected:
                raise AdapterError(
                    f"adapter {folder} does not fit base {base_model!r} ({_describe(summary)}): "
                    f"{key} has shape {list(shape)}, the base's {target} needs {expected} features; it was "
                    f"trained for {claimed or 'another base model'}"
                )


class GraderEngine:
    """A base model, its tokenizer and the adapters attached to it. Each grading call names the
    adapter it grades with; the engine holds no adapter choice between calls."""

    def __init__(self, base_model: str, *, model=None, tokenizer=None, device: str | None = None, dtype=None,
                 trust_remote_code: bool = False):
        """Load ``base_model`` (a model folder or embedded:NAME) with its tokenizer, safetensors only.
        With ``model`` and ``tokenizer`` (a model already in memory, e.g. a benchmark's random
        weights), nothing is loaded and ``base_model`` is only its name."""
        import torch

        from data.prompt_format import detect_format, stop_token_ids

        self.base_model = base_model
        self.trust_remote_code = trust_remote_code
        if model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from data.model_zoo import resolve_model_path

            self.base_path = resolve_model_path(base_model)
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            dtype = _torch_dtype(dtype, self.device)
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.base_path), trust_remote_code=trust_remote_code)
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    str(self.base_path), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
                )
            except OSError as e:
                raise OSError(f"cannot load base model {base_model} from {self.base_path}: {e} "
                              "(the studio loads safetensors weights only)") from e
            model = model.to(self.device)
        else:
            if tokenizer is None:
                raise ValueError("GraderEngine(model=...) needs the model's tokenizer too (tokenizer=...)")
            self.base_path = Path(base_model)
            first = next(model.parameters())
            self.device, dtype = first.device, first.dtype
            self.tokenizer = tokenizer
        self.dtype = dtype
        self.model = model.eval()
        self.base_summary = _config_summary(self.model.config)
        self.format = detect_format(self.tokenizer, getattr(self.model.config, "model_type", None))
        self.stop_ids = list(stop_token_ids(self.tokenizer, self.format))
        self.pad_id = self._pad_id()
        self.peft = None  # the PeftModel once an adapter is attached
        self.adapters: dict[str, str] = {}  # resolved folder -> PEFT adapter name (attached once, kept)
        self._switched_to: str | None = None  # PEFT adapter set last (internal: every call names its own)
        self._lock = threading.RLock()  # one model call at a time per engine (UI threads share it)
        self._grammars = None  # inference.constrained.GradeGrammars, built on first constrained grade

    def _pad_id(self) -> int:
        for cand in (self.tokenizer.pad_token_id, getattr(self.model.generation_config, "pad_token_id", None),
                     self.tokenizer.eos_token_id):
            if isinstance(cand, int):
                return cand
            if isinstance(cand, list) and cand:
                return int(cand[0])
        return 0

    # ----------------------------------------------------------------- adapters

    def _attach(self, adapter_dir: str | Path | None) -> str | None:
        """The adapter's resolved folder (None for the base alone), checked and attached once."""
        if adapter_dir is None:
            return None
        folder = check_adapter_dir(adapter_dir)
        key = str(folder)
        with self._lock:
            if key not in self.adapters:
                check_adapter_fits(self.model, self.base_model, folder, base_path=self.base_path)
                name = f"adapter{len(self.adapters)}"
                from peft import PeftModel

                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, key, adapter_name=name, is_trainable=False)
                else:
                    self.peft.load_adapter(key, adapter_name=name, is_trainable=False)
                self.peft.to(self.device)
                self.peft.eval()
                self.adapters[key] = name
                self._switched_to = self.peft.active_adapter
        return key

    @contextmanager
    def _using(self, adapter_dir: str | Path | None) -> Iterator:
        """Hold the engine's lock with ``adapter_dir`` switched in (None: the base alone, adapters
        disabled); yields the model to call."""
        with self._lock:
            key = self._attach(adapter_dir)
            if self.peft is None:
                yield self.model
            elif key is None:
                with self.peft.disable_adapter():
                    yield self.peft
            else:
                name = self.adapters[key]
                if self._switched_to != name:
                    self.peft.set_adapter(name)
                    self._switched_to = name
                yield self.peft

    # ----------------------------------------------------------------- generation

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
        padding, :func:`_padding_bounded_batches`), and only the hidden states at the score
        positions go through the LM head. With right padding every real token keeps its position
        and sees only the tokens before it, so a row reads what it would alone."""
        import torch

        from data.prompt_format import target_text
        from inference.score_head import base_causal_lm

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
            for part in _padding_bounded_batches(todo, [len(plans[n][0]) for n in todo], step):
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

    def grade(self, submission_md: str, rubric: Rubric, *, adapter: str | Path | None = None,
              scoring: str = "expected", max_new_tokens: int = 512, on_token: Callable[[str], None] | None = None,
              retry: bool = True, unit: str | None = None, calibrate: bool = False,
              constrained: bool = True) -> GradeResult:
        """Grade one submission (Markdown) against ``rubric`` with ``adapter`` (a LoRA folder; None:
        the base alone): always a valid Grade. ``unit``: "item" grades each question by reading the
        model's score distribution (:meth:`grade_items`), "submission" generates the grade JSON;
        None: what the adapter was trained for (:func:`grading_unit`). ``scoring`` (submission
        unit): "expected" or "generated" (see the module docstring). ``constrained`` (submission
        unit): decode only what the rubric's grade schema allows (inference.constrained; needs
        xgrammar), so repair is left for answers cut by ``max_new_tokens``. ``retry``: one guided
        retry when the answer holds no JSON (speed benchmarks turn it off). Nothing is stored: see
        :func:`store_grade`."""
        _check_scoring(scoring)
        if (unit or grading_unit(adapter)) == "item":
            result = self.grade_items([("submission", submission_md, rubric)], adapter=adapter, calibrate=calibrate)[0]
            if on_token:
                on_token(result.raw_text)
            return result
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

    def grade_many(self, items: list[tuple[str, str, Rubric]], *, adapter: str | Path | None = None,
                   scoring: str = "expected", batch_size: int = 8, max_new_tokens: int = 512,
                   progress: Callable[[int], None] | None = None, retry: bool = True,
                   unit: str | None = None, calibrate: bool = False,
                   on_batch: Callable[[list[tuple[int, GradeResult]]], None] | None = None,
                   constrained: bool = True, share_prefix: bool | None = None) -> list[GradeResult]:
        """Grade (name, markdown, rubric) triples with ``adapter`` (None: the base alone) in batches;
        results in input order (the names are the caller's, e.g. for :func:`store_grade`).
        After each batch, ``progress(n)`` gets the number just finished and ``on_batch`` the
        finished (input index, result) pairs, so a caller can stream them out. ``constrained``: as
        for :meth:`grade`; ``share_prefix``: as for :meth:`grade_items`. Nothing is stored."""
        _check_scoring(scoring)
        if (unit or grading_unit(adapter)) == "item":
            return self.grade_items(items, adapter=adapter, batch_size=batch_size, progress=progress,
                                    calibrate=calibrate, on_batch=on_batch, share_prefix=share_prefix)
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

    # ----------------------------------------------------------------- item-level grading

    def grade_items(self, items: list[tuple[str, str, Rubric]], *, adapter: str | Path | None = None,
                    batch_size: int = 16, progress: Callable[[int], None] | None = None,
                    calibrate: bool = False,
                    on_batch: Callable[[list[tuple[int, GradeResult]]], None] | None = None,
                    share_prefix: bool | None = None) -> list[GradeResult]:
        """Grade (name, markdown, rubric) triples question by question, without generation: each
        question alone (its answer from the submission's sections, or the whole text when the
        headings do not match the rubric) is encoded to its score position and one forward pass
        reads the distribution over 0..max (data.prompt_format's item-level section). The score is
        its expected value, mapped by the adapter's calibration when it has one; the confidence
        comes from its spread. ``calibrate``: map expected scores through the calibration stored
        with the adapter (off by default: on Mohler it lowered agreement on unseen assignments,
        BENCHMARKS.md). Questions whose values are not single tokens get the number the model
        writes there.

        Speed: every submission's copy of a question starts with the same tokens (the one-question
        instructions, up to the student's answer), so that shared prefix goes through the model
        once per call and its KV cache is reused for each answer (:func:`_shared_prefixes`); only
        the answers, sorted by length, are batched. ``share_prefix`` (None: on the CPU only) turns
        that on: on the 2-core CPU it made the 14 samples 1.8x faster, on an H200 it made them
        ~10x slower (2,950 -> 308 submissions/min: many small batches where one large one is
        cheap; BENCHMARKS.md), with the same scores either way. Submissions are taken ``batch_size`` at a time,
        those of one rubric together; after each such batch ``progress(n)`` and
        ``on_batch([(input index, result), ...])`` report the submissions just finished, so a
        caller can write them out before the rest is graded. Results come back in input order."""
        import torch

        from data.markdown import split_sections
        from data.prompt_format import ScoreExample, encode_score_prompt, target_text
        from inference.calibration import load_calibration
        from inference.score_head import base_causal_lm, collate_scores, score_log_probs
        from inference.scoring import confidence, expected_score

        key = self._attach(adapter)
        cal = load_calibration(key) if calibrate else None
        limit = getattr(self.model.config, "max_position_embeddings", None)
        step = max(1, batch_size)
        # Encode every question first (cheap next to the model): the shared prefixes are found
        # over the whole call, so one computed prefix serves all the batches of its rubric.
        encoded: list[list[ScoreExample]] = []
        encode_s: list[float] = []
        for _, md, rubric in items:
            t0 = time.perf_counter()
            answers = split_sections(md, rubric) or [md.strip()] * len(rubric.questions)
            encoded.append([encode_score_prompt(self.tokenizer, self.format, rubric, k, answer,
                                                limit - 8 if isinstance(limit, int) else None)
                            for k, answer in enumerate(answers)])
            encode_s.append(time.perf_counter() - t0)
        rubric_keys = [rubric.model_dump_json() for _, _, rubric in items]
        if share_prefix is None:
            share_prefix = self.device.type == "cpu"
        # (rubric, question) -> prefix length; none shared: every prompt goes through whole
        prefixes = _shared_prefixes(encoded, rubric_keys) if share_prefix else {}
        left = Counter((rubric_keys[i], k) for i, exs in enumerate(encoded) for k, ex in enumerate(exs)
                       if ex.value_ids and (rubric_keys[i], k) in prefixes)  # answers still to read per prefix
        kv: dict[tuple[str, int], object] = {}  # computed prefix caches, freed when their last answer is read
        # One rubric's submissions together: its prefixes are freed before the next rubric's are made.
        first_seen = {k: n for n, k in reversed(list(enumerate(rubric_keys)))}
        order = sorted(range(len(items)), key=lambda i: (first_seen[rubric_keys[i]], i))
        results: list[GradeResult | None] = [None] * len(items)
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            t0 = time.perf_counter()
            probs: dict[tuple[int, int], list[float]] = {}
            groups: dict[tuple[str, int] | None, list[tuple[int, int]]] = {}
            for i in chunk:
                for k, ex in enumerate(encoded[i]):
                    if ex.value_ids:
                        g = (rubric_keys[i], k)
                        groups.setdefault(g if g in prefixes else None, []).append((i, k))
            for g, members in groups.items():
                n_prefix = prefixes[g] if g is not None else 0
                members.sort(key=lambda ik: len(encoded[ik[0]][ik[1]].input_ids))  # less padding
                with self._using(key) as model, torch.inference_mode():
                    lm = base_causal_lm(model)
                    if g is not None and g not in kv:
                        i, k = members[0]
                        ids = torch.tensor([encoded[i][k].input_ids[:n_prefix]], device=self.device)
                        kv[g] = lm.model(input_ids=ids, use_cache=True).cache
                    reader = _AfterPrefix(lm, kv[g], n_prefix) if g is not None else model
                    lengths = [len(encoded[i][k].input_ids) - n_prefix for i, k in members]
                    for part in _padding_bounded_batches(members, lengths, step):
                        exs = [encoded[i][k] for i, k in part]
                        if n_prefix:
                            exs = [ScoreExample(input_ids=ex.input_ids[n_prefix:], value_ids=ex.value_ids,
                                                max_score=ex.max_score) for ex in exs]
                        rows = score_log_probs(reader, collate_scores(exs, self.pad_id, self.device))
                        for (i, k), row in zip(part, rows.exp().float().cpu().tolist()):
                            probs[(i, k)] = row[: len(encoded[i][k].value_ids)]
                if g is not None:
                    left[g] -= len(members)
                    if left[g] <= 0:
                        kv.pop(g, None)
            written: dict[tuple[int, int], float] = {}
            for i in chunk:
                for k, ex in enumerate(encoded[i]):
                    if (i, k) not in probs:  # values that are not single tokens: the number it writes
                        text = self._decode(self._generate([ex.input_ids], 8, key)[0])
                        m = re.match(r"\s*(\d+(?:\.\d+)?)", text)
                        written[(i, k)] = min(max(float(m.group(1)), 0.0), ex.max_score) if m else 0.0
            model_share = (time.perf_counter() - t0) / len(chunk)
            done = []
            for i in chunk:
                rubric = items[i][2]
                grade_items, probs_out, conf, raw = [], [], [], []
                for k, ex in enumerate(encoded[i]):
                    p = probs.get((i, k))
                    score = expected_score(p) if p is not None else written[(i, k)]
                    raw.append(round(score, 3))
                    if cal is not None and p is not None:
                        score = cal.apply(score, ex.max_score)
                    grade_items.append(GradeItem(question=rubric.questions[k].question, score=round(score, 2),
                                                 max_score=ex.max_score))
                    probs_out.append({str(v): round(x, 4) for v, x in enumerate(p)} if p is not None else None)
                    conf.append(confidence(p) if p is not None else None)
                grade = Grade(score=round(sum(it.score for it in grade_items), 2), max_score=rubric.max_score,
                              items=grade_items, feedback="")
                results[i] = GradeResult(
                    grade=grade, raw_text=target_text(grade, rubric), repaired=False, repairs=[],
                    latency_s=encode_s[i] + model_share, base_model=self.base_model, adapter=key,
                    prompt_tokens=sum(len(ex.input_ids) for ex in encoded[i]),
                    scoring="expected" if not any(k[0] == i for k in written) else "generated",
                    score_probs=probs_out, unit="item", confidence=conf, raw_scores=raw,
                    calibrated=cal is not None,
                    timings={"encode_s": round(encode_s[i], 4), "model_s": round(model_share, 4)})
                done.append((i, results[i]))
            if on_batch:
                on_batch(done)
            if progress:
                progress(len(chunk))
        return results  # type: ignore[return-value]

    # ----------------------------------------------------------------- scores without generation

    def next_token_logits(self, ids: list[int], *, adapter: str | Path | None = None):
        """Logits for the token after ``ids`` with ``adapter`` (None: the base alone)."""
        import torch

        with self._using(adapter) as model, torch.inference_mode():
            out = model(input_ids=torch.tensor([ids], device=self.device), logits_to_keep=1)
        return out.logits[0, -1].float().cpu()

    def default_batch_size(self) -> int:
        """Submissions per batch when the caller does not say: 64 on a GPU (item grading of Mohler
        on an H200 was fastest there, BENCHMARKS.md), 8 on CPU (larger batches gain nothing on a
        few cores and delay the first results written out)."""
        return 64 if self.device.type == "cuda" else 8

    def describe(self) -> dict:
        return {"base_model": self.base_model, "base_path": str(self.base_path), "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "format": self.format,
                "adapters": list(self.adapters), **self.base_summary}


# A prefix shorter than this is not worth a separate pass (and its own forward per batch).
MIN_SHARED_PREFIX = 16
# At most this share of a batch's tokens may be padding: a long answer among short ones gets a
# batch of its own (on the sample submissions, one free-form essay padded its three-row batches
# to 2.2x their tokens).
MAX_PADDING_SHARE = 0.2


def _padding_bounded_batches(rows: list, lengths: list[int], batch_size: int) -> list[list]:
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
            if ex.value_ids:
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
    :func:`inference.score_head.score_log_probs` reads scores through (it calls ``.model(input_ids=,
    attention_mask=)``, ``.get_output_embeddings()`` and ``.config``), so the item scores keep their
    one home there. Each call gets its own copy of the prefix cache, repeated for the batch (a
    forward appends to the cache it is given)."""

    def __init__(self, lm, cache, prefix_len: int) -> None:
        self.lm, self.cache, self.prefix_len = lm, cache, prefix_len
        self.config = lm.config

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def model(self, *, input_ids, attention_mask):
        import copy

        import torch

        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(input_ids.shape[0])
        seen = torch.ones((input_ids.shape[0], self.prefix_len), dtype=attention_mask.dtype,
                          device=attention_mask.device)
        return self.lm.model(input_ids=input_ids, attention_mask=torch.cat([seen, attention_mask], dim=1),
                             cache=cache, use_cache=True)


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


def _check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, not {scoring!r}")


def _no_json(repairs: list[Repair]) -> bool:
    """parse_grade found no JSON at all (its first repair says so)."""
    return bool(repairs) and repairs[0].kind == "no_json"


def grading_unit(adapter_dir: str | Path | None) -> str:
    """How an adapter grades: the ``example_unit`` it was trained with (run_config.json); adapters
    from before item-level training learnt whole grades ("submission"). The base alone grades by
    item: reading a distribution needs no instruction following, and cannot run away."""
    if adapter_dir is None:
        return "item"
    for cand in (Path(adapter_dir) / RUN_CONFIG, RunFolder(Path(adapter_dir).parent).config):
        if cand.is_file():
            try:
                unit = json.loads(cand.read_text()).get("example_unit")
            except (OSError, ValueError, AttributeError):
                unit = None
            return unit if unit in ("item", "submission") else "submission"
    return "submission"


def store_grade(result: GradeResult, rubric: Rubric, submission_name: str, store=None, *,
                submission_md: str | None = None) -> int:
    """Record ``result`` in the studio's store (``store``: a data.store.Store, default the user's)
    with the base model and adapter that made it and its per-question confidence; returns its row
    id. ``submission_md``: the Markdown that was graded; the teacher's corrections of this grade
    become training data only when it is kept (the Review tab)."""
    from data.store import Store

    return (store or Store()).add_grade(
        grade=result.grade.model_dump(), raw_text=result.raw_text, base_model=result.base_model,
        adapter=result.adapter, submission_name=submission_name, rubric=rubric.model_dump(),
        repaired=result.repaired, latency_s=result.latency_s, submission_md=submission_md,
        confidence=result.confidence,
    )


_ENGINES: dict[tuple, GraderEngine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(base_model: str, **kw) -> GraderEngine:
    """The engine for ``base_model`` (built once per base, device, dtype and trust setting)."""
    import torch

    device = kw.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    key = (base_model, str(device), str(kw.get("dtype")), bool(kw.get("trust_remote_code", False)))
    with _ENGINES_LOCK:
        eng = _ENGINES.get(key)
        if eng is None:
            eng = GraderEngine(base_model, **kw)
            _ENGINES[key] = eng
        return eng


def resolve_base(base: str | None, adapter_dir: str | Path | None) -> str:
    """--base if given, else the adapter's run_config model, else the embedded default model."""
    if base:
        return base
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir)
        return base_model_of_adapter(adapter_dir)
    from data.model_zoo import DEFAULT_CPU_MODEL

    return DEFAULT_CPU_MODEL


def export_merged(adapter_dir: str | Path, out_dir: str | Path, *, base_model: str | None = None,
                  trust_remote_code: bool = False) -> Path:
    """Merge the adapter into a fresh copy of its base (merge_and_unload) and save the result as a
    plain model folder (safetensors + tokenizer) that needs no PEFT to load."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.model_zoo import resolve_model_path

    folder = check_adapter_dir(adapter_dir)
    base = resolve_base(base_model, folder)
    path = resolve_model_path(base)
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    check_adapter_fits(model, base, folder, base_path=path)
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code).save_pretrained(str(out))
    (out / "merged_from.json").write_text(json.dumps({"base_model": base, "adapter": str(folder)}, indent=1))
    return out

"""The grading engine: a base model loaded once, LoRA adapters attached by folder, grades that are
always valid.

- One :class:`GraderEngine` per base model (:func:`get_engine` caches them). Every call names its
  adapter: ``grade(..., adapter=FOLDER)`` (None: the base alone, inside PEFT's ``disable_adapter``
  context). The engine switches to it and grades under one lock, so a cached engine shared by UI
  threads carries no "active adapter" a caller could see or race on. Adapters are attached with
  PEFT once (``PeftModel.from_pretrained`` for the first, ``load_adapter`` for the next) and
  switched with ``set_adapter``: switching never reloads the base. Which adapters load at all is
  ``inference.adapters``' job (safetensors only, the right base).
- A grade is made question by question (``inference.item_grading``) or written whole
  (``inference.generation``), as the adapter was trained (``example_unit``).
- The engine does not write the store: callers record a grade with
  ``inference.results.store_grade`` (the base model and adapter that made it come with the result).
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from data.precision import torch_dtype
from data.rubric import Rubric
from inference import item_grading
from inference.adapters import config_summary, check_adapter_dir, check_adapter_fits, grading_unit
from inference.generation import WholeGrades, check_scoring
from inference.results import GradeResult

# CPU threads that wait for the others sleep instead of spinning: with torch's default (spinning)
# every op stalls whenever another process holds a core, as on a small machine shared with a
# training run or a test suite (BENCHMARKS.md, "Grading speed"). OpenMP reads it when torch is
# first imported, which the engine does lazily.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class GraderEngine(WholeGrades):
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
            dtype = torch_dtype(dtype, self.device)
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.base_path), trust_remote_code=trust_remote_code)
            experts = None if trust_remote_code else packed_experts(self.base_path, self.device)
            try:
                if experts:
                    model = load_packed_gpt_oss(self.base_path, self.device, dtype, experts)
                else:
                    model = AutoModelForCausalLM.from_pretrained(
                        str(self.base_path), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
                    ).to(self.device)
            except OSError as e:
                raise OSError(f"cannot load base model {base_model} from {self.base_path}: {e} "
                              "(the studio loads safetensors weights only)") from e
        else:
            if tokenizer is None:
                raise ValueError("GraderEngine(model=...) needs the model's tokenizer too (tokenizer=...)")
            self.base_path = Path(base_model)
            first = next(model.parameters())
            self.device, dtype = first.device, first.dtype
            self.tokenizer = tokenizer
        self.dtype = dtype
        self.model = model.eval()
        self.base_summary = config_summary(self.model.config)
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

    def grade(self, submission_md: str, rubric: Rubric, *, adapter: str | Path | None = None,
              scoring: str = "expected", max_new_tokens: int = 512, on_token: Callable[[str], None] | None = None,
              retry: bool = True, unit: str | None = None, calibrate: bool | None = None,
              constrained: bool = True, anchors=None) -> GradeResult:
        """Grade one submission (Markdown) against ``rubric`` with ``adapter`` (a LoRA folder; None:
        the base alone): always a valid Grade. ``unit``: "item" grades each question by reading the
        model's score distribution (:meth:`grade_items`), "submission" generates the grade JSON;
        None: what the adapter was trained for (:func:`grading_unit`). ``scoring`` (submission
        unit): "expected" or "generated" (see the module docstring). ``constrained`` (submission
        unit): decode only what the rubric's grade schema allows (inference.constrained; needs
        xgrammar), so repair is left for answers cut by ``max_new_tokens``. ``retry``: one guided
        retry when the answer holds no JSON (speed benchmarks turn it off). ``anchors`` (item unit):
        the teacher's graded answers (``data.anchors.AnchorBank``, e.g. ``Store().anchor_bank()``).
        Nothing is stored: see :func:`inference.results.store_grade`."""
        check_scoring(scoring)
        if (unit or grading_unit(adapter)) == "item":
            result = self.grade_items([("submission", submission_md, rubric)], adapter=adapter, calibrate=calibrate,
                                      anchors=anchors)[0]
            if on_token:
                on_token(result.raw_text)
            return result
        return self.grade_whole(submission_md, rubric, adapter=adapter, scoring=scoring, max_new_tokens=max_new_tokens,
                                on_token=on_token, retry=retry, constrained=constrained)

    def grade_many(self, items: list[tuple[str, str, Rubric]], *, adapter: str | Path | None = None,
                   scoring: str = "expected", batch_size: int = 8, max_new_tokens: int = 512,
                   progress: Callable[[int], None] | None = None, retry: bool = True,
                   unit: str | None = None, calibrate: bool | None = None,
                   on_batch: Callable[[list[tuple[int, GradeResult]]], None] | None = None,
                   constrained: bool = True, share_prefix: bool | None = None, anchors=None) -> list[GradeResult]:
        """Grade (name, markdown, rubric) triples with ``adapter`` (None: the base alone) in batches;
        results in input order (the names are the caller's, e.g. for :func:`store_grade`).
        After each batch, ``progress(n)`` gets the number just finished and ``on_batch`` the
        finished (input index, result) pairs, so a caller can stream them out. ``constrained``: as
        for :meth:`grade`; ``share_prefix`` and ``anchors``: as for :meth:`grade_items`. Nothing is stored."""
        check_scoring(scoring)
        if (unit or grading_unit(adapter)) == "item":
            return self.grade_items(items, adapter=adapter, batch_size=batch_size, progress=progress,
                                    calibrate=calibrate, on_batch=on_batch, share_prefix=share_prefix,
                                    anchors=anchors)
        return self.grade_whole_many(items, adapter=adapter, scoring=scoring, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, progress=progress, retry=retry,
                                     on_batch=on_batch, constrained=constrained)

    def grade_items(self, items: list[tuple[str, str, Rubric]], **kw) -> list[GradeResult]:
        """Grade (name, markdown, rubric) triples question by question: :func:`inference.item_grading.grade_items`."""
        return item_grading.grade_items(self, items, **kw)

    # ----------------------------------------------------------------- scores without generation

    def next_token_logits(self, ids: list[int], *, adapter: str | Path | None = None):
        """Logits for the token after ``ids`` with ``adapter`` (None: the base alone)."""
        import torch

        with self._using(adapter) as model, torch.inference_mode():
            out = model(input_ids=torch.tensor([ids], device=self.device), logits_to_keep=1)
        return out.logits[0, -1].float().cpu()

    def default_batch_size(self) -> int:
        """Submissions per batch when the caller does not say: 64 on a GPU (the fastest in
        BENCHMARKS.md's item grading rows), 8 on CPU (larger batches gain nothing on a few cores and
        delay the first results written out)."""
        return 64 if self.device.type == "cuda" else 8

    def describe(self) -> dict:
        return {"base_model": self.base_model, "base_path": str(self.base_path), "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "format": self.format,
                "adapters": list(self.adapters), **self.base_summary}


_ENGINES: dict[tuple, GraderEngine] = {}
_ENGINES_LOCK = threading.Lock()


# The share of the card's memory a dequantized (bf16) GPT-OSS may take before its MXFP4 experts
# are kept packed instead: the rest holds the activations and KV caches of a grading batch.
DEQUANTIZED_SHARE = 0.8


def packed_experts(folder: Path, device, card_bytes: int | None = None) -> str | None:
    """"mxfp4" where a GPT-OSS checkpoint's MXFP4 experts must stay packed on ``device`` to fit
    (gpt-oss-120b's 117B parameters are 234 GB in bf16, ~65 GB packed); None where the model loads
    as transformers loads it (CPU, other models, or a dequantized model that fits the card).
    ``card_bytes``: the card's memory (default: the device's)."""
    import torch  # lazily, as everywhere here: OMP_WAIT_POLICY must be set before torch loads

    if card_bytes is None and getattr(device, "type", str(device)) != "cuda":
        return None
    from training.config import RunConfig
    from training.model_info import inspect_model

    try:
        info = inspect_model(RunConfig(model=str(folder))) or {}
    except Exception:  # a model this inspection cannot build: transformers loads it, or says why
        return None
    if info.get("model_type") != "gpt_oss" or info.get("quantized_checkpoint") != "mxfp4":
        return None
    card_bytes = card_bytes or torch.cuda.get_device_properties(device).total_memory
    return "mxfp4" if 2 * info["n_params"] > DEQUANTIZED_SHARE * card_bytes else None


def load_packed_gpt_oss(folder: Path, device, dtype, experts: str):
    """GPT-OSS with its experts packed (``training.quant_experts.load_gpt_oss``, the loader training
    uses, and its grouped-GEMM experts), with the folder's generation settings."""
    from transformers import GenerationConfig

    from training.quant_experts import load_gpt_oss  # imports torch and the fast path: only when packing

    model, _ = load_gpt_oss(folder, device=device, dtype=dtype, quantization=experts)
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model


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

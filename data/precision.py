"""The one rule for the precision a model computes in, for training and grading alike: fp32 on a
CPU (bf16 arithmetic is some 60x slower there, FACTS.md), bf16 on a GPU unless something else is
asked for."""
from __future__ import annotations

import functools
from typing import Any

NAMES = {"bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16"}


def compute_precision(asked: str | None, on_gpu: bool) -> str:
    """"fp32", "bf16" or "fp16": what a model computes in for precision ``asked`` (None or "auto":
    the default) on a GPU or not."""
    name = NAMES.get(str(asked).lower()) if asked not in (None, "auto") else None
    if not on_gpu:
        return "fp32"
    return name or "bf16"


def torch_dtype(asked: Any, device: Any) -> Any:
    """:func:`compute_precision` as a torch dtype for ``device`` (a torch dtype asked is kept)."""
    import torch

    if isinstance(asked, torch.dtype):
        return asked
    return _DTYPES()[compute_precision(asked, torch.device(device).type == "cuda")]


@functools.lru_cache(maxsize=1)
def _DTYPES() -> dict:
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def bytes_per_value(asked: str | None, on_gpu: bool) -> int:
    return 4 if compute_precision(asked, on_gpu) == "fp32" else 2

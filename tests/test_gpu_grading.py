"""Item grading on a GPU gives each submission the scores it gets graded alone (issue #29 item 3):
batched across submissions and questions, with each question's prefix computed once, against one
submission at a time with every prompt read whole; with transformers' eager attention and with
the fused sink attention (``inference.attention``). fp32, so the comparison means something (a
random-weight model in bf16 flips expert choices on rounding noise: BENCHMARKS.md, "Round 3").

Needs CUDA (skipped elsewhere; tests/test_shared_prefix.py and tests/test_fused_sinks.py check
the same on the CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.attention import SINKS_SDPA, register
from inference.engine import GraderEngine
from tests.test_shared_prefix import _items

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("attention", ["eager", SINKS_SDPA])
def test_batched_shared_prefix_grades_equal_the_unbatched_unshared_reference(tiny_gpt_oss_dir: Path,
                                                                             attention: str) -> None:
    register()
    engine = GraderEngine(str(tiny_gpt_oss_dir), device="cuda", dtype=torch.float32)
    engine.model.set_attn_implementation(attention)
    items = _items()
    together = engine.grade_many(items, adapter=None, batch_size=16, unit="item", share_prefix=True)
    for item, got in zip(items, together):
        alone = engine.grade_many([item], adapter=None, batch_size=1, unit="item", share_prefix=False)[0]
        assert [it.score for it in got.grade.items] == pytest.approx([it.score for it in alone.grade.items], abs=0.011)
        for a, b in zip(got.score_probs, alone.score_probs):
            assert a.keys() == b.keys()
            assert [a[k] for k in a] == pytest.approx([b[k] for k in b], abs=2e-4)

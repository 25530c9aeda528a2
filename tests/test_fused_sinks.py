"""GPT-OSS attention with sinks through PyTorch's fused attention (issue #29, ``inference.attention``)
gives what transformers' eager attention gives: on left-padded rows longer than the sliding window,
and through item grading's shared-prefix path (queries after a cached prefix)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.attention import register
from inference.engine import GraderEngine
from tests.test_shared_prefix import _items


@pytest.fixture(scope="module")
def engine(tiny_gpt_oss_dir: Path) -> GraderEngine:
    register()
    return GraderEngine(str(tiny_gpt_oss_dir), device="cpu")  # its own model: the test switches attention


def test_fused_sink_attention_equals_eager_on_padded_rows_past_the_sliding_window(engine: GraderEngine) -> None:
    model = engine.model
    assert model.config.sliding_window < 40 and model.model.layers[0].self_attn.sinks.abs().sum() > 0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # sinks large enough to take a visible share of each softmax
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0, generator=g)
    ids = torch.randint(0, 1000, (3, 40), generator=g)
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, :13] = 0
    mask[2, :30] = 0
    try:
        with torch.no_grad():
            model.set_attn_implementation("eager")
            want = model(input_ids=ids, attention_mask=mask).logits
            model.set_attn_implementation("fused_sinks")
            got = model(input_ids=ids, attention_mask=mask).logits
    finally:
        model.set_attn_implementation("eager")
    keep = mask.bool()
    assert torch.allclose(got[keep], want[keep], atol=1e-5, rtol=1e-5)


def test_items_graded_after_a_shared_prefix_get_the_same_distributions(engine: GraderEngine) -> None:
    items = _items()[:4]
    want = engine.grade_many(items, adapter=None, batch_size=4)
    try:
        engine.model.set_attn_implementation("fused_sinks")
        got = engine.grade_many(items, adapter=None, batch_size=4)
    finally:
        engine.model.set_attn_implementation("eager")
    for a, b in zip(want, got):
        for pa, pb in zip(a.score_probs, b.score_probs):
            assert [pa[k] for k in pa] == pytest.approx([pb[k] for k in pb], abs=1e-4)

"""GPT-OSS whose MXFP4 experts stay packed grades as the dequantized model does (issue #29): the
engine keeps them packed where the dequantized model would not fit the card (gpt-oss-120b on one
GPU), through the loader training uses."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from data.tokenizer_offline import build_gpt_oss_tokenizer
from inference.engine import GraderEngine, load_packed_gpt_oss, packed_experts
from tests.conftest import REPO
from tests.test_shared_prefix import _items

sys.path.insert(0, str(REPO / "bench"))


@pytest.fixture(scope="module")
def mxfp4_twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-OSS checkpoint in the published layout (MXFP4 experts) with the real tokenizer."""
    from make_twin_checkpoint import write_twin

    folder = tmp_path_factory.mktemp("twin") / "tiny-mxfp4"
    write_twin("tiny", folder, vocab_size=201088)
    for f in build_gpt_oss_tokenizer().iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    return folder


def test_packed_mxfp4_experts_grade_as_the_dequantized_model(mxfp4_twin: Path) -> None:
    dequantized = GraderEngine(str(mxfp4_twin), device="cpu")  # transformers dequantizes the experts
    assert packed_experts(mxfp4_twin, dequantized.device) is None  # on the CPU nothing is packed
    model = load_packed_gpt_oss(mxfp4_twin, torch.device("cpu"), torch.float32, "mxfp4")
    experts = [layer.mlp.experts for layer in model.model.layers]
    assert all(type(e).__name__ == "PackedGptOssExperts" for e in experts)  # the experts really are MXFP4 bytes
    assert all(b.dtype == torch.uint8 for e in experts for b in e.buffers())
    packed = GraderEngine("tiny-mxfp4 (packed)", model=model, tokenizer=dequantized.tokenizer)
    items = _items()
    want, got = (e.grade_many(items, adapter=None, batch_size=4) for e in (dequantized, packed))
    for a, b in zip(want, got):
        assert [it.score for it in a.grade.items] == pytest.approx([it.score for it in b.grade.items], abs=0.011)
        for pa, pb in zip(a.score_probs, b.score_probs):
            assert [pa[k] for k in pa] == pytest.approx([pb[k] for k in pb], abs=2e-4)


def test_experts_stay_packed_only_where_the_dequantized_model_would_not_fit_the_card(tmp_path: Path) -> None:
    import json

    from make_twin_checkpoint import twin_config

    gib = 2**30
    for shape, card_gib, want in (("120b", 141, "mxfp4"), ("120b", 80, "mxfp4"), ("20b", 141, None), ("20b", 80, None)):
        folder = tmp_path / shape
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(twin_config(shape)))
        assert packed_experts(folder, "cuda", card_bytes=card_gib * gib) == want, (shape, card_gib)
    config = twin_config("120b")
    del config["quantization_config"]  # a bf16 checkpoint: nothing to keep packed, transformers loads it
    (tmp_path / "120b-bf16").mkdir()
    (tmp_path / "120b-bf16" / "config.json").write_text(json.dumps(config))
    assert packed_experts(tmp_path / "120b-bf16", "cuda", card_bytes=141 * gib) is None

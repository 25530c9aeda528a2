"""The project's GPT-OSS loader reads an MXFP4 checkpoint (the published layout) exactly as
transformers does, can pack the experts to NF4 while loading, or keep them in MXFP4 as read."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from training import quant_experts as qe
from training import packed
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


def test_twin_checkpoint_loads_like_transformers_as_nf4_and_as_mxfp4(tmp_path):
    from make_twin_checkpoint import write_twin
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Mxfp4Config

    info = write_twin("tiny", tmp_path / "twin", device="cpu")
    twin = Path(info["path"])
    with safe_open(str(next(twin.glob("*.safetensors"))), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.experts.gate_up_proj_blocks").dtype == torch.uint8
    assert "model.layers.1.mlp.experts.down_proj_scales" in names

    ref = AutoModelForCausalLM.from_pretrained(str(twin), dtype=torch.float32, attn_implementation="eager",
                                               quantization_config=Mxfp4Config(dequantize=True))
    model, timing = qe.load_gpt_oss(twin, device="cpu", dtype=torch.float32, attn_implementation="eager")
    assert timing["n_unused"] == 0 and timing["load_s"] > 0
    ours = dict(model.named_parameters())
    theirs = dict(ref.named_parameters())
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(ours[k].float(), theirs[k].float()), k
    ids = torch.randint(0, ref.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits)

    nf4, rep = qe.load_gpt_oss_nf4(twin, device="cpu", dtype=torch.float32)
    assert packed.is_quantized(nf4)
    assert 0.5 < rep["expert_bytes_per_param"] < 0.6
    with torch.no_grad():
        a, b = nf4(ids).logits, ref(ids).logits
    assert float((a - b).norm() / b.norm()) < 0.3

    # MXFP4 kept: the checkpoint's own blocks and scales, so the same logits as transformers'
    # dequantized bf16/fp32 model at a quarter of the expert memory
    mx, timing = qe.load_gpt_oss(twin, device="cpu", dtype=torch.float32, quantization="mxfp4",
                                 attn_implementation="eager")
    assert timing["n_unused"] == 0 and packed.memory_report(mx)["expert_format"] == "mxfp4"
    ex = mx.model.layers[0].mlp.experts
    with safe_open(str(next(twin.glob("*.safetensors"))), framework="pt") as f:
        ck = f.get_tensor("model.layers.0.mlp.experts.gate_up_proj_blocks")
    store = ex.gate_up_proj_packed
    assert torch.equal(torch.cat([getattr(store, f"blocks{i}") for i in range(len(store.meta))]).reshape(ck.shape), ck)
    assert torch.equal(store.dequantize(torch.float32), theirs["model.layers.0.mlp.experts.gate_up_proj"].float())
    with torch.no_grad():
        torch.testing.assert_close(mx(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)

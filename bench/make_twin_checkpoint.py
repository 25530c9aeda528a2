"""Write a random-weights twin of gpt-oss-20b's (or -120b's) checkpoint folder.

Same layout as the published checkpoints: ``config.json`` with ``quantization_config``
``{"quant_method": "mxfp4", ...}``, safetensors shards + ``model.safetensors.index.json``, the same
tensor names and shapes: bf16 attention/router/embeddings/norms, and the experts as MXFP4
``mlp.experts.gate_up_proj_blocks`` (E, 2I, H/32, 16) uint8, ``..._scales`` (E, 2I, H/32) uint8,
``down_proj_blocks`` (E, H, I/32, 16), ``down_proj_scales`` (E, H, I/32), plus bf16 biases.
Values are random (MXFP4 nibbles uniform, exponents around 2^-7 so weights are ~N(0, 0.02)-sized).

    python bench/make_twin_checkpoint.py --shape 20b --out /root/twin-20b [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {"20b": (24, 32), "120b": (36, 128), "tiny": (2, 4)}


def twin_config(shape: str, vocab_size: int | None = None) -> dict:
    from transformers import GptOssConfig

    layers, experts = SHAPES[shape]
    kw = dict(num_hidden_layers=layers, num_local_experts=experts, hidden_size=2880, intermediate_size=2880,
              num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
              num_experts_per_tok=4, sliding_window=128, tie_word_embeddings=False)
    if shape == "tiny":
        kw.update(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, vocab_size=1024)
    if vocab_size:
        kw.update(vocab_size=vocab_size)
    cfg = GptOssConfig(**kw).to_dict()
    cfg["architectures"] = ["GptOssForCausalLM"]
    cfg["torch_dtype"] = "bfloat16"
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }
    return cfg


def tensors_of(cfg: dict):
    """(name, shape, kind) for every tensor of the checkpoint, in file order."""
    H, I, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    nh, nkv, hd, V = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]
    yield "model.embed_tokens.weight", (V, H), "w"
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (H,), "one"
        yield p + "post_attention_layernorm.weight", (H,), "one"
        yield p + "self_attn.q_proj.weight", (nh * hd, H), "w"
        yield p + "self_attn.q_proj.bias", (nh * hd,), "zero"
        yield p + "self_attn.k_proj.weight", (nkv * hd, H), "w"
        yield p + "self_attn.k_proj.bias", (nkv * hd,), "zero"
        yield p + "self_attn.v_proj.weight", (nkv * hd, H), "w"
        yield p + "self_attn.v_proj.bias", (nkv * hd,), "zero"
        yield p + "self_attn.o_proj.weight", (H, nh * hd), "w"
        yield p + "self_attn.o_proj.bias", (H,), "zero"
        yield p + "self_attn.sinks", (nh,), "w"
        yield p + "mlp.router.weight", (E, H), "w"
        yield p + "mlp.router.bias", (E,), "w"
        yield p + "mlp.experts.gate_up_proj_blocks", (E, 2 * I, H // 32, 16), "blocks"
        yield p + "mlp.experts.gate_up_proj_scales", (E, 2 * I, H // 32), "scales"
        yield p + "mlp.experts.gate_up_proj_bias", (E, 2 * I), "zero"
        yield p + "mlp.experts.down_proj_blocks", (E, H, I // 32, 16), "blocks"
        yield p + "mlp.experts.down_proj_scales", (E, H, I // 32), "scales"
        yield p + "mlp.experts.down_proj_bias", (E, H), "zero"
    yield "model.norm.weight", (H,), "one"
    yield "lm_head.weight", (V, H), "w"


def make(kind: str, shape, device, gen):
    if kind == "w":
        return (torch.randn(shape, device=device, generator=gen) * 0.02).to(torch.bfloat16)
    if kind == "one":
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    if kind == "zero":
        return torch.zeros(shape, dtype=torch.bfloat16, device=device)
    if kind == "blocks":
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=gen)
    if kind == "scales":  # exponent bias 127: 2^-7..2^-6 -> |w| up to ~0.05
        return torch.randint(120, 122, shape, dtype=torch.uint8, device=device, generator=gen)
    raise ValueError(kind)


def write_twin(shape: str, out: Path, *, device: str = "cpu", shard_bytes: int = 5 * 2**30, seed: int = 0,
               vocab_size: int | None = None) -> dict:
    """The twin's folder (config and shards); ``vocab_size`` overrides the shape's (the tiny one
    has 1,024 tokens; the real tokenizer's ids need 201,088)."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg = twin_config(shape, vocab_size)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator(device=device).manual_seed(seed)
    specs = list(tensors_of(cfg))
    shards: list[list] = [[]]
    size = 0
    for name, shp, kind in specs:
        nbytes = int(torch.Size(shp).numel()) * (1 if kind in ("blocks", "scales") else 2)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp, kind))
        size += nbytes
    weight_map = {}
    total = 0
    n = len(shards)
    for i, group in enumerate(shards):
        fname = f"model-{i:05d}-of-{n - 1:05d}.safetensors"
        tensors = {name: make(kind, shp, device, gen).cpu() for name, shp, kind in group}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for name in tensors:
            weight_map[name] = fname
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"shape": shape, "path": str(out), "bytes": total, "shards": n, "write_s": time.perf_counter() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="20b", choices=sorted(SHAPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shard-gib", type=float, default=5.0)
    a = ap.parse_args(argv)
    info = write_twin(a.shape, Path(a.out), device=a.device, shard_bytes=int(a.shard_gib * 2**30))
    print(json.dumps(info))


if __name__ == "__main__":
    main()

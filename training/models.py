"""Load a causal LM and its tokenizer for training, quantize it if asked, and wrap it in LoRA.

One function per step, called top to bottom by `training.train_entry`:
`compute_dtype` -> `load_model_and_tokenizer` -> `apply_lora` -> `quantization_report`.

- Any `AutoModelForCausalLM` folder works (`resolve_model_path` turns `embedded:...` into one).
- On CPU everything is fp32 (bf16 matmuls are ~60x slower there).
- `quantization="nf4"`: bitsandbytes 4-bit NF4 with double quantization for every nn.Linear;
  GPT-OSS expert weights are 3-D parameters bitsandbytes does not touch, so they go through
  `training.quant_experts.quantize_experts`.
- `quantization="mxfp4"` (GPT-OSS): the expert weights stay in MXFP4, the format GPT-OSS ships them
  in (from an MXFP4 checkpoint exactly its weights, ~4x less memory than bf16); everything else at
  the compute dtype.
- Otherwise GPT-OSS checkpoints shipped in MXFP4 are dequantized on load (`Mxfp4Config(dequantize=True)`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from data.precision import torch_dtype
from training import packed, quant_experts
from training.config import GPT_OSS_EXPERT_PARAMETERS, RunConfig


def compute_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """The run's compute dtype on ``device`` (data.precision's rule for ``cfg.precision``)."""
    return torch_dtype(cfg.precision, device)


def _checkpoint_quant_method(folder: Path) -> str | None:
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    return qc.get("quant_method")


def load_tokenizer(folder: Path, cfg: RunConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(cfg: RunConfig, device: torch.device) -> tuple[Any, Any, str, Path]:
    """(model, tokenizer, model_type, folder). The model sits on `device`, frozen, not yet LoRA."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from data.model_zoo import resolve_model_path

    folder = Path(resolve_model_path(cfg.model))
    tokenizer = load_tokenizer(folder, cfg)
    hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code)
    model_type = hf_config.model_type
    dtype = compute_dtype(cfg, device)

    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if model_type == "gpt_oss":
        # sdpa is refused for GPT-OSS (attention sinks); fast_path may switch to a faster kernel.
        kwargs["attn_implementation"] = "eager"
    quant_method = _checkpoint_quant_method(folder)
    if quant_method == "mxfp4":
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    elif cfg.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=["lm_head", "router"],
        )
    elif cfg.quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=["lm_head", "router"]
        )
    if device.type == "cuda" and model_type == "gpt_oss" and cfg.quantization != "int8":
        # Straight onto the GPU, expert tensor by expert tensor (MXFP4 dequantized, NF4 packed on
        # the fly): a 120B never exists in its 234 GB bf16 form. Attention stays bf16 (~2 GB).
        model, _ = quant_experts.load_gpt_oss(folder, device=device, dtype=dtype, quantization=cfg.quantization,
                                              attn_implementation="eager")
    else:
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index or 0}
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        if model_type == "gpt_oss" and cfg.quantization in ("nf4", "mxfp4"):
            # bitsandbytes took the nn.Linear layers (nf4); the 3-D expert weights are ours to pack
            # (MXFP4 checkpoint -> dequantized -> MXFP4 again gives back the same values).
            quant_experts.quantize_experts(model, cfg.quantization, compute_dtype=dtype)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, model_type, folder


def lora_config(cfg: RunConfig, model_type: str):
    from peft import LoraConfig

    target_parameters = None
    if cfg.lora_experts and model_type == "gpt_oss":
        target_parameters = list(GPT_OSS_EXPERT_PARAMETERS)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        # peft's ParamWrapper (expert weights) refuses dropout; check_config says so before launch.
        lora_dropout=0.0 if target_parameters else cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        target_parameters=target_parameters,
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model, cfg: RunConfig, model_type: str):
    """Wrap `model` with LoRA adapters; the trainable LoRA weights are fp32 (stable updates)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(cfg, model_type))
    for name, p in peft_model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model


def quantization_report(model) -> dict:
    """Bytes per parameter actually held: what 4-bit really covers (Linear4bit, quantized experts)."""
    total_params = 0
    total_bytes = 0
    quantized_params = 0
    n_linear4bit = 0
    seen: set[int] = set()
    for mod in model.modules():
        if type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            n_linear4bit += 1
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        numel = p.numel()
        qs = getattr(p, "quant_state", None)
        if qs is not None and getattr(qs, "shape", None) is not None:
            numel = int(torch.Size(qs.shape).numel())  # packed 4-bit: count the logical weights
            quantized_params += numel
        total_params += numel
        total_bytes += nbytes
    packed_expert_params = 0
    formats = set()
    for mod in model.modules():  # training.quant_experts' packed expert weights
        if isinstance(mod, packed.PackedStore):
            formats.add(mod.KIND)
            for b in mod.buffers():
                seen.add(id(b))
            total_bytes += mod.nbytes()
            total_params += mod.logical_numel
            quantized_params += mod.logical_numel
            packed_expert_params += mod.logical_numel
    for name, b in model.named_buffers():
        if id(b) in seen:
            continue
        seen.add(id(b))
        total_bytes += b.numel() * b.element_size()
    return dict(
        params=total_params,
        bytes=total_bytes,
        bytes_per_param=round(total_bytes / max(total_params, 1), 3),
        quantized_params=quantized_params,
        packed_expert_params=packed_expert_params,
        packed_expert_format="+".join(sorted(formats)) or None,
        linear_4bit_layers=n_linear4bit,
    )


def lora_state_hash(model) -> str:
    """sha256 over the LoRA weights (names and values), to compare replicas across ranks."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "lora_" in name:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

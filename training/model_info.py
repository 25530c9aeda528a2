"""A model's shapes and LoRA-targetable modules, read from its config on the meta device (nothing
is loaded or built): what the memory estimate and the checks need to know about `cfg.model`."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from functools import lru_cache
from pathlib import Path

from data.model_zoo import EMBEDDED_PREFIX, ModelNotFoundError, embedded_model, resolve_model_path
from data.paths import cache_dir
from training.config import GPT_OSS_EXPERT_PARAMETERS, RunConfig

# Module names of embedded models that may not be built yet (building Gemma takes a minute).
KNOWN_LINEAR = {
    "gemma3_text": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"},
    "gpt_oss": {"q_proj", "k_proj", "v_proj", "o_proj", "lm_head"},
}


def embedded_shape(spec: str) -> dict | None:
    """Dims for the memory estimate of an embedded model that is not built yet (data.model_zoo)."""
    embedded = embedded_model(spec)
    return None if embedded is None else {**embedded.shape, "model_type": embedded.model_type}


def model_dir(cfg: RunConfig) -> Path | None:
    """The local folder of `cfg.model` if it exists now (never builds an embedded model)."""
    if cfg.model.startswith(EMBEDDED_PREFIX):
        embedded = embedded_model(cfg.model)
        return embedded.built_folder() if embedded is not None else None
    p = Path(cfg.model).expanduser()
    if p.is_dir():
        return p
    # A hub id like "openai/gpt-oss-120b" resolves only when a local copy exists (offline).
    try:
        return Path(resolve_model_path(cfg.model))
    except ModelNotFoundError:
        return None


@lru_cache(maxsize=8)
def _inspect_folder(folder: str, trust_remote_code: bool) -> dict:
    """Shapes and module names of the model in `folder`, from its config on the meta device; kept
    in the cache folder by the config's content, since building the meta model means importing
    the model's transformers code (several seconds before every launch otherwise). Not kept for
    remote code, which can change while its config does not."""
    if trust_remote_code:
        return _inspect_meta_model(folder, trust_remote_code)
    config_text = (Path(folder) / "config.json").read_bytes()
    version = importlib.metadata.version("transformers")
    key = hashlib.sha256(config_text + f"|{version}".encode()).hexdigest()[:20]
    cached = cache_dir() / "model_info" / f"{key}.json"
    if cached.exists():
        try:
            return json.loads(cached.read_text())
        except (OSError, ValueError):
            pass  # written by a process that died mid-write: inspect again
    info = _inspect_meta_model(folder, trust_remote_code)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(cached)
    return json.loads(json.dumps(info))  # the same value, hit or miss (tuples as lists)


def _inspect_meta_model(folder: str, trust_remote_code: bool) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg, trust_remote_code=trust_remote_code)
    linear_names: set[str] = set()
    linear_params = 0
    lora_in_out: dict[str, list[tuple[int, int]]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) or type(mod).__name__ == "Conv1D":
            leaf = name.split(".")[-1]
            linear_names.add(leaf)
            if isinstance(mod, torch.nn.Linear):
                lora_in_out.setdefault(leaf, []).append((mod.in_features, mod.out_features))
                if leaf != "lm_head":
                    linear_params += mod.weight.numel()
    expert_params = 0
    expert_shapes: dict[str, list[tuple[int, ...]]] = {}
    for name, p in model.named_parameters():
        if ".experts." in name and p.dim() == 3:
            expert_params += p.numel()
            for suffix in GPT_OSS_EXPERT_PARAMETERS:
                if name.endswith(suffix):
                    expert_shapes.setdefault(suffix, []).append(tuple(p.shape))
    text_cfg = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
    return dict(
        model_type=hf_cfg.model_type,
        n_params=sum(p.numel() for p in model.parameters()),
        linear_params=linear_params,
        expert_params=expert_params,
        linear_names=sorted(linear_names),
        lora_in_out=lora_in_out,
        expert_shapes=expert_shapes,
        n_layers=int(getattr(text_cfg, "num_hidden_layers", 1)),
        hidden=int(getattr(text_cfg, "hidden_size", 1)),
        heads=int(getattr(text_cfg, "num_attention_heads", 1)),
        vocab=int(getattr(text_cfg, "vocab_size", 1)),
        quantized_checkpoint=(getattr(hf_cfg, "quantization_config", None) or {}).get("quant_method")
        if isinstance(getattr(hf_cfg, "quantization_config", None), dict) else None,
    )


def inspect_model(cfg: RunConfig) -> dict | None:
    """Shapes and LoRA-targetable module names of `cfg.model`, or None when it cannot be read."""
    folder = model_dir(cfg)
    if folder is not None and (folder / "config.json").exists():
        return _inspect_folder(str(folder), cfg.trust_remote_code)
    return None

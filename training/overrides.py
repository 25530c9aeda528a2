"""`--set key=value` overrides of a RunConfig, typed by the field they set."""
from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import TypeAdapter, ValidationError

from training.config import RunConfig, unknown_key_message, validation_message

def _parse_value(key: str, raw: str) -> Any:
    """Turn the text of `key=raw` into the field's type: numbers, booleans, null, lists."""
    annotation = RunConfig.model_fields[key].annotation
    args = typing.get_args(annotation)
    optional = type(None) in args
    text = raw.strip()
    if optional and text.lower() in ("none", "null", ""):
        return None
    is_list = typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in args)
    if is_list:
        if text.startswith("["):
            return json.loads(text)
        return [x.strip() for x in text.split(",") if x.strip()]
    if annotation is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}: expected true or false, got {raw!r}")
    # Numbers and literals: let pydantic coerce ("3" -> 3, "2e-4" -> 0.0002, "2" -> Literal 2).
    try:
        return TypeAdapter(annotation).validate_python(json.loads(text))
    except (json.JSONDecodeError, ValidationError):
        pass
    try:
        return TypeAdapter(annotation).validate_strings(text)
    except ValidationError:
        return text  # let the final model validation produce the message


def _split_override(item: str) -> tuple[str, str]:
    """``key=value`` as typed (``--set lora-r=16``) -> (the field name, the raw value)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value (e.g. lora_r=16)")
    key, raw = item.split("=", 1)
    return key.strip().replace("-", "_"), raw


def overridden(overrides: list[str], key: str) -> str | None:
    """The value the last ``key=value`` of ``overrides`` gives ``key`` (stripped), or None."""
    found = [raw.strip() for k, raw in map(_split_override, overrides) if k == key]
    return found[-1] if found else None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `key=value` settings (as typed on the command line) to a copy of `cfg`.

    Values are parsed by the field's type: `lora_r=16`, `learning_rate=1e-4`, `max_steps=none`,
    `target_modules=q_proj,v_proj` (or a JSON list), `gradient_checkpointing=false`.
    """
    data = cfg.model_dump()
    for item in overrides:
        key, raw = _split_override(item)
        if key not in RunConfig.model_fields:
            raise ValueError(unknown_key_message(key))
        data[key] = _parse_value(key, raw)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ValueError(validation_message(e)) from None

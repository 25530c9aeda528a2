"""Adapter folders: what an adapter is (a PEFT folder with safetensors weights), which base model
it belongs to, whether it fits a loaded base, how it grades (by item or whole submission), and
merging one into a plain model folder."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from data.run_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FINAL, RUN_CONFIG, RunFolder

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class AdapterError(ValueError):
    """An adapter folder that cannot be used: missing, not safetensors, or for another base."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class Adapter:
    """An adapter folder, checked once, with what its run configuration says (read once): the one
    value the engine, the CLI and the app ask about an adapter. :meth:`open` refuses what cannot be
    used (AdapterError, saying why and what to give instead)."""

    path: Path  # resolved
    run_config: dict  # {} when neither run_config.json nor the run's config.json can be read

    @classmethod
    def open(cls, adapter_dir: str | Path, *, inside: str | Path | None = None, complete: bool = False) -> "Adapter":
        """The adapter at ``adapter_dir``: a folder with adapter_config.json and safetensors weights
        (a folder of pickles only is refused: unpickling can run code); with ``inside``, within that
        folder (symlinks and ``..`` resolved); with ``complete``, a checkpoint the trainer finished
        writing (its complete.json)."""
        from data.run_folder import COMPLETE_MARKER, is_complete, is_inside_checkpoints

        folder = Path(adapter_dir).expanduser()
        if inside is not None and not is_inside_checkpoints(folder, inside):
            raise AdapterError(f"adapter {adapter_dir!r} is not inside {Path(inside).resolve()}")
        if not folder.exists():
            raise AdapterError(f"adapter folder {folder} does not exist (give a run's final/ or checkpoint-N/ folder)")
        if not folder.is_dir():
            raise AdapterError(f"adapter {folder} is a file; give the folder that holds {ADAPTER_CONFIG}")
        if not (folder / ADAPTER_CONFIG).is_file():
            final = folder / FINAL
            hint = f" (did you mean {final}?)" if (final / ADAPTER_CONFIG).is_file() else ""
            raise AdapterError(f"{folder} has no {ADAPTER_CONFIG}: not a PEFT adapter folder{hint}")
        if not (folder / ADAPTER_WEIGHTS).is_file():
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise AdapterError(
                    f"{folder} holds only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
                    f"the studio loads {ADAPTER_WEIGHTS} only. Convert it with safetensors "
                    "(load it in a trusted environment and save_pretrained(..., safe_serialization=True))"
                )
            raise AdapterError(f"{folder} has no {ADAPTER_WEIGHTS} (only safetensors adapters load)")
        if complete and not is_complete(folder):
            raise AdapterError(f"{folder.resolve()} is an incomplete checkpoint (no {COMPLETE_MARKER}): pick another")
        return cls(folder.resolve(), adapter_run_config(folder) or {})

    @property
    def unit(self) -> str:
        """How it grades: the ``example_unit`` it was trained with; adapters from before item-level
        training learnt whole grades ("submission")."""
        unit = self.run_config.get("example_unit")
        return unit if unit in ("item", "submission") else "submission"

    @property
    def anchors_shown(self) -> int:
        """How many teacher anchors its prompts show: what it was trained with (``train_anchors``)."""
        n = self.run_config.get("train_anchors", 0)
        return n if isinstance(n, int) and n > 0 else 0

    @property
    def base_model(self) -> str:
        return base_model_of_adapter(self.path)


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """The adapter folder, checked (:meth:`Adapter.open`)."""
    return Adapter.open(adapter_dir).path


def adapter_run_config(adapter_dir: str | Path) -> dict | None:
    """The run configuration an adapter was trained with: its own run_config.json, else its run
    folder's config.json; None when neither can be read."""
    folder = Path(adapter_dir).expanduser()
    for cand in (folder / RUN_CONFIG, RunFolder(folder.parent).config):
        if cand.is_file():
            try:
                cfg = json.loads(cand.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(cfg, dict):
                return cfg
    return None


def base_model_of_adapter(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on: run_config.json "model", else
    adapter_config.json "base_model_name_or_path"."""
    folder = Path(adapter_dir).expanduser()
    if not folder.exists():
        raise AdapterError(f"adapter folder {folder} does not exist")
    model = (adapter_run_config(folder) or {}).get("model")
    if isinstance(model, str) and model:
        return model
    if (folder / ADAPTER_CONFIG).is_file():
        model = _read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
        if isinstance(model, str) and model:
            return model
    raise AdapterError(
        f"{folder}: cannot tell which base model this adapter belongs to (no {RUN_CONFIG} with \"model\", "
        f"no base_model_name_or_path in {ADAPTER_CONFIG}); pass --base MODEL"
    )


def config_summary(cfg) -> dict:
    get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    text = get("text_config")
    if text is not None and get("hidden_size") is None:  # multimodal configs nest the LM's
        return config_summary(text)
    return {"model_type": get("model_type"), "hidden_size": get("hidden_size"), "vocab_size": get("vocab_size"),
            "num_hidden_layers": get("num_hidden_layers")}


def _describe(summary: dict) -> str:
    return (f"{summary.get('model_type')}, hidden {summary.get('hidden_size')}, vocab {summary.get('vocab_size')}, "
            f"{summary.get('num_hidden_layers')} layers")


def _adapter_base_summary(spec: str) -> dict | None:
    """The config summary of the adapter's base when it is on this machine (without building it)."""
    try:
        if spec.startswith("embedded:"):
            from data.model_zoo import embedded_model

            embedded = embedded_model(spec)
            if embedded is None:
                return None
            folder = embedded.folder()
            if not (folder / "config.json").is_file() and embedded.config is not None:
                return config_summary(embedded.config())  # known without building it
        else:
            folder = Path(spec).expanduser()
        if (folder / "config.json").is_file():
            return config_summary(json.loads((folder / "config.json").read_text()))
    except Exception:  # unknown or unreadable: the weight shapes still get checked
        return None
    return None


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def check_adapter_fits(model, base_model: str, adapter_dir: str | Path, *,
                       base_path: str | Path | None = None) -> None:
    """Refuse (AdapterError) an adapter trained for another base than ``model`` (loaded from
    ``base_model``, found at ``base_path``): compare the adapter's base (run_config model /
    base_model_name_or_path, and its config when it is on this machine) and its LoRA weight shapes
    with the model."""
    folder = Path(adapter_dir)
    summary = config_summary(model.config)
    try:
        claimed = base_model_of_adapter(folder)
    except AdapterError:
        claimed = None
    ours = [base_model] + ([str(base_path)] if base_path is not None else [])
    if claimed is not None and not any(_same_model(claimed, name) for name in ours):
        theirs = _adapter_base_summary(claimed)
        if theirs is not None and any(theirs.get(k) is not None and theirs.get(k) != summary.get(k) for k in theirs):
            raise AdapterError(
                f"adapter {folder} was trained for base model {claimed!r} ({_describe(theirs)}), but the loaded "
                f"base is {base_model!r} ({_describe(summary)}); grade with --base {claimed}"
            )
    # The weights themselves: every LoRA matrix must fit the module it attaches to.
    from safetensors import safe_open

    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            m = re.match(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
            if not m:
                continue
            # Several LoRA'd parameters of one module (target_parameters) nest as base_layer.
            target, which = re.sub(r"(\.base_layer)+$", "", m.group(1)), m.group(2)
            shape = f.get_slice(key).get_shape()
            mod = modules.get(target)
            expected = None
            if mod is not None and hasattr(mod, "in_features"):
                expected = mod.in_features if which == "A" else mod.out_features
                got = shape[1] if which == "A" else shape[0]
            elif mod is None and target in params:  # target_parameters (e.g. GPT-OSS experts)
                continue
            elif mod is None:
                raise AdapterError(
                    f"adapter {folder} attaches to {target}, which the base {base_model!r} "
                    f"({_describe(summary)}) does not have: it was made for {claimed or 'another base model'}"
                )
            if expected is not None and got != expected:
                raise AdapterError(
                    f"adapter {folder} does not fit base {base_model!r} ({_describe(summary)}): "
                    f"{key} has shape {list(shape)}, the base's {target} needs {expected} features; it was "
                    f"trained for {claimed or 'another base model'}"
                )


def grading_unit(adapter_dir: str | Path | None) -> str:
    """How an adapter grades: the ``example_unit`` it was trained with (run_config.json); adapters
    from before item-level training learnt whole grades ("submission"). The base alone grades by
    item: reading a distribution needs no instruction following, and cannot run away."""
    if adapter_dir is None:
        return "item"
    return Adapter(Path(adapter_dir), adapter_run_config(adapter_dir) or {}).unit


def resolve_base(base: str | None, adapter_dir: str | Path | None) -> str:
    """--base if given, else the adapter's run_config model, else the embedded default model."""
    if base:
        return base
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir)
        return base_model_of_adapter(adapter_dir)
    from data.model_zoo import DEFAULT_CPU_MODEL

    return DEFAULT_CPU_MODEL


def export_merged(adapter_dir: str | Path, out_dir: str | Path, *, base_model: str | None = None,
                  trust_remote_code: bool = False) -> Path:
    """Merge the adapter into a fresh copy of its base (merge_and_unload) and save the result as a
    plain model folder (safetensors + tokenizer) that needs no PEFT to load."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.model_zoo import resolve_model_path

    folder = check_adapter_dir(adapter_dir)
    base = resolve_base(base_model, folder)
    path = resolve_model_path(base)
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    check_adapter_fits(model, base, folder, base_path=path)
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code).save_pretrained(str(out))
    (out / "merged_from.json").write_text(json.dumps({"base_model": base, "adapter": str(folder)}, indent=1))
    return out

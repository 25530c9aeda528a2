"""Shared test setup: every test gets its own store and checkpoint folder; slow-to-build
artefacts (offline tokenizer, tiny GPT-OSS, Gemma conversion) are cached in <repo>/.cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
MOHLER = SHARED / "datasets" / "mohler"

os.environ.setdefault("GRADER_CACHE", str(REPO / ".cache"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARTIFACTS = REPO / "tests" / "artifacts"


@pytest.fixture(autouse=True)
def isolated_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh SQLite store and checkpoints folder per test: tests never touch the user's."""
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    monkeypatch.setenv("GRADER_CHECKPOINTS", str(ckpt))
    monkeypatch.setenv("GRADER_DB", str(tmp_path / "studio.db"))
    return tmp_path


@pytest.fixture(scope="session")
def gpt_oss_tokenizer_dir() -> Path:
    """The real o200k_harmony tokenizer, built offline from quicktok-v1 (cached)."""
    from data.tokenizer_offline import build_gpt_oss_tokenizer

    return build_gpt_oss_tokenizer()


@pytest.fixture(scope="session")
def tiny_gpt_oss_dir() -> Path:
    """A tiny GPT-OSS (random weights, real tokenizer) saved as a local model folder (cached)."""
    from data.model_zoo import build_tiny_gpt_oss

    return build_tiny_gpt_oss()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS

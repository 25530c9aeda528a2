"""Where the studio keeps things on disk. One home for every default path.

Each location can be moved with an environment variable, which is how tests (and users with a
separate data disk) point the studio elsewhere without touching code.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def checkpoints_dir() -> Path:
    """Folder that holds one sub-folder per training run (adapters, metrics, logs)."""
    return Path(os.environ.get("GRADER_CHECKPOINTS", REPO_ROOT / "t2l_lora_checkpoints"))


def db_path() -> Path:
    """The SQLite store: datasets, submissions, runs, metrics, checkpoints, grades."""
    return Path(os.environ.get("GRADER_DB", checkpoints_dir() / "studio.db"))


def cache_dir() -> Path:
    """Built artefacts that are slow to make and safe to rebuild: the offline GPT-OSS tokenizer,
    the Gemma 3 270M safetensors conversion, the tiny test GPT-OSS."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grader-studio"
    return Path(os.environ.get("GRADER_CACHE", default))


def samples_dir() -> Path:
    """Sample data written for the studio: graded/, rubrics/, submissions/."""
    return REPO_ROOT / "data" / "samples"

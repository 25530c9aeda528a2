"""Shared test setup: every test gets its own store and checkpoint folder; slow-to-build
artefacts (offline tokenizer, tiny GPT-OSS, Gemma conversion) are cached in <repo>/.cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Third-party data (the Mohler short-answer set) is not in the repository: CI has it in the folder
# beside the clone, a user's fresh clone usually does not. This is the one place that knows where
# it lives; GRADER_SHARED_DATA names another folder that holds datasets/.
SHARED_DATA_ENV = "GRADER_SHARED_DATA"
SHARED_DATA = Path(os.environ.get(SHARED_DATA_ENV) or REPO.parent / "shared")
MOHLER = SHARED_DATA / "datasets" / "mohler"

os.environ.setdefault("GRADER_CACHE", str(REPO / ".cache"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs in parallel workers (pytest.ini): each worker, and every process it starts, gets
# its share of the cores, and torch's threads that wait sleep instead of spinning. With two
# workers of two spinning threads each on two cores, in-process grading tests ran 8-15x slower.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
def gpt_oss_tokenizer(gpt_oss_tokenizer_dir: Path):
    """That tokenizer loaded once per session (~2.5 s a load: 201k entries of JSON), for the tests
    that only encode and decode with it. A test that changes a tokenizer copies it first."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gpt_oss_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_gpt_oss_dir() -> Path:
    """A tiny GPT-OSS (random weights, real tokenizer) saved as a local model folder (cached)."""
    from data.model_zoo import build_tiny_gpt_oss

    return build_tiny_gpt_oss()


@pytest.fixture(scope="session")
def mohler_dir() -> Path:
    """The Mohler dataset folder (json/, markdown/). Where it is absent, a test that asks for it
    skips, saying what is missing and how to point the tests at it."""
    if not (MOHLER / "json").is_dir():
        pytest.skip(f"needs the third-party Mohler dataset: {MOHLER / 'json'} is missing "
                    f"(set {SHARED_DATA_ENV} to the folder that holds datasets/mohler)")
    return MOHLER


# The files whose tests start training runs, app servers or a browser, or train in-process, longest
# first (their times in a two-worker run of the whole suite). The workers take whole files in
# collection order, so these go first: a long file taken last would leave one worker busy and the
# other idle at the end.
LONGEST_FIRST = (
    "test_train_deepspeed.py", "test_ui_client.py", "test_reliability_faults.py", "test_ui_browser.py",
    "test_ui_teacher_loop_browser.py", "test_gpu_fast_path.py", "test_agreement.py", "test_constrained.py",
    "test_reliability_restart.py", "test_packing.py", "test_batch_resume.py", "test_model_zoo.py",
    "test_ui_review_browser.py", "test_infer_engine.py", "test_train_one_run_per_devices.py",
    "test_cli_output.py", "test_reliability_upload.py", "test_anchors.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the third-party data, so `-m needs_shared_data` selects them all
    (tests/test_fresh_clone.py runs them without the data); put the LONGEST_FIRST files first
    (the rest keep their order, and each file's tests stay together and in order)."""
    for item in items:
        if "mohler_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.needs_shared_data)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_shared_data: reads third-party data from GRADER_SHARED_DATA "
                                       "(skipped, with the reason, where it is absent)")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def random_lora_adapter(base_dir: Path, out: Path, seed: int, run_config: dict,
                        target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A LoRA adapter of ``base_dir`` saved as training saves one (with ``run_config`` as its
    run_config.json), its factors random and non-zero so that it changes the scores."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules), init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(out))
    (out / "run_config.json").write_text(json.dumps({"model": str(base_dir), "datasets": [], **run_config}))
    return out


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Workers for `-n auto` (pytest.ini): PYTEST_XDIST_AUTO_NUM_WORKERS if set, else one per core.
    Much of a worker's time is spent waiting for the processes it starts (training ranks, app
    servers, browsers), which take the cores meanwhile. A third worker on 2 cores was faster in a
    warm worktree (729 s against 892 s) but not from a fresh clone (881 and 966 s against 853 s for
    two workers; BENCHMARKS.md, "The suite ... one rank")."""
    return int(os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS") or os.cpu_count() or 1)

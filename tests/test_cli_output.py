"""A CLI's stdout carries only its result, on a machine's first use too (`... | jq` works), and
the launcher keeps repeated library noise out of what it shows of a run's log."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from training.launcher import is_library_noise
from training.presets import PRESETS

SAMPLES = REPO / "data" / "samples"


def run_cli(args: list[str], tmp_path: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, GRADER_CACHE=str(cache), GRADER_DB=str(tmp_path / "studio.db"),
               GRADER_CHECKPOINTS=str(tmp_path / "ck"))
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


def test_grade_on_a_fresh_cache_prints_only_its_json(tmp_path, gpt_oss_tokenizer_dir):
    """First use: the embedded model is built (DeepSpeed gets imported and warns on its own stdout
    handler); stdout is still exactly the grades' JSON."""
    cache = tmp_path / "cache"
    shutil.copytree(gpt_oss_tokenizer_dir, cache / gpt_oss_tokenizer_dir.name)  # the model is not there
    submission = SAMPLES / "submissions" / "algebra-linear-chloe.md"
    proc = run_cli(["inference", "grade", "--base", "embedded:tiny-gpt-oss", "--max-new-tokens", "4",
                    "--rubric", str(SAMPLES / "rubrics" / "algebra-linear.json"), str(submission)], tmp_path, cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (cache / "tiny-gpt-oss" / "config.json").is_file()  # it really was a first use
    grades = json.loads(proc.stdout)  # nothing else on stdout, or this fails
    assert [g["file"] for g in grades] == [str(submission)]


def test_presets_print_only_their_json(tmp_path):
    proc = run_cli(["training", "presets"], tmp_path, tmp_path / "empty-cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {k: json.loads(v.model_dump_json()) for k, v in PRESETS.items()}


def test_library_noise_is_told_from_the_trainers_lines():
    """Lines of real train.logs (2 CPU ranks here, one H200 in bench/results/logs): DeepSpeed's
    one-node chatter and transformers' deprecation notices are noise; the trainer's lines, errors
    and tracebacks are not."""
    noise = [
        "[2026-12-02 03:06:19,681] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile, will "
        "proceed with training with local resources only.",
        "[2026-12-02 03:06:19,162] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to "
        "CPU. If you have GPU or other accelerator, we were unable to detect it.",
        "[2026-12-02 03:06:22,458] [INFO] [launch.py:158:main] nnodes=1, num_local_procs=2, node_rank=0",
        "[2026-11-29 10:50:05,665] [INFO] [launch.py:145:main] 0 NCCL_VERSION=2.28.3-1",
        "[2026-12-02 03:07:07,587] [INFO] [launch.py:285:main] Process 14501 exits successfully.",
        "/work/main/.venv/lib/python3.11/site-packages/transformers/modeling_utils.py:3312: FutureWarning: "
        "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
        "instead.",
        "  warnings.warn(",
        "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    ]
    kept = [
        "[03:06:56] step 1/1 loss 1.3176 lr 2.00e-03 grad_norm 1.005 434 tok/s",
        "[03:06:58] run smoke-20261202-030617 finished",
        "Traceback (most recent call last):",
        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "[2026-12-02 03:07:07,587] [ERROR] [launch.py:321:sigkill_handler] exits with return code = 1",
    ]
    assert [line for line in noise if not is_library_noise(line)] == []
    assert [line for line in kept if is_library_noise(line)] == []


NOISE_TRIGGERS = """
import logging, sys
from inference.__main__ import main as inference_cli
try:
    inference_cli(["grade", "--help"])  # the CLI's start: it quiets the noise before anything loads
except SystemExit:
    pass
print("BEGIN", file=sys.stderr, flush=True)
logging.basicConfig()  # a handler to stderr, as a library's default would print
from deepspeed.launcher.runner import fetch_hostfile
fetch_hostfile("/no/hostfile")  # DeepSpeed's own warning, as one-node runs print it
bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1", ModuleNotFoundError("No module named 'kernels'"))
bnb.warning("a bitsandbytes warning that matters")
"""


def test_known_library_noise_stays_out_of_the_users_terminal(tmp_path, tiny_gpt_oss_dir):
    """#27 item 9: what the terminal shows of a grade with an adapter (PEFT asks transformers for
    the deprecated is_gradient_checkpointing), of bitsandbytes' kernel offer and of DeepSpeed's
    missing-hostfile notice: none of it; other warnings still show."""
    from tests.test_infer_engine import make_adapter

    adapter = make_adapter(tiny_gpt_oss_dir, tmp_path / "adapter", 1)
    proc = run_cli(["inference", "grade", "--adapter", str(adapter), "--device", "cpu",
                    "--rubric", str(SAMPLES / "rubrics" / "algebra-linear.json"),
                    str(SAMPLES / "submissions" / "algebra-linear-chloe.md")], tmp_path, REPO / ".cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is_gradient_checkpointing" not in proc.stderr and "FutureWarning" not in proc.stderr, proc.stderr
    env = dict(os.environ, GRADER_DB=str(tmp_path / "studio.db"), GRADER_CHECKPOINTS=str(tmp_path / "ck"))
    proc = subprocess.run([sys.executable, "-c", NOISE_TRIGGERS], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stderr.split("BEGIN", 1)[1] + proc.stdout
    assert "hostfile" not in shown and "gemm_4bit_forward" not in shown, shown
    assert "a bitsandbytes warning that matters" in shown

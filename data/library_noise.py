"""Library messages known to be harmless that come back on every run, and the one place that keeps
them from the user: `quiet_library_noise()` in each process that loads models (both CLIs, the
app, the trainer's ranks), `is_library_noise(line)` for the logs other processes wrote (what the
launcher and the Train tab show of train.log).

Each was seen on these machines and asks nothing of the user: transformers' `is_gradient_checkpointing`
deprecation (PEFT reads it at every adapter load and evaluation), DeepSpeed's use of a deprecated
torch collective and inductor's notes (every step), bitsandbytes asking for an optional kernel
download on CPUs with AVX512-BF16 (the studio never downloads), and DeepSpeed's launcher chatter on
one node (no hostfile needed there, accelerator detection, INFO lines, each rank's compiled op).
"""
from __future__ import annotations

import logging
import re
import warnings

# Python warnings: (message regex, category).
_WARNINGS = [(r".*all_gather_into_tensor.*deprecated", FutureWarning),
             (r".*is_gradient_checkpointing. is deprecated", FutureWarning),
             (r"(?s).*Online softmax is disabled", UserWarning),
             (r".*TensorFloat32 tensor cores", UserWarning)]
# Log records: logger name -> how the harmless message starts.
_LOG_RECORDS = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
                "DeepSpeed": "Unable to find hostfile"}
# Lines of a log another process wrote (train.log): the same messages as printed, and what Python
# prints under a warning.
_LINES = re.compile(
    r"Unable to find hostfile, will proceed with training with local resources only"
    r"|Setting accelerator to CPU\. If you have GPU"
    r"|^\[[\d\-: ,]+\] \[INFO\] \[(runner|launch)\.py:\d+:main\]"
    r"|/transformers/\S+\.py:\d+: (FutureWarning|DeprecationWarning): "
    r"|^\s+warnings\.warn\($"
    r"|^DeepSpeed deepspeed\.ops\.\S+ built successfully$"
    r"|Failed to load CPU gemm_4bit_forward from kernels-community"
)


class _DropStarting(logging.Filter):
    """Drops the log records whose message starts with ``start``."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_library_noise() -> None:
    """Keep the known harmless library messages out of this process's output (idempotent)."""
    for pattern, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, start in _LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropStarting) and f.start == start for f in logger.filters):
            logger.addFilter(_DropStarting(start))


def is_library_noise(line: str) -> bool:
    """Whether a line of a log (train.log) is one of the known harmless library messages."""
    return _LINES.search(line) is not None

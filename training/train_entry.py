"""The training program the `deepspeed` launcher runs on every rank.

    deepspeed --num_accelerators 2 training/train_entry.py --run_dir RUN_DIR [--resume]

It reads top to bottom: config -> distributed -> data -> model + LoRA -> DeepSpeed -> loop.
Only rank 0 writes metrics, checkpoints and the store. Every rank takes the same decisions (stop,
eval, save) because they are agreed on by one all-reduce per optimizer step.

Run folder (made by `training.launcher`): config.json, ds_config.json, command.txt, train.log,
metrics.jsonl, checkpoint-<step>/, final/.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

# Runnable as a script (the launcher's way): make `training` importable from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import RunConfig, load_config, save_config  # noqa: E402

COMPLETE_MARKER = "complete.json"
STOP_FILE = "STOP"

# Library notices that repeat every step in train.log and mean nothing to the user (seen on the
# CPU runs and on the H200): DeepSpeed's use of a deprecated torch collective, inductor's notes.
for _pattern, _category in [(r".*all_gather_into_tensor.*deprecated", FutureWarning),
                            (r".*is_gradient_checkpointing. is deprecated", FutureWarning),
                            (r"(?s).*Online softmax is disabled", UserWarning),
                            (r".*TensorFloat32 tensor cores", UserWarning)]:
    warnings.filterwarnings("ignore", message=_pattern, category=_category)
# bitsandbytes on a CPU with AVX512-BF16 asks for an optional kernel download (we never download)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class StopRequest:
    """SIGTERM/SIGINT (or a STOP file in the run folder) asks for a stop after the current step."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.signalled = False
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.signalled:
            print(f"received signal {signum}: stopping after this step", flush=True)
        self.signalled = True

    @property
    def requested(self) -> bool:
        return self.signalled or (self.run_dir / STOP_FILE).exists()


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint-<step>/ with its completion marker (half-written ones are ignored)."""
    best: tuple[int, Path] | None = None
    for d in run_dir.glob("checkpoint-*"):
        try:
            step = int(d.name.split("-", 1)[1])
        except ValueError:
            continue
        if (d / COMPLETE_MARKER).is_file() and (best is None or step > best[0]):
            best = (step, d)
    return best[1] if best else None


def lr_lambda(cfg: RunConfig, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def epoch_micro_batches(lengths: list[int], epoch: int, cfg: RunConfig, world: int) -> list[list[int]]:
    """One epoch as a list of global micro-batches (micro_batch * world example indices each).

    Shuffled by (seed, epoch) so a resumed run sees the same order; sorted by length inside
    buckets so padding stays small; wrapped around so every optimizer step is full on every rank.
    """
    n = len(lengths)
    g = cfg.per_device_batch_size * world
    per_step = g * cfg.gradient_accumulation_steps
    steps = math.ceil(n / per_step)
    rng = random.Random(cfg.seed * 1000 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    need = steps * per_step
    order = (order * math.ceil(need / n))[:need]
    bucket = per_step * 8
    micro: list[list[int]] = []
    for start in range(0, need, bucket):
        part = sorted(order[start : start + bucket], key=lambda i: lengths[i])
        micro += [part[i : i + g] for i in range(0, len(part), g)]
    rng.shuffle(micro)
    return micro


def collate(examples: list, pad_id: int, device: torch.device, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch; `width` (when set) is the padded length, else the longest example."""
    width = max([len(e.input_ids) for e in examples] + [width or 0])
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def make_loss_fn(cfg: RunConfig):
    """Mean loss over label tokens: fast_path.compute_loss (chunked CE on GPU) when present and
    enabled, else the model's own loss."""
    if cfg.fast_path:
        try:
            from training.fast_path import compute_loss
        except ImportError:
            compute_loss = None
        if compute_loss is not None:
            # fused=True: the chunked loss over label positions only, also on CPU, where the
            # (tokens x vocab) logits are most of the work (Gemma 270M: 170M of its 268M
            # parameters are the embedding); it equals the model's loss (fast_path's tests).
            return lambda engine, batch: compute_loss(engine.module, batch, fused=True)[0]
    return lambda engine, batch: engine(**batch).loss


def peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 1024**3, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)  # KiB on Linux


def rng_state() -> dict:
    import numpy as np

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` and the folder itself, so a rename publishes complete data."""
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


# --------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = parser.parse_args(argv)

    run_dir = Path(args.run_dir).resolve()
    run_id = run_dir.name
    cfg = load_config(run_dir / "config.json")
    stop = StopRequest(run_dir)

    # Embedded models are built (once, under a file lock) before the process group starts:
    # inside it transformers' save_pretrained writes nothing on ranks other than 0.
    if cfg.model.startswith("embedded:"):
        from data.model_zoo import resolve_model_path

        resolve_model_path(cfg.model)

    # ---- distributed
    import deepspeed
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.local_rank)
        device = torch.device("cuda", args.local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0

    store = None
    if is_main:
        from data.store import Store

        store = Store()
        if store.get_run(run_id) is None:
            store.create_run(run_id, cfg.model_dump(), list(sys.argv), str(run_dir))
        store.set_run_status(run_id, "running")  # the launcher records the pid it started
    try:
        status = train(cfg, run_dir, run_id, args.resume, device, rank, world, stop, store)
    except BaseException as e:  # noqa: BLE001 - any crash must be recorded, then re-raised
        if is_main:
            # The store first: on a full disk writing the traceback to train.log fails too.
            store.set_run_status(run_id, "failed", error=f"{type(e).__name__}: {e}")
            with contextlib.suppress(OSError):
                traceback.print_exc()
        raise
    finally:
        if not use_cuda:  # DeepSpeed's CPU all-reduce segment of this rank (see remove_shm_buffer)
            from training.launcher import remove_shm_buffer

            remove_shm_buffer(os.environ.get("MASTER_PORT"), rank)
    if is_main:
        store.set_run_status(run_id, status)
        log(f"run {run_id} {status}")
    dist.barrier()
    return 0


def load_submissions(cfg: RunConfig) -> list:
    """All graded submissions of cfg.datasets: files/folders (validated) and db:<name> datasets."""
    from data.loading import load_graded

    subs: list = []
    files = [d for d in cfg.datasets if not d.startswith("db:")]
    if files:
        report = load_graded(files)
        if not report.ok:
            raise ValueError("the training data has errors; fix them or drop the file:\n" + report.format())
        subs += report.submissions
    for d in cfg.datasets:
        if d.startswith("db:"):
            from data.store import Store

            store = Store()
            ds = store.find_dataset(d[3:])
            if ds is None:
                names = ", ".join(x["name"] for x in store.list_datasets()) or "none"
                raise ValueError(f"dataset {d[3:]!r} is not in the store (stored: {names})")
            subs += store.dataset_submissions(ds["id"])
    if not subs:
        raise ValueError(f"no graded submissions in {cfg.datasets}")
    return subs


def split_eval(subs: list, cfg: RunConfig) -> tuple[list, list]:
    order = list(range(len(subs)))
    random.Random(cfg.split_seed).shuffle(order)
    n_eval = round(len(subs) * cfg.eval_fraction)
    if cfg.eval_fraction > 0 and len(subs) >= 2:
        n_eval = min(max(1, n_eval), len(subs) - 1)
    else:
        n_eval = 0
    return [subs[i] for i in order[n_eval:]], [subs[i] for i in order[:n_eval]]


def train(cfg: RunConfig, run_dir: Path, run_id: str, resume: bool, device: torch.device, rank: int,
          world: int, stop: StopRequest, store) -> str:
    """The training run; returns the final status ("finished" or "stopped")."""
    import deepspeed
    import torch.distributed as dist
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from training import models
    from data.prompt_format import build_training_examples, detect_format

    is_main = rank == 0
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # ---- data
    train_subs, eval_subs = split_eval(load_submissions(cfg), cfg)

    # ---- model, tokenizer, examples
    t0 = time.time()
    model, tokenizer, model_type, folder = models.load_model_and_tokenizer(cfg, device)
    fmt = detect_format(tokenizer, model_type)
    train_ex, n_trunc = build_training_examples(train_subs, tokenizer, fmt, cfg.max_length)
    eval_ex, n_trunc_eval = build_training_examples(eval_subs, tokenizer, fmt, cfg.max_length) if eval_subs else ([], 0)
    if is_main:
        log(f"model {cfg.model} ({model_type}, {fmt} format) loaded in {time.time() - t0:.1f}s; "
            f"{len(train_ex)} train / {len(eval_ex)} eval examples ({len(train_subs) + len(eval_subs)} "
            f"submissions; {n_trunc + n_trunc_eval} truncated to max_length={cfg.max_length}, "
            f"{len(train_subs) + len(eval_subs) - len(train_ex) - len(eval_ex)} too long to use)")
        log(f"memory held by the base model: {models.quantization_report(model)}")
    model = models.apply_lora(model, cfg, model_type)
    pad_width = None  # one fixed batch width, when the fast path compiles the layers
    if cfg.fast_path:
        try:
            from training import fast_path
        except ImportError:
            fast_path = None
        applied = fast_path.apply(model, cfg) if fast_path else []
        if is_main and applied:
            log(f"fast path: {', '.join(applied)}")
        if "compile_layers" in applied:
            # Compiled decoder layers compile once more for every new sequence length (a 12-layer
            # 20b twin on an H200 spent > 100 s in its first step of 4 micro-batches of different
            # widths); pad every batch of the run to one width: the longest example, rounded up.
            longest = max(len(e.input_ids) for e in train_ex + eval_ex)
            pad_width = min(cfg.max_length, -(-longest // 64) * 64)
            if is_main:
                log(f"compiled layers: every batch padded to {pad_width} tokens (one compiled shape); "
                    "the first step compiles them and takes about a minute, later steps are fast")
    if is_main:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"LoRA r={cfg.lora_r} on {cfg.target_modules}{' + experts' if cfg.lora_experts else ''}: "
            f"{n_train:,} trainable parameters")

    # ---- schedule
    lengths = [len(e.input_ids) for e in train_ex]
    steps_per_epoch = math.ceil(len(train_ex) / (cfg.per_device_batch_size * world * cfg.gradient_accumulation_steps))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    # ---- resume: LoRA weights go in before DeepSpeed copies them into its fp32 partitions
    start_step, elapsed_before, state = 0, 0.0, None
    ckpt = last_complete_checkpoint(run_dir) if resume else None
    if resume and ckpt is None and is_main:
        log("no complete checkpoint to resume from: starting at step 0")
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        if is_main:
            log(f"resuming from {ckpt.name} at step {start_step}/{total_steps}")

    # ---- DeepSpeed (a torch AdamW: a DS "optimizer" block would JIT-compile fused_adam)
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0)
    schedule = lr_lambda(cfg, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    if state is not None:
        opt_states = state["optimizer"]
        if cfg.zero_stage == 0:
            engine.optimizer.load_state_dict(opt_states[0])
        else:
            engine.optimizer.load_state_dict(opt_states, load_optimizer_states=True, load_from_fp32_weights=True)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][rank if rank < len(state["rng"]) else 0])
        if is_main:  # the curve carries on from the checkpoint: drop rows written after it
            _truncate_metrics(run_dir / "metrics.jsonl", start_step)

    loss_fn = make_loss_fn(cfg)
    pad_id = tokenizer.pad_token_id
    lo, hi = rank * cfg.per_device_batch_size, (rank + 1) * cfg.per_device_batch_size

    def evaluate() -> float:
        """Token-weighted eval loss over the whole eval set (every rank runs the same count)."""
        engine.eval()
        g = cfg.per_device_batch_size * world
        n_batches = math.ceil(len(eval_ex) / g)
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for b in range(n_batches):
                idx = list(range(b * g, (b + 1) * g))[lo:hi]
                real = [i for i in idx if i < len(eval_ex)]
                batch = collate([eval_ex[i] for i in (real or [0])], pad_id, device, pad_width)
                n_tok = int((batch["labels"][:, 1:] != -100).sum()) if real else 0
                if n_tok:
                    sums[0] += float(loss_fn(engine, batch)) * n_tok
                    sums[1] += n_tok
                elif cfg.zero_stage == 3:
                    loss_fn(engine, batch)  # ZeRO-3 forwards gather parameters collectively
        dist.all_reduce(sums)
        engine.train()
        return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")

    def write_metrics(row: dict) -> None:
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        store.add_metrics(run_id, [row])

    def save(step: int, name: str | None = None) -> Path | None:
        """checkpoint-<step>/ (or `name`/), written to a temporary folder and renamed when complete."""
        opt_sd = engine.optimizer.state_dict()
        gathered: list | None = [None] * world if is_main else None
        dist.gather_object((opt_sd, rng_state()), gathered, dst=0)
        lora = [p for n, p in engine.module.named_parameters() if "lora_" in n]
        gather_ctx = deepspeed.zero.GatheredParameters(lora) if cfg.zero_stage == 3 else contextlib.nullcontext()
        out = None
        with gather_ctx:
            if is_main:
                out = run_dir / (name or f"checkpoint-{step}")
                tmp = run_dir / f".tmp-{out.name}"
                shutil.rmtree(tmp, ignore_errors=True)
                engine.module.save_pretrained(str(tmp), safe_serialization=True)
                tokenizer.save_pretrained(str(tmp))
                save_config(cfg, tmp / "run_config.json")
                torch.save({
                    "step": step, "epoch": step / steps_per_epoch, "epoch_index": step // steps_per_epoch,
                    "step_in_epoch": step % steps_per_epoch, "total_steps": total_steps,
                    "elapsed_s": elapsed_before + time.time() - t_start,
                    "optimizer": [g[0] for g in gathered], "rng": [g[1] for g in gathered],
                    "scheduler": scheduler.state_dict(), "world_size": world, "zero_stage": cfg.zero_stage,
                }, tmp / "trainer_state.pt")
                (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, "time": time.time()}))
                fsync_tree(tmp)
                if out.exists():
                    old = run_dir / f".old-{out.name}"
                    shutil.rmtree(old, ignore_errors=True)
                    os.rename(out, old)
                    os.rename(tmp, out)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, out)
                _fsync_dir(run_dir)
                store.add_checkpoint(run_id, step, str(out), final=name == "final")
                log(f"saved {out.name} (step {step})")
        dist.barrier()
        return out

    # ---- the loop: one iteration = one optimizer step of `gradient_accumulation_steps` micro-batches
    engine.train()
    t_start = time.time()
    step, samples = start_step, start_step * cfg.per_device_batch_size * world * cfg.gradient_accumulation_steps
    epoch_index, batches = -1, []
    last_saved, stopped = start_step if ckpt else -1, False
    if is_main:
        log(f"training: {total_steps} steps ({steps_per_epoch} per epoch), {world} rank(s), "
            f"ZeRO-{cfg.zero_stage}, micro-batch {cfg.per_device_batch_size} x accumulation "
            f"{cfg.gradient_accumulation_steps}")
    while step < total_steps:
        if step // steps_per_epoch != epoch_index:
            epoch_index = step // steps_per_epoch
            batches = epoch_micro_batches(lengths, epoch_index, cfg, world)
        t_step = time.time()
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, micro count, tokens, stop
        k0 = (step % steps_per_epoch) * cfg.gradient_accumulation_steps
        grad_norm = None
        for k in range(k0, k0 + cfg.gradient_accumulation_steps):
            batch = collate([train_ex[i] for i in batches[k][lo:hi]], pad_id, device, pad_width)
            loss = loss_fn(engine, batch)
            engine.backward(loss)
            if cfg.zero_stage == 0 and k == k0 + cfg.gradient_accumulation_steps - 1:
                # DeepSpeed reports the norm only for its ZeRO/mixed-precision optimizers.
                grads = [p.grad.detach().float().norm() for p in trainable if p.grad is not None]
                grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
            engine.step()
            totals[0] += float(loss.detach())
            totals[1] += 1
            totals[2] += float(batch["attention_mask"].sum())
        step += 1
        samples += cfg.per_device_batch_size * world * cfg.gradient_accumulation_steps
        totals[3] = 1.0 if stop.requested else 0.0
        dist.all_reduce(totals)  # ranks agree on the loss and on stopping (any rank asked -> all stop)
        stopped = totals[3] > 0 and step < total_steps
        if is_main:
            dt = time.time() - t_step
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            row = {
                "kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 4),
                "loss": float(totals[0] / totals[1]), "lr": scheduler.get_last_lr()[0],
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": round(float(totals[2]) / dt, 1), "samples": samples,
                "elapsed_s": round(elapsed_before + time.time() - t_start, 2),
                "peak_mem_gib": peak_mem_gib(device), "total_steps": total_steps,
            }
            write_metrics(row)
            log(f"step {step}/{total_steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                f"grad_norm {row['grad_norm'] or 0:.3f} {row['tokens_per_s']:.0f} tok/s")
        epoch_end = step % steps_per_epoch == 0 or step == total_steps
        if eval_ex and (epoch_end or (cfg.eval_every_steps and step % cfg.eval_every_steps == 0)):
            eval_loss = evaluate()
            if is_main:
                write_metrics({"kind": "eval", "step": step, "epoch": round(step / steps_per_epoch, 4),
                               "eval_loss": eval_loss, "elapsed_s": round(elapsed_before + time.time() - t_start, 2),
                               "total_steps": total_steps})
                log(f"eval loss {eval_loss:.4f} at step {step}")
        if stopped or step % cfg.save_every_steps == 0 or step == total_steps:
            save(step)
            last_saved = step
        if stopped:
            if is_main:
                log(f"stopped at step {step}/{total_steps}; resume with: python -m training run --resume {run_id}")
            break

    if not stopped:
        if last_saved != step:
            save(step)
        save(step, name="final")
    if cfg.debug and not stopped:
        write_debug(engine, eval_ex or train_ex, run_dir, rank, device, pad_id)
    return "stopped" if stopped else "finished"


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if r.get("step", 0) <= step]
    if len(keep) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def write_debug(engine, examples: list, run_dir: Path, rank: int, device: torch.device, pad_id: int) -> None:
    """Test mode: every rank's LoRA hash; rank 0's logits on one example (for the reload check)."""
    from training.models import lora_state_hash

    out = run_dir / "debug"
    out.mkdir(exist_ok=True)
    (out / f"lora_hash_rank{rank}.txt").write_text(lora_state_hash(engine.module))
    engine.eval()
    batch = collate(examples[:1], pad_id, device)
    with torch.no_grad():
        logits = engine.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if rank == 0:
        torch.save({"input_ids": batch["input_ids"].cpu(), "logits": logits.float().cpu()}, out / "reference.pt")


if __name__ == "__main__":
    sys.exit(main())

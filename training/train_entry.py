"""The training program DeepSpeed's launcher runs on every rank (`training.launcher.build_command`):

    python -u -m deepspeed.launcher.launch --world_info W --master_addr A --master_port P \
        training/train_entry.py --run_dir RUN_DIR [--resume]

It reads top to bottom: config -> distributed -> `Trainer`: data -> model + LoRA -> DeepSpeed -> loop
(train_step, evaluate, save_checkpoint; the best validation agreement kept as best/).
Only rank 0 writes metrics, checkpoints and the store. Every rank takes the same decisions (stop,
eval, save) because they are agreed on by one all-reduce per optimizer step.

The run folder's layout (config, checkpoints, best/, final/, metrics, stop file) is owned by
`data.run_folder.RunFolder`; the launcher makes the folder, this program fills it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import random
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Threads waiting for the others sleep instead of spinning (OpenMP reads this when torch loads):
# a CPU rank shares its cores with the other ranks, the launcher and the UI (see inference/engine.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

# Runnable as a script (the launcher's way): make `training` importable from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import RunConfig, load_config, save_config  # noqa: E402
from scoring.head import collate_scores, score_log_probs, soft_cross_entropy  # noqa: E402
from training.batches import (  # noqa: E402
    collate, collate_packed, epoch_micro_batches, example_weight, pack_rows, packed_epoch_micro_batches,
    packed_loss_sum, packing_unsupported,
)
from training.rng import rng_state, set_rng_state  # noqa: E402

from data.run_folder import ADAPTER_WEIGHTS, FINAL, RUN_CONFIG, TRAINER_STATE, TRAINING_PHASE, RunFolder  # noqa: E402

from data.library_noise import quiet_library_noise  # noqa: E402

quiet_library_noise()  # library notices that repeat every step in train.log and mean nothing to the user


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
        return self.signalled or RunFolder(self.run_dir).stop_requested()


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




def peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 1024**3, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)  # KiB on Linux




def cpu_threads_per_rank() -> int:
    """This machine's cores shared among the ranks on it: the deepspeed launcher says how many
    with LOCAL_SIZE (torchrun with LOCAL_WORLD_SIZE). More threads than cores, two ranks of two
    threads on two cores, made a CPU step several times slower."""
    ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, (os.cpu_count() or 1) // max(1, ranks))


# --------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = parser.parse_args(argv)

    run_dir = Path(args.run_dir).resolve()
    run_id = run_dir.name
    cfg = load_config(RunFolder(run_dir).config)
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
        torch.set_num_threads(cpu_threads_per_rank())
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
    dist.destroy_process_group()  # an orderly exit (torch warns about a group left open)
    return 0


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: everything is written and closed by now, and
    unwinding torch, DeepSpeed and the compiled modules took seconds after every run."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


class Trainer:
    """One training run, in named steps (torchtune's recipe shape):
    setup_data -> setup_model -> setup_optimizer -> [train_step, evaluate, save_checkpoint]*.

    Item-level runs (``example_unit="item"``) learn each question's score distribution against the
    human one and are validated by agreement with the humans (MAE, Pearson r, QWK of the expected
    score); the checkpoint with the best validation QWK is kept as ``best/`` with a calibration map
    fitted on that validation set. Submission-level runs learn the whole grade JSON token by token
    and are validated by loss.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, run_id: str, device: torch.device, rank: int, world: int,
                 stop: StopRequest, store) -> None:
        self.cfg, self.run_dir, self.run_id = cfg, run_dir, run_id
        self.device, self.rank, self.world, self.stop, self.store = device, rank, world, stop, store
        self.is_main = rank == 0
        self.items = cfg.example_unit == "item"
        self.pad_width: int | None = None
        self.pack_width: int | None = None  # packed training rows (cfg.pack_sequences), else None
        self.best: dict = {"step": None, "qwk": None, "pearson_r": None}
        # step -> what that step's evaluation fitted for its checkpoint: calibration, review threshold
        self.fitted: dict[int, dict] = {}
        self.elapsed_before = 0.0
        self.t_start = time.time()
        self.phase_now: str | None = None  # the phase noted last (note_phase)

    def note_phase(self, phase: str) -> None:
        """What the run is doing while no step is counted, for the Train tab (rank 0 writes it,
        each change once)."""
        if self.is_main and phase != self.phase_now:
            RunFolder(self.run_dir).note_phase(phase)
            self.phase_now = phase

    # ------------------------------------------------------------------------------- setup
    def setup_data(self) -> None:
        cfg = self.cfg
        from data.split import choose_split, split_questions, split_submissions
        from data.store import load_datasets

        self.note_phase("reading the data")
        subs = load_datasets(cfg.datasets)
        if cfg.validation_datasets:
            self.train_subs, self.eval_subs = subs, load_datasets(cfg.validation_datasets)
            return
        how = choose_split(subs, cfg.example_unit, cfg.eval_split)
        if how == "questions":
            self.train_subs, self.eval_subs, n_held = split_questions(subs, cfg.eval_fraction, cfg.split_seed)
            what = f"{n_held} questions held out (every answer to them), unseen in training"
        else:
            self.train_subs, self.eval_subs = split_submissions(subs, cfg.eval_fraction, cfg.split_seed)
            what = f"{len(self.eval_subs)} submissions held out"
        if self.is_main and self.eval_subs:
            log(f"validation: {what} (eval_split={cfg.eval_split}, eval_fraction={cfg.eval_fraction:g})")

    def setup_model(self) -> None:
        from training import models
        from data.model_zoo import load_phase
        from data.prompt_format import build_score_examples, build_training_examples, detect_format

        cfg = self.cfg
        t0 = time.time()
        self.note_phase(load_phase(cfg.model))
        model, self.tokenizer, model_type, _ = models.load_model_and_tokenizer(cfg, self.device)
        self.fmt = detect_format(self.tokenizer, model_type)
        if self.items:  # anchors drawn within each split: validation never shows training answers
            build = functools.partial(build_score_examples, anchors=cfg.train_anchors)
            self.train_ex, n_cut = build(self.train_subs, self.tokenizer, self.fmt, cfg.max_length, seed=cfg.seed)
            self.eval_ex, n_cut_eval = (build(self.eval_subs, self.tokenizer, self.fmt, cfg.max_length, seed=cfg.seed + 1)
                                        if self.eval_subs else ([], 0))
        else:
            self.train_ex, n_cut = build_training_examples(self.train_subs, self.tokenizer, self.fmt, cfg.max_length)
            self.eval_ex, n_cut_eval = (build_training_examples(self.eval_subs, self.tokenizer, self.fmt, cfg.max_length)
                                        if self.eval_subs else ([], 0))
        if self.is_main:
            unit = "questions" if self.items else "submissions"
            log(f"model {cfg.model} ({model_type}, {self.fmt} format) loaded in {time.time() - t0:.1f}s; "
                f"{len(self.train_ex)} train / {len(self.eval_ex)} validation examples, one per {unit[:-1]} "
                f"({len(self.train_subs)} + {len(self.eval_subs)} submissions; {n_cut + n_cut_eval} cut to "
                f"max_length={cfg.max_length})")
            if cfg.train_anchors:
                shown = [e.n_anchors for e in self.train_ex]
                log(f"teacher anchors: {sum(n > 0 for n in shown)} of {len(shown)} training prompts show other "
                    f"answers of their question with their scores (up to {cfg.train_anchors}, "
                    f"{sum(shown) / max(1, len(shown)):.1f} on average)")
            log(f"memory held by the base model: {models.quantization_report(model)}")
        model = models.apply_lora(model, cfg, model_type)
        if cfg.fast_path:
            from training import fast_path

            applied = fast_path.apply(model, cfg)
            if self.is_main and applied:
                log(f"fast path: {', '.join(applied)}")
            if "compile_layers" in applied:
                # Compiled layers compile again for every new sequence length, minutes of a first
                # step on a handful of widths: one width per run.
                longest = max(len(e.input_ids) for e in self.train_ex + self.eval_ex)
                self.pad_width = min(cfg.max_length, -(-longest // 64) * 64)
        if cfg.pack_sequences != "off":
            why = packing_unsupported(model) or self.choose_pack_width()
            if why and self.is_main:
                log(f"packing off: {why}; training batches are padded as with pack_sequences=off")
        if self.is_main and self.pad_width:
            shapes = (f"training rows packed to {self.pack_width} tokens, validation batches padded to "
                      f"{self.pad_width} ({'one compiled shape' if self.pack_width == self.pad_width else 'two compiled shapes'})"
                      if self.pack_width else
                      f"every batch padded to {self.pad_width} tokens (one compiled shape)")
            log(f"compiled layers: {shapes}; the first step compiles them and takes about a minute, "
                "later steps are fast")
        self.model = model
        if self.is_main:
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log(f"LoRA r={cfg.lora_r} on {cfg.target_modules}{' + experts' if cfg.lora_experts else ''}: "
                f"{n_train:,} trainable parameters")

    def setup_optimizer(self, resume: bool) -> None:
        """DeepSpeed around a torch AdamW (a DS "optimizer" block would JIT-compile fused_adam);
        on resume the LoRA weights go in before DeepSpeed copies them into its fp32 partitions."""
        import deepspeed
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        cfg = self.cfg
        per_step = cfg.per_device_batch_size * self.world * cfg.gradient_accumulation_steps
        self.lengths = [len(e.input_ids) for e in self.train_ex]
        self.weights = [example_weight(e, self.items) for e in self.train_ex]
        if self.pack_width:  # the row count depends only on the lengths: the same every epoch
            self.steps_per_epoch = len(self.epoch_plan(0)) // cfg.gradient_accumulation_steps
            if self.is_main:
                log(self.packing_report())
        else:
            self.steps_per_epoch = math.ceil(len(self.train_ex) / per_step)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.start_step, state = 0, None
        self.resumed_from = RunFolder(self.run_dir).last_complete_checkpoint() if resume else None
        if resume and self.resumed_from is None and self.is_main:
            log("no complete checkpoint to resume from: starting at step 0")
        if self.resumed_from is not None:
            state = torch.load(self.resumed_from / TRAINER_STATE, map_location="cpu", weights_only=False)
            set_peft_model_state_dict(self.model, load_file(str(self.resumed_from / ADAPTER_WEIGHTS)))
            self.start_step, self.elapsed_before = state["step"], state.get("elapsed_s", 0.0)
            self.best = state.get("best", self.best)
            if self.is_main:
                log(f"resuming from {self.resumed_from.name} at step {self.start_step}/{self.total_steps}")
        self.note_phase("starting DeepSpeed")
        ds_config = json.loads(RunFolder(self.run_dir).ds_config.read_text())
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        schedule = lr_lambda(cfg, self.total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        if state is not None:
            opt_states = state["optimizer"]
            if cfg.zero_stage == 0:
                self.engine.optimizer.load_state_dict(opt_states[0])
            else:
                self.engine.optimizer.load_state_dict(opt_states, load_optimizer_states=True, load_from_fp32_weights=True)
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"][self.rank if self.rank < len(state["rng"]) else 0])
            if self.is_main:  # the curve carries on from the checkpoint: drop rows written after it
                RunFolder(self.run_dir).truncate_metrics(after_step=self.start_step)
        self.loss_fn = self._loss_fn()

    def _loss_fn(self):
        if self.items:
            return lambda batch: soft_cross_entropy(score_log_probs(self.engine.module, batch), batch)
        if self.cfg.fast_path:
            from training.fast_path import compute_loss

            # fused=True: the chunked loss over label positions only, also on CPU, where the
            # (tokens x vocab) logits are most of the work (Gemma 270M: 170M of its 268M
            # parameters are the embedding); it equals the model's loss (fast_path's tests).
            return lambda batch: compute_loss(self.engine.module, batch, fused=True)[0]
        return lambda batch: self.engine(**batch).loss

    def epoch_plan(self, epoch: int) -> list:
        """The epoch's global micro-batches: example indices, or rows of them when packing."""
        if self.pack_width:
            return packed_epoch_micro_batches(self.lengths, epoch, self.cfg, self.world, self.pack_width)
        return epoch_micro_batches(self.lengths, epoch, self.cfg, self.world)

    def unpacked_padding(self) -> float:
        """The padding share of epoch 0's unpacked micro-batches (each rank's examples padded to
        their longest, or to the compiled width)."""
        lengths, b = [len(e.input_ids) for e in self.train_ex], self.cfg.per_device_batch_size
        real = padded = 0
        for mb in epoch_micro_batches(lengths, 0, self.cfg, self.world):
            for lo in range(0, len(mb), b):
                part = [lengths[i] for i in mb[lo : lo + b]]
                real += sum(part)
                padded += len(part) * max(part + [self.pad_width or 0])
        return 1 - real / max(1, padded)

    def choose_pack_width(self) -> str | None:
        """Set ``pack_width``: the row width of the two candidates (the longest example rounded
        up to 64, the compiled width; max_length, the tokens per micro-batch the memory check
        budgets for) whose rows pad less. With pack_sequences="auto", packing only when that is
        less padding than the unpacked batches'; else the reason it is not used."""
        cfg = self.cfg
        lengths = [len(e.input_ids) for e in self.train_ex]
        longest = max(len(e.input_ids) for e in self.train_ex + self.eval_ex)
        share = {}
        for w in sorted({self.pad_width or min(cfg.max_length, -(-longest // 64) * 64), cfg.max_length}):
            share[w] = 1 - sum(lengths) / (len(pack_rows(lengths, list(range(len(lengths))), w)) * w)
        width = min(share, key=lambda w: (round(share[w], 3), w))
        unpacked = self.unpacked_padding()
        if cfg.pack_sequences == "auto" and share[width] >= unpacked:
            return (f"packed rows of {width} tokens would pad {share[width]:.0%}, the unpacked batches "
                    f"{unpacked:.0%} (pack_sequences=on packs anyway)")
        self.pack_width = width
        return None

    def packing_report(self) -> str:
        """The packing line of train.log: epoch 0's rows and padding, against the unpacked batches'."""
        cfg, lengths = self.cfg, self.lengths
        packed = self.epoch_plan(0)
        rows = [row for mb in packed for row in mb]
        real = sum(lengths[i] for row in rows for i in row)
        pad_packed = 1 - real / (len(rows) * self.pack_width)
        b = cfg.per_device_batch_size
        unique = len({i for row in rows for i in row})
        repeated = len(rows) - len({tuple(r) for r in rows})
        return (f"packing: {unique:,} examples into {len(rows) - repeated:,} rows of {self.pack_width} tokens"
                f"{f' (+{repeated} repeated to fill the last step)' if repeated else ''}, "
                f"{pad_packed:.0%} padding (unpacked: {self.unpacked_padding():.0%}); "
                f"{self.steps_per_epoch} steps per epoch (unpacked: "
                f"{math.ceil(len(lengths) / (b * self.world * cfg.gradient_accumulation_steps))})")

    def collate(self, examples: list, width: int | None = None) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        if self.items:
            return collate_scores(examples, pad_id, self.device, width)
        return collate(examples, pad_id, self.device, width)

    # ------------------------------------------------------------------------------- steps
    def train_step(self, step: int, batches: list[list[int]]) -> dict:
        """One optimizer step of ``gradient_accumulation_steps`` micro-batches; the metrics row."""
        cfg = self.cfg
        lo, hi = self.rank * cfg.per_device_batch_size, (self.rank + 1) * cfg.per_device_batch_size
        t_step = time.time()
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss sum, micro count, tokens, stop
        k0 = (step % self.steps_per_epoch) * cfg.gradient_accumulation_steps
        grad_norm = None
        if self.pack_width:
            # Every rank knows the whole step's plan: the loss of each micro-batch is its sum over
            # examples (label tokens) scaled so that DeepSpeed's 1/accumulation and its mean over
            # ranks leave the step's gradient = d(sum over the step's examples)/(their count),
            # the gradient of one unpacked batch of the same examples.
            n_norm = sum(self.weights[i] for mb in batches[k0 : k0 + cfg.gradient_accumulation_steps]
                         for row in mb for i in row)
            scale = self.world * cfg.gradient_accumulation_steps / max(1, n_norm)
        for k in range(k0, k0 + cfg.gradient_accumulation_steps):
            if self.pack_width:
                rows = batches[k][lo:hi]
                batch = collate_packed(self.engine.module, self.train_ex, rows, self.pack_width,
                                       self.tokenizer.pad_token_id, self.device, self.items)
                loss_sum, n = packed_loss_sum(self.engine.module, batch, self.items, fused=cfg.fast_path)
                self.engine.backward(loss_sum * scale)
                loss_total, count = float(loss_sum.detach()), n
                n_tokens = sum(self.lengths[i] for row in rows for i in row)
            else:
                batch = self.collate([self.train_ex[i] for i in batches[k][lo:hi]], self.pad_width)
                loss = self.loss_fn(batch)
                self.engine.backward(loss)
                loss_total, count = float(loss.detach()), 1
                n_tokens = float(batch["attention_mask"].sum())
            if cfg.zero_stage == 0 and k == k0 + cfg.gradient_accumulation_steps - 1:
                # DeepSpeed reports the norm only for its ZeRO/mixed-precision optimizers.
                grads = [p.grad.detach().float().norm() for p in self.trainable if p.grad is not None]
                grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
            self.engine.step()
            totals[0] += loss_total
            totals[1] += count
            totals[2] += n_tokens  # real tokens, not padding
        totals[3] = 1.0 if self.stop.requested else 0.0
        import torch.distributed as dist

        dist.all_reduce(totals)  # ranks agree on the loss and on stopping (any rank asked -> all stop)
        self.stop_agreed = bool(totals[3] > 0)
        if grad_norm is None and self.is_main:
            grad_norm = self.engine.get_global_grad_norm()
        n_step = step + 1
        dt = time.time() - t_step
        return {
            "kind": "train", "step": n_step, "epoch": round(n_step / self.steps_per_epoch, 4),
            "loss": float(totals[0] / totals[1]), "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": round(float(totals[2]) / dt, 1),
            "samples": self.samples_seen(step, batches),
            "elapsed_s": self.elapsed(), "peak_mem_gib": peak_mem_gib(self.device), "total_steps": self.total_steps,
        }

    def samples_seen(self, step: int, batches: list) -> int:
        """Examples trained on up to and including ``step`` (packed: counted on this epoch's plan,
        which has the same number of rows every epoch)."""
        cfg = self.cfg
        n_step = step + 1
        if not self.pack_width:
            return n_step * cfg.per_device_batch_size * self.world * cfg.gradient_accumulation_steps
        accum = cfg.gradient_accumulation_steps
        per_mb = [sum(len(row) for row in mb) for mb in batches]
        done_here = (step % self.steps_per_epoch + 1) * accum
        return (step // self.steps_per_epoch) * sum(per_mb) + sum(per_mb[:done_here])

    def _eval_batches(self) -> list[list[int]]:
        """This rank's share of the validation set; every rank runs the same number of batches
        (index -1 pads a short share: ZeRO-3 forwards gather parameters collectively)."""
        g = self.cfg.per_device_batch_size
        mine = list(range(self.rank, len(self.eval_ex), self.world))
        n_batches = math.ceil(math.ceil(len(self.eval_ex) / self.world) / g)
        mine += [-1] * (n_batches * g - len(mine))
        return [mine[b * g : (b + 1) * g] for b in range(n_batches)]

    def evaluate(self, step: int) -> dict:
        """The validation row: loss, and for item-level runs the agreement of the expected score
        with the humans' scores (MAE, Pearson r, QWK)."""
        import torch.distributed as dist

        self.engine.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        preds: list[tuple[int, list[float]]] = []
        with torch.no_grad():
            for idx in self._eval_batches():
                real = [i for i in idx if i >= 0]
                batch = self.collate([self.eval_ex[i] for i in (real or [0])], self.pad_width)
                if self.items:
                    logp = score_log_probs(self.engine.module, batch)
                    if real:
                        sums[0] += float(soft_cross_entropy(logp, batch)) * len(real)
                        sums[1] += len(real)
                        probs = logp.exp().float().cpu().tolist()
                        preds += [(i, p[: len(self.eval_ex[i].value_ids)]) for i, p in zip(real, probs)]
                else:
                    n_tok = int((batch["labels"][:, 1:] != -100).sum()) if real else 0
                    loss = self.loss_fn(batch)
                    if n_tok:
                        sums[0] += float(loss) * n_tok
                        sums[1] += n_tok
        dist.all_reduce(sums)
        gathered: list | None = [None] * self.world if self.is_main else None
        dist.gather_object(preds, gathered, dst=0)
        self.engine.train()
        row = {"kind": "eval", "step": step, "epoch": round(step / self.steps_per_epoch, 4),
               "eval_loss": float(sums[0] / sums[1]) if sums[1] > 0 else float("nan"),
               "elapsed_s": self.elapsed(), "total_steps": self.total_steps}
        if self.is_main and self.items:
            row.update(self._agreement(step, sorted(p for part in gathered for p in part)))
        return row

    def _agreement(self, step: int, preds: list[tuple[int, list[float]]]) -> dict:
        """Agreement of the expected scores with the humans' (items with other maxima on one scale),
        and what this step's checkpoint keeps from them: the calibration map (with whether it
        helps on held-out halves), the review threshold for ``review_target_qwk`` and how much of
        the anchors' suggested score to blend in where prompts showed anchors."""
        from scoring.calibration import fit_anchor_blend, fit_checked_calibration
        from scoring.metrics import scaled_metrics
        from scoring.distribution import expected_score, item_confidence
        from scoring.selective import choose_threshold, coverage_curve

        ex = [self.eval_ex[i] for i, _ in preds]
        pred = [expected_score(p) for _, p in preds]
        human = [e.human_score for e in ex]
        maxes = [e.max_score for e in ex]
        m = scaled_metrics(human, pred, maxes, n_boot=0)
        neighbours = [e.neighbour_score for e in ex]
        blend = fit_anchor_blend(pred, neighbours, human, maxes)
        # the threshold is chosen on the grades and confidences as grading gives them: blend applied
        graded = pred if blend is None else [blend.apply(p, nb, mx) for p, nb, mx in zip(pred, neighbours, maxes)]
        conf = [item_confidence(p, e.neighbour_score, e.nearest_similarity, grade=g)
                for (_, p), e, g in zip(preds, ex, graded)]

        def chosen(with_anchors: bool) -> tuple[dict, list[dict]]:
            # grades compared with anchors have a confidence of their own kind: a threshold of their own
            idx = [i for i, nb in enumerate(neighbours) if (nb is not None) == with_anchors]
            cols = [[col[i] for i in idx] for col in (human, graded, conf, maxes)]
            return choose_threshold(*cols, self.cfg.review_target_qwk), coverage_curve(*cols) if idx else []

        review = chosen(False)  # with no such items: not met, and says why
        anchored = chosen(True) if any(nb is not None for nb in neighbours) else None
        calibration = fit_checked_calibration(pred, human, maxes, seed=self.cfg.seed, groups=[e.question for e in ex])
        self.fitted[step] = {"calibration": calibration, "review": (*review, anchored), "anchor_blend": blend}
        scaled = [p / mx for p, mx in zip(pred, maxes)]
        return {"val_n": len(ex), "val_mae": m["mae"]["value"], "val_pearson_r": m["pearson_r"]["value"],
                "val_qwk": m["qwk"]["value"], "val_pred_sd": round(float(torch.tensor(scaled).std()), 4) if len(ex) > 1 else None,
                "val_review_threshold": review[0]["threshold"], "val_accepted_share": review[0]["coverage"],
                **({"val_review_threshold_anchored": anchored[0]["threshold"],
                    "val_accepted_share_anchored": anchored[0]["coverage"]} if anchored else {})}

    def is_better(self, row: dict) -> bool:
        """Best validation QWK so far (ties: Pearson r); a run without agreement has no best."""
        qwk, r = row.get("val_qwk"), row.get("val_pearson_r")
        if qwk is None:
            return False
        key = (qwk, r if r is not None else -1.0)
        best = (self.best["qwk"], self.best["pearson_r"] if self.best["pearson_r"] is not None else -1.0)
        return self.best["qwk"] is None or key > best

    def save_checkpoint(self, step: int, name: str | None = None) -> Path | None:
        """checkpoint-<step>/ (or ``name``/), written to a temporary folder and renamed when
        complete; with the calibration and review threshold fitted at this step's evaluation."""
        import deepspeed
        import torch.distributed as dist

        from scoring.selective import save_review

        cfg = self.cfg
        opt_sd = self.engine.optimizer.state_dict()
        gathered: list | None = [None] * self.world if self.is_main else None
        dist.gather_object((opt_sd, rng_state()), gathered, dst=0)
        lora = [p for n, p in self.engine.module.named_parameters() if "lora_" in n]
        gather_ctx = deepspeed.zero.GatheredParameters(lora) if cfg.zero_stage == 3 else contextlib.nullcontext()
        out = None
        with gather_ctx:
            if self.is_main:
                folder = RunFolder(self.run_dir)
                name = name or folder.checkpoint(step).name
                tmp = folder.staging(name)
                self.engine.module.save_pretrained(str(tmp), safe_serialization=True)
                self.tokenizer.save_pretrained(str(tmp))
                save_config(cfg, tmp / RUN_CONFIG)
                fitted = self.fitted.get(step, {})
                if fitted.get("calibration") is not None:
                    fitted["calibration"].save(tmp)
                if fitted.get("review") is not None:
                    save_review(tmp, *fitted["review"])
                if fitted.get("anchor_blend") is not None:
                    fitted["anchor_blend"].save(tmp)
                torch.save({
                    "step": step, "epoch": step / self.steps_per_epoch, "epoch_index": step // self.steps_per_epoch,
                    "step_in_epoch": step % self.steps_per_epoch, "total_steps": self.total_steps,
                    "elapsed_s": self.elapsed(), "best": self.best,
                    "optimizer": [g[0] for g in gathered], "rng": [g[1] for g in gathered],
                    "scheduler": self.scheduler.state_dict(), "world_size": self.world, "zero_stage": cfg.zero_stage,
                }, tmp / TRAINER_STATE)
                out = folder.publish(tmp, name, step)
                self.store.add_checkpoint(self.run_id, step, str(out), final=name == FINAL)
                log(f"saved {out.name} (step {step})")
        dist.barrier()
        return out

    def keep_best(self, step: int, row: dict) -> None:
        """Copy checkpoint-<step>/ to best/ (rank 0), noting why."""
        self.best = {"step": step, "qwk": row.get("val_qwk"), "pearson_r": row.get("val_pearson_r")}
        if self.is_main:
            folder = RunFolder(self.run_dir)
            folder.save_best(folder.checkpoint(step), best=self.best)
            log(f"best validation agreement so far (QWK {_fmt(row.get('val_qwk'))}, r {_fmt(row.get('val_pearson_r'))}): "
                f"checkpoint-{step} kept as best/")

    def elapsed(self) -> float:
        return round(self.elapsed_before + time.time() - self.t_start, 2)

    def write_metrics(self, row: dict) -> None:
        RunFolder(self.run_dir).append_metrics(row)
        self.store.add_metrics(self.run_id, [row])

    # ------------------------------------------------------------------------------- the loop
    def train(self) -> str:
        """Train to the end (or a stop request); the final status ("finished" or "stopped")."""
        cfg = self.cfg
        self.engine.train()
        self.t_start = time.time()
        step, epoch_index, batches = self.start_step, -1, []
        last_saved = self.start_step if self.resumed_from else -1
        stopped = False
        if self.is_main:
            log(f"training: {self.total_steps} steps ({self.steps_per_epoch} per epoch), {self.world} rank(s), "
                f"ZeRO-{cfg.zero_stage}, micro-batch {cfg.per_device_batch_size}{' packed rows' if self.pack_width else ''} x accumulation "
                f"{cfg.gradient_accumulation_steps}")
        self.note_phase("first step: compiling the layers" if self.pad_width else TRAINING_PHASE)
        while step < self.total_steps:
            if step // self.steps_per_epoch != epoch_index:
                epoch_index = step // self.steps_per_epoch
                batches = self.epoch_plan(epoch_index)
            row = self.train_step(step, batches)
            step += 1
            stopped = self.stop_agreed and step < self.total_steps
            if self.is_main:
                self.write_metrics(row)
                log(f"step {step}/{self.total_steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                    f"grad_norm {row['grad_norm'] or 0:.3f} {row['tokens_per_s']:.0f} tok/s")
            better = False
            epoch_end = step % self.steps_per_epoch == 0 or step == self.total_steps
            if self.eval_ex and (epoch_end or (cfg.eval_every_steps and step % cfg.eval_every_steps == 0)):
                self.note_phase(f"evaluating at step {step}")
                ev = self.evaluate(step)
                if self.is_main:
                    self.write_metrics(ev)
                    agreement = (f"; validation MAE {ev['val_mae']:.3f} r {_fmt(ev['val_pearson_r'])} QWK {_fmt(ev['val_qwk'])}"
                                 if "val_qwk" in ev else "")
                    log(f"eval loss {ev['eval_loss']:.4f} at step {step}{agreement}")
                flag = torch.tensor([1.0 if (self.is_main and self.is_better(ev)) else 0.0], device=self.device)
                import torch.distributed as dist

                dist.broadcast(flag, src=0)
                better = bool(flag.item() > 0)
            if better or stopped or step % cfg.save_every_steps == 0 or step == self.total_steps:
                self.save_checkpoint(step)
                last_saved = step
            if better:
                self.keep_best(step, ev if self.is_main else {})
            self.note_phase(TRAINING_PHASE)
            if stopped:
                if self.is_main:
                    log(f"stopped at step {step}/{self.total_steps}; resume with: python -m training run --resume {self.run_id}")
                break
        if not stopped:
            if last_saved != step:
                self.save_checkpoint(step)
            self.save_checkpoint(step, name=FINAL)
        if cfg.debug and not stopped:
            write_debug(self.engine, self.eval_ex or self.train_ex, self.run_dir, self.rank, self.device,
                        self.tokenizer.pad_token_id)
        return "stopped" if stopped else "finished"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def train(cfg: RunConfig, run_dir: Path, run_id: str, resume: bool, device: torch.device, rank: int,
          world: int, stop: StopRequest, store) -> str:
    """The training run; returns the final status ("finished" or "stopped")."""
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, run_dir, run_id, device, rank, world, stop, store)
    trainer.setup_data()
    trainer.setup_model()
    trainer.setup_optimizer(resume)
    return trainer.train()


def write_debug(engine, examples: list, run_dir: Path, rank: int, device: torch.device, pad_id: int) -> None:
    """Test mode: every rank's LoRA hash; rank 0's logits on one example (for the reload check)."""
    from training.models import lora_state_hash

    out = RunFolder(run_dir).debug
    out.mkdir(exist_ok=True)
    (out / f"lora_hash_rank{rank}.txt").write_text(lora_state_hash(engine.module))
    engine.eval()
    input_ids = torch.tensor([examples[0].input_ids], device=device)
    with torch.no_grad():
        logits = engine.module(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    if rank == 0:
        torch.save({"input_ids": input_ids.cpu(), "logits": logits.float().cpu()}, out / "reference.pt")


if __name__ == "__main__":
    exit_now(main())

"""A run's batches: which examples form each micro-batch of an epoch (shuffled by seed and epoch,
so a resumed run sees the same order), padded batches, and packed rows (several whole examples a
row, each keeping its own positions and attending only to itself)."""
from __future__ import annotations

import bisect
import math
import random
from typing import Any

import torch

from scoring.head import score_log_probs, score_values
from training.config import RunConfig


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


# ------------------------------------------------------------------------------------ packing
#
# With ``pack_sequences`` each training row holds several whole examples: positions restart at 0
# for every example and the attention mask keeps every example to itself (also in sliding-window
# layers), so each example's hidden states, and so its loss and gradient, are the ones it has
# alone in a right-padded row. transformers detects packed rows from ``position_ids`` only in
# models that pass them to their mask builders: GPT-OSS (5.24) does not, so the trainer builds
# the per-layer-type masks itself with transformers' own mask functions and hands the model the
# prepared mapping, which GPT-OSS and Gemma 3 accept as their ``attention_mask``.

PACKABLE_MODEL_TYPES = {"gpt_oss", "gemma3_text"}  # checked packed == unpacked: tests/test_packing.py


def packing_unsupported(model: Any) -> str | None:
    """Why ``model`` cannot train on packed rows (None: it can)."""
    from scoring.head import base_causal_lm

    cfg = getattr(base_causal_lm(model), "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in PACKABLE_MODEL_TYPES:
        return (f"model type {mtype} is not verified for packed rows (verified: "
                f"{', '.join(sorted(PACKABLE_MODEL_TYPES))})")
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(kinds)} (only full and sliding attention are packed)"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention"
    return None


def pack_rows(lengths: list[int], order: list[int], width: int) -> list[list[int]]:
    """Example indices (``order``, all of them) packed into rows of at most ``width`` tokens:
    best-fit decreasing (longest first, each into the fullest row it still fits; ties keep
    ``order``). An example longer than ``width`` is an error (the encoder cuts to max_length)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    smallest = min((lengths[i] for i in order), default=0)
    for i in sorted(order, key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > width:
            raise ValueError(f"example of {n} tokens does not fit a packed row of {width}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
        else:
            room, r = width, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n >= smallest:
            bisect.insort(free, (room - n, r))
    return rows


def packed_epoch_micro_batches(lengths: list[int], epoch: int, cfg: RunConfig, world: int,
                               width: int) -> list[list[list[int]]]:
    """One epoch as global micro-batches of packed rows (per_device_batch_size * world rows each,
    every row a list of example indices). Shuffled by (seed, epoch) like `epoch_micro_batches`;
    the number of rows depends only on the lengths, so every epoch has the same number of steps;
    wrapped around (rows from the start repeated) so every optimizer step is full on every rank."""
    n = len(lengths)
    rng = random.Random(cfg.seed * 1000 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    rows = pack_rows(lengths, order, width)
    rng.shuffle(rows)
    g = cfg.per_device_batch_size * world
    per_step = g * cfg.gradient_accumulation_steps
    need = math.ceil(len(rows) / per_step) * per_step
    rows = (rows * math.ceil(need / len(rows)))[:need]
    return [rows[i : i + g] for i in range(0, need, g)]


def packed_attention_masks(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """The per-layer-type attention masks of packed rows (as the model's attention implementation
    wants them: eager/sdpa tensors or flex BlockMasks), built by transformers' mask functions from
    ``position_ids`` (a new example wherever the position does not go up by one)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    from scoring.head import base_causal_lm

    lm = base_causal_lm(model)
    config = lm.model.config
    dtype = lm.get_input_embeddings().weight.dtype
    shape = torch.empty((*input_ids.shape, 0), dtype=dtype, device=input_ids.device)  # only shape/dtype are read
    kw = dict(config=config, inputs_embeds=shape, attention_mask=None, cache=None, position_ids=position_ids)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    masks = {"full_attention": create_causal_mask(**kw)}
    if "sliding_attention" in kinds:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
    return masks


def collate_packed(model: Any, examples: list, rows: list[list[int]], width: int, pad_id: int,
                   device: torch.device, items: bool) -> dict[str, torch.Tensor]:
    """Packed rows of ``examples`` (indices per row): input_ids, position_ids (restarting at 0 per
    example; the padding after the last example is a segment of its own), the prepared masks; for
    submission examples ``labels`` (-100 at each example's first token, so no example predicts
    across a boundary), for score examples ``score_row``/``score_pos`` (the token that predicts
    the score) and the values/targets, one row per example as `collate_scores` has them."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    score_row, score_pos, members = [], [], []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e = examples[i]
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            pos[r, at : at + n] = torch.arange(n)
            if items:
                score_row.append(r)
                score_pos.append(at + n - 1)
                members.append(e)
            else:
                labels[r, at + 1 : at + n] = torch.tensor(e.labels[1:])
            at += n
        pos[r, at:] = torch.arange(width - at)
    ids, pos = ids.to(device), pos.to(device)
    batch = {"input_ids": ids, "position_ids": pos, "attention_mask": packed_attention_masks(model, ids, pos)}
    if not items:
        batch["labels"] = labels.to(device)
        return batch
    batch.update(score_row=torch.tensor(score_row), score_pos=torch.tensor(score_pos), **score_values(members))
    return {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in batch.items()}


def example_weight(e: Any, items: bool) -> int:
    """What the loss averages over, per example: 1 (item: the mean over examples) or its label
    tokens after the first (submission: the mean over label tokens, as the shifted loss counts)."""
    return 1 if items else sum(1 for t in e.labels[1:] if t != -100)


def packed_loss_sum(model: Any, batch: dict, items: bool, fused: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of the loss over the batch's examples or label tokens, how many): the item loss is
    the soft cross-entropy per example, the submission loss the cross-entropy per label token."""
    if items:
        logp = score_log_probs(model, batch)
        return -(batch["target"] * logp).sum(), int(logp.shape[0])
    from training.fast_path import compute_loss

    mean, n = compute_loss(model, batch, fused=fused)  # fused where the model allows it
    return mean * n, n

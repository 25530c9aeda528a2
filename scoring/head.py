"""The score head: the model's distribution over a question's scores at the score position.

Used by the trainer (item-level loss and validation) and by the grading engine, so a model is
graded exactly the way it was trained: prompts right-padded, the hidden state at each row's score
position through the LM head, a softmax restricted to the question's value tokens 0..max.
"""
from __future__ import annotations

from typing import Any

import torch


def collate_scores(examples: list, pad_id: int, device: torch.device, width: int | None = None) -> dict[str, torch.Tensor]:
    """A batch of :class:`data.prompt_format.ScoreExample`: right-padded prompts (``width``, when
    set, is the padded length), each row's score position, its value tokens (padded, with a
    mask) and, for training, its human distribution over them."""
    width = max([len(e.input_ids) for e in examples] + [width or 0])
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
    last = mask.sum(1) - 1
    batch = dict(input_ids=ids, attention_mask=mask, score_pos=last, **score_values(examples))
    return {k: t.to(device) for k, t in batch.items()}


def score_values(examples: list) -> dict[str, torch.Tensor]:
    """Per example (a row each): its value tokens (padded), their mask and, for training, its
    human distribution over them (``values``, ``value_mask``, ``target``), on the CPU."""
    n_val = max(len(e.value_ids) for e in examples)
    values = torch.zeros((len(examples), n_val), dtype=torch.long)
    value_mask = torch.zeros((len(examples), n_val), dtype=torch.bool)
    target = torch.zeros((len(examples), n_val), dtype=torch.float32)
    for row, e in enumerate(examples):
        v = len(e.value_ids)
        values[row, :v] = torch.tensor(e.value_ids)
        value_mask[row, :v] = True
        if e.target is not None:
            target[row, :v] = torch.tensor(e.target)
    return dict(values=values, value_mask=value_mask, target=target)


def base_causal_lm(model: Any) -> Any:
    """The transformers ``*ForCausalLM`` under any PEFT wrapping (adapters stay active inside)."""
    m = model
    for _ in range(4):
        inner = m.get_base_model() if callable(getattr(m, "get_base_model", None)) else m
        if inner is m:
            break
        m = inner
    return m


def score_log_probs(model: Any, batch: dict) -> torch.Tensor:
    """log p(value) at each row's score position over that row's values only. Only the score
    rows go through the LM head (Gemma's head is 170M of its 268M parameters).

    A packed batch (training: several examples per row) also has ``position_ids`` (restarting at
    each example), a prepared per-layer-type ``attention_mask`` and ``score_row``: the row of each
    example's score position, so the result has one row per example, not per batch row."""
    lm = base_causal_lm(model)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    hidden = lm.model(**kwargs).last_hidden_state
    rows = batch.get("score_row")
    if rows is None:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
    h = hidden[rows, batch["score_pos"]]
    logits = lm.get_output_embeddings()(h).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    picked = torch.gather(logits, 1, batch["values"]).masked_fill(~batch["value_mask"], -1e4)
    return torch.log_softmax(picked, dim=-1)


def soft_cross_entropy(logp: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean over rows of -sum_v q(v) log p(v), q the human distribution."""
    return -(batch["target"] * logp).sum(-1).mean()

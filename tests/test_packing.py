"""Sequence packing (RunConfig.pack_sequences): several whole examples per training row give the
same loss and the same LoRA gradients as the examples alone in right-padded rows (tiny GPT-OSS
with attention sinks and sliding-window layers, and a tiny Gemma 3, fp32 eager on CPU), and a
packed run through the real `deepspeed` launcher finishes and says how much padding it saved."""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.prompt_format import EncodedExample, ScoreExample
from scoring.head import collate_scores, score_log_probs, soft_cross_entropy
from training.config import RunConfig, save_config
from training.overrides import apply_overrides
from training.presets import preset
from training.batches import (
    collate, collate_packed, pack_rows, packed_epoch_micro_batches, packed_loss_sum, packing_unsupported,
)
from tests.conftest import REPO

GRADED = REPO / "data" / "samples" / "graded"


def lora_model(base: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    """LoRA on attention with every factor random (B starts at zero in PEFT: its A would get no
    gradient), so the gradient check covers both factors."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def tiny_gpt_oss() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from data.model_zoo import tiny_gpt_oss_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_gpt_oss_config(), dtype=torch.float32, attn_implementation="eager")
    return lora_model(base, ["q_proj", "k_proj", "v_proj", "o_proj"])


def tiny_gemma3(attn: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=12, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], pad_token_id=0,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    return lora_model(base, ["q_proj", "k_proj", "v_proj", "o_proj"])


def examples(unit: str, vocab: int, n: int = 9, seed: int = 0) -> list:
    """Random token sequences of 8..60 tokens (longer than the sliding windows): score examples
    with 3..5 values and a soft target, or submission examples whose last 3..9 tokens are labels."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(10, vocab) for _ in range(rng.randint(8, 60))]
        if unit == "item":
            k = rng.randint(3, 5)
            t = [rng.random() for _ in range(k)]
            out.append(ScoreExample(input_ids=ids, value_ids=rng.sample(range(10, vocab), k), max_score=k - 1,
                                    target=[x / sum(t) for x in t]))
        else:
            m = rng.randint(3, 9)
            out.append(EncodedExample(input_ids=ids, labels=[-100] * (len(ids) - m) + ids[-m:],
                                      prompt_len=len(ids) - m, truncated=False))
    return out


def unpacked_loss(model, exs: list, unit: str) -> torch.Tensor:
    """The trainer's loss without packing: every example alone in a right-padded row."""
    if unit == "item":
        batch = collate_scores(exs, 0, torch.device("cpu"))
        return soft_cross_entropy(score_log_probs(model, batch), batch)
    return model(**collate(exs, 0, torch.device("cpu"))).loss


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def check_packed_equals_unpacked(model, unit: str, vocab: int, width: int = 128) -> int:
    exs = examples(unit, vocab)
    model.zero_grad()
    ref = unpacked_loss(model, exs, unit)
    ref.backward()
    ref_grads = lora_grads(model)

    rows = pack_rows([len(e.input_ids) for e in exs], list(range(len(exs))), width)
    assert len(rows) < len(exs)  # several examples share rows (the point of the check)
    model.zero_grad()
    # Two micro-batches of rows, summed and divided by the count over both: the trainer's
    # gradient accumulation, whatever the number of examples in each.
    total, count = 0.0, 0
    parts = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    n_all = sum((1 if unit == "item" else sum(t != -100 for t in exs[i].labels[1:])) for r in rows for i in r)
    for part in parts:
        batch = collate_packed(model, exs, part, width, 0, torch.device("cpu"), unit == "item")
        s, n = packed_loss_sum(model, batch, unit == "item", fused=True)
        (s / n_all).backward()
        total, count = total + float(s.detach()), count + n
    assert count == n_all
    torch.testing.assert_close(torch.tensor(total / count), ref.detach(), rtol=1e-5, atol=1e-6)
    grads = lora_grads(model)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    return len(rows)


@pytest.mark.parametrize("unit", ["item", "submission"])
def test_packed_rows_give_the_unpacked_loss_and_gradients_on_gpt_oss(unit):
    model = tiny_gpt_oss()
    assert packing_unsupported(model) is None
    check_packed_equals_unpacked(model, unit, vocab=201088)
    # The check can fail: GPT-OSS (transformers 5.24) does not build the packed mask from
    # position_ids itself; the rows with positions but no prepared masks let each example see the
    # ones before it in its row, and give another loss.
    exs = examples(unit, 201088)
    rows = pack_rows([len(e.input_ids) for e in exs], list(range(len(exs))), 128)
    batch = collate_packed(model, exs, rows, 128, 0, torch.device("cpu"), unit == "item")
    with torch.no_grad():
        s, n = packed_loss_sum(model, batch, unit == "item")
        leaky = dict(batch, attention_mask=None)
        s_leaky, _ = packed_loss_sum(model, leaky, unit == "item")
    assert abs(float(s_leaky) - float(s)) / n > 1e-3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("unit", ["item", "submission"])
def test_packed_rows_give_the_unpacked_loss_and_gradients_on_gemma3(unit, attn):
    model = tiny_gemma3(attn)
    assert packing_unsupported(model) is None
    check_packed_equals_unpacked(model, unit, vocab=512)


def test_a_model_not_verified_for_packing_is_refused_with_the_reason():
    from transformers import AutoModelForCausalLM, LlamaConfig

    base = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=2))
    assert "llama is not verified for packed rows" in packing_unsupported(base)


def test_every_epoch_packs_every_example_once_into_full_steps():
    rng = random.Random(3)
    lengths = [rng.randint(20, 600) for _ in range(101)]
    cfg = RunConfig(per_device_batch_size=3, gradient_accumulation_steps=2, seed=5)
    plans = [packed_epoch_micro_batches(lengths, epoch, cfg, 2, 640) for epoch in (0, 1)]
    for plan in plans:
        assert all(len(mb) == 6 for mb in plan) and len(plan) % 2 == 0  # full steps on both ranks
        rows = [row for mb in plan for row in mb]
        assert all(sum(lengths[i] for i in row) <= 640 for row in rows)
        seen = [i for row in rows for i in row]
        assert set(seen) == set(range(101))  # every example; repeats only to fill the last step
        assert len(rows) - len({tuple(r) for r in rows}) < 6 * 2
    assert len(plans[0]) == len(plans[1]) and plans[0] != plans[1]  # same step count, new order
    packed_tokens = 640 * len({tuple(r) for mb in plans[0] for r in mb})
    assert sum(lengths) / packed_tokens > 0.9  # best-fit decreasing leaves little padding
    with pytest.raises(ValueError, match="does not fit a packed row of 640"):
        pack_rows([700], [0], 640)


def test_packed_item_run_through_the_deepspeed_launcher(tmp_path, tiny_gpt_oss_dir):
    """The smoke preset (tiny GPT-OSS, 2 gloo ranks, ZeRO-2), item-level, packed, 2 steps (~8 s each on
    2 cores: 8 rows of 1536 tokens)."""
    files = sorted(GRADED.rglob("*.json"))[::5][:6]
    cfg = apply_overrides(preset("smoke"), [
        "datasets=" + __import__("json").dumps([str(f) for f in files]), "eval_fraction=0.2", "eval_split=submissions",
        "max_steps=2",
        "save_every_steps=10", "gradient_accumulation_steps=2", "pack_sequences=on", "name=packed",
    ])
    cfg_file = tmp_path / "cfg.json"
    save_config(cfg, cfg_file)
    proc = subprocess.run([sys.executable, "-m", "training", "run", "--config", str(cfg_file)], cwd=REPO,
                          env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    log = (run_dir / "train.log").read_text()
    m = re.search(r"packing: ([\d,]+) examples into ([\d,]+) rows of (\d+) tokens.*?, (\d+)% padding "
                  r"\(unpacked: (\d+)%\)", log)
    assert m, log[-3000:]
    # Item prompts of ~450 tokens, three to a row of max_length=1536 (CPU: no compiled width, so
    # the unpacked, length-bucketed batches pad little too; the log says both)
    assert int(m.group(2).replace(",", "")) * 2 < int(m.group(1).replace(",", ""))
    assert m.group(3) == "1536" and int(m.group(4)) < 25
    from data.run_folder import RunFolder

    train = [r for r in RunFolder(run_dir).read_metrics() if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in train)
    # more examples per step than per_device_batch_size x ranks x accumulation (2 x 2 x 2)
    assert train[-1]["samples"] > len(train) * 8
    assert train[-1]["epoch"] > 1  # 22 examples, fewer rows: an epoch is under 2 steps


def test_a_run_saved_before_packing_resumes_unpacked(tmp_path):
    """Resuming a run whose config.json predates packing keeps its plan (and steps per epoch)."""
    import json

    from training.config import RunConfig, save_config
    from training.launcher import resumed_config

    old = tmp_path / "old.json"
    data = json.loads(RunConfig(name="old").model_dump_json())
    data.pop("pack_sequences")
    old.write_text(json.dumps(data))
    assert resumed_config(old).pack_sequences == "off"
    new = tmp_path / "new.json"
    save_config(RunConfig(name="new", pack_sequences="on"), new)
    assert resumed_config(new).pack_sequences == "on"

"""Grading quality on real data: Gemma 3 270M + LoRA on the Mohler short-answer set, evaluated on
assignments (and questions) never seen in training.

    python bench/mohler_quality.py [--data ../shared/datasets/mohler/json] [--gguf FILE | --model SPEC]
                                   [--out DIR] [--configs soft,hard,strong-reg] [--epochs 4]

Design (see BENCHMARKS.md for the figures):
- Split by assignment, near-duplicate questions on one side (the data's README lists the pairs:
  exam a11 re-asks a02/a03/a04 questions, exam a12 re-asks a05-a10 ones). That leaves three
  linked groups: train = a05-a10 + a12, validation = a01 (epoch/config choice), test = a02-a04 + a11.
  Items whose answer text was lost are left out.
- One example per item: a one-question rubric (question, max 5, reference answer) and the answer
  rendered as the student's Markdown, encoded with the project's prompt format
  (data.prompt_format.encode_prompt); the model reads up to the item's `"score":` in the grade
  JSON (data.prompt_format.target_text), i.e. exactly where the grader writes the score.
- Score = expected value over the digits 0..5 at that position (softmax restricted to them):
  a continuous score that uses the whole distribution, not just the greedy digit (reported too).
- Training (in process, LoRA via peft): cross-entropy between that restricted distribution and a
  soft label made of the two human graders' scores (each split linearly between neighbouring
  integers, so its expectation is the graders' mean). "hard" uses the rounded mean instead.
- Baselines: the same model zero-shot (same scoring), and a constant predictor (training mean).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inference.metrics import compute_metrics, format_table  # noqa: E402
from data.prompt_format import detect_format, encode_prompt, target_text  # noqa: E402
from data.rubric import Grade, GradeItem, Rubric, RubricQuestion  # noqa: E402

TRAIN = ["a05", "a06", "a07", "a08", "a09", "a10", "a12"]
VAL = ["a01"]
TEST = ["a02", "a03", "a04", "a11"]
MAX = 5.0


@dataclass
class Item:
    assignment: str
    qid: str
    question: str
    reference: str
    answer: str
    score: float  # the data's item score (graders' mean rounded to 0.5)
    graders: list[float]
    ids: list[int] = field(default_factory=list)


@dataclass
class Config:
    name: str
    lr: float = 2e-4
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    weight_decay: float = 0.01
    epochs: int = 4
    batch: int = 16
    labels: str = "soft"  # soft: both graders; hard: rounded mean
    mse: float = 0.0  # weight of an extra squared error between the expected score and the label's
    seed: int = 0


CONFIGS = {
    "soft": Config("soft"),
    "hard": Config("hard", labels="hard"),
    "strong-reg": Config("strong-reg", lr=1e-4, r=8, alpha=16, dropout=0.2, weight_decay=0.1),
    "soft-lr1e-4": Config("soft-lr1e-4", lr=1e-4),
    "soft-mse": Config("soft-mse", mse=0.25),
}


def render_item_markdown(qid: str, question: str, answer: str) -> str:
    """The one-question submission, in the render style of data.markdown."""
    try:
        from data.markdown import render_submission_markdown
        from data.rubric import GradedSubmission

        sub = GradedSubmission(
            score=0, max_score=MAX,
            rubric_alignment=[{"question": question, "answer": answer, "score": 0, "max_score": MAX, "question_id": qid}],
        )
        return render_submission_markdown(sub)
    except ImportError:
        return f"## Question {qid}: {question}\n\n{answer}\n\n"


def load_items(data_dir: Path) -> list[Item]:
    items = []
    for f in sorted(data_dir.glob("*.json")):
        d = json.loads(f.read_text())
        for it in d["rubric_alignment"]:
            if it.get("answer_text_lost") or not it["answer"].strip():
                continue
            items.append(
                Item(d["assignment"], str(it["question_id"]), it["question"], it.get("reference_answer") or "",
                     it["answer"], float(it["score"]), [float(g) for g in it.get("grader_scores") or [it["score"]]])
            )
    return items


def score_prefix(tokenizer, fmt: str, item: Item) -> list[int]:
    """Prompt tokens + the grade JSON up to the item's score: the model's next token is the score."""
    rubric = Rubric(questions=[RubricQuestion(question=item.question, max_score=MAX,
                                              reference_answer=item.reference or None, question_id=item.qid)])
    md = render_item_markdown(item.qid, item.question, item.answer)
    prompt = encode_prompt(tokenizer, fmt, rubric, md)
    grade = Grade(score=item.score, max_score=MAX, feedback="",
                  items=[GradeItem(question=item.question, score=item.score, max_score=MAX)])
    target = target_text(grade, rubric)
    m = re.search(r'"score"\s*:\s*', target)
    if m is None:
        raise SystemExit(f"target_text has no \"score\": key: {target[:200]}")
    prefix = target[: m.end()]
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
    full_ids = tokenizer.encode(target, add_special_tokens=False)
    if full_ids[: len(prefix_ids)] != prefix_ids:
        raise SystemExit("the score prefix does not tokenize as a prefix of the target; adjust the cut")
    return prompt + prefix_ids


def soft_label(item: Item, mode: str) -> np.ndarray:
    q = np.zeros(6)
    scores = item.graders if mode == "soft" else [item.score]
    for s in scores:
        s = min(max(s, 0.0), MAX)
        lo = int(math.floor(s))
        frac = s - lo
        q[lo] += (1 - frac) / len(scores)
        if frac > 0:
            q[lo + 1] += frac / len(scores)
    return q


def batches(n: int, size: int, shuffle: bool, rng: random.Random):
    idx = list(range(n))
    if shuffle:
        rng.shuffle(idx)
    for i in range(0, n, size):
        yield idx[i : i + size]


def collate(seqs: list[list[int]], pad_id: int, device):
    """Right padding: no query row is fully masked (left padding gives pad rows with no key to
    attend to, whose NaNs reach the LoRA gradients through 0 * NaN)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for k, s in enumerate(seqs):
        ids[k, : len(s)] = torch.tensor(s)
        mask[k, : len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in seqs])
    return ids.to(device), mask.to(device), last.to(device)


def digit_logits(model, seqs, pad_id, digit_ids, device, amp) -> torch.Tensor:
    """Logits of the digits 0..5 at each sequence's last position (the score position): the
    final hidden state there times the LM head's digit rows (the full 262k-vocab head is skipped)."""
    ids, mask, last = collate(seqs, pad_id, device)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        h = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    h_last = h[torch.arange(len(seqs), device=device), last].float()
    w = causal_lm.get_output_embeddings().weight[digit_ids].float()
    logits = h_last @ w.T
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


def length_batches(items: list, size: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar length (little padding), in random order."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i].ids), rng.random()))
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(chunks)
    return chunks


@torch.no_grad()
def predict(model, items: list[Item], pad_id, digit_ids, device, amp, batch=32) -> tuple[np.ndarray, np.ndarray]:
    """(expected value, greedy digit) per item."""
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))  # less padding
    ev = np.zeros(len(items))
    greedy = np.zeros(len(items))
    vals = torch.arange(6, dtype=torch.float32, device=device)
    for i in range(0, len(order), batch):
        chunk = order[i : i + batch]
        p = torch.softmax(digit_logits(model, [items[k].ids for k in chunk], pad_id, digit_ids, device, amp), -1)
        ev[chunk] = (p * vals).sum(-1).cpu().numpy()
        greedy[chunk] = p.argmax(-1).float().cpu().numpy()
    return ev, greedy


def metrics_of(items: list[Item], pred: np.ndarray, n_boot: int) -> dict:
    return compute_metrics([it.score for it in items], pred, MAX, 0.5, n_boot=n_boot)


def train_config(base, cfg: Config, train: list[Item], val: list[Item], test: list[Item], pad_id, digit_ids,
                 device, amp, log, n_boot) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch)
    warm = max(1, int(0.05 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    labels = torch.tensor(np.stack([soft_label(it, cfg.labels) for it in train]), dtype=torch.float32)
    rng = random.Random(cfg.seed)
    epochs = []
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.time()
        tokens = 0
        losses = []
        for b in length_batches(train, cfg.batch, rng):
            seqs = [train[k].ids for k in b]
            tokens += sum(len(s) for s in seqs)
            logp = torch.log_softmax(digit_logits(model, seqs, pad_id, digit_ids, device, amp), -1)
            q = labels[b].to(device)
            loss = -(q * logp).sum(-1).mean()
            if cfg.mse:
                vals = torch.arange(6, dtype=torch.float32, device=device)
                loss = loss + cfg.mse * ((logp.exp() * vals).sum(-1) - (q * vals).sum(-1)).pow(2).mean()
            if not torch.isfinite(loss):
                log(f"[{cfg.name}] non-finite loss at step {step}; batch skipped")
                opt.zero_grad(set_to_none=True)
                continue
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
        dt = time.time() - t0
        ev_val, _ = predict(model, val, pad_id, digit_ids, device, amp)
        ev_test, greedy_test = predict(model, test, pad_id, digit_ids, device, amp)
        row = {
            "epoch": epoch, "train_loss": float(np.mean(losses)), "train_s": dt, "tokens_per_s": tokens / dt,
            "val": metrics_of(val, ev_val, 0), "test": metrics_of(test, ev_test, n_boot),
            "test_greedy": metrics_of(test, greedy_test, 0), "test_pred": ev_test.tolist(),
        }
        epochs.append(row)
        log(f"[{cfg.name}] epoch {epoch}: loss {row['train_loss']:.3f} {row['tokens_per_s']:.0f} tok/s "
            f"val r {row['val']['pearson_r']['value']} qwk {row['val']['qwk']['value']:.3f} | "
            f"test r {row['test']['pearson_r']['value']:.3f} qwk {row['test']['qwk']['value']:.3f} "
            f"mae {row['test']['mae']['value']:.3f} (greedy qwk {row['test_greedy']['qwk']['value']:.3f})")
    model.unload()  # the base is shared by the next config: take LoRA layers out again
    del model, opt
    # Choice by validation only (never test): the epoch with the best validation r.
    best = max(epochs, key=lambda e: (e["val"]["pearson_r"]["value"] or -1))
    return {"config": cfg.__dict__, "epochs": epochs, "best_epoch": best["epoch"]}


def load_model(args, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32
    if args.gguf:
        gguf = Path(args.gguf)
        tok = (AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer
               else AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        if args.save_base:  # for bench/grading_speed.py in the same device session
            model.save_pretrained(args.save_base, safe_serialization=True)
            tok.save_pretrained(args.save_base)
    else:
        from data.model_zoo import resolve_model_path

        path = resolve_model_path(args.model)
        tok = AutoTokenizer.from_pretrained(args.tokenizer or str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device), tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "mohler" / "json"))
    ap.add_argument("--gguf", help="a Gemma GGUF file (the device path); else --model")
    ap.add_argument("--model", default="embedded:gemma-3-270m")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    ap.add_argument("--save-base", help="also save the loaded base model here")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--configs", default="soft,soft-mse,hard,strong-reg")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--limit", type=int, default=0, help="items per split (smoke runs)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--time-budget-s", type=float, default=1e9, help="skip configs that would not fit")
    args = ap.parse_args(argv)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_f = open(out / "mohler_quality.log", "a")

    def log(msg: str) -> None:
        line = f"[{time.time() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        log_f.write(line + "\n")
        log_f.flush()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    items = load_items(Path(args.data))
    split = {"train": [i for i in items if i.assignment in TRAIN], "val": [i for i in items if i.assignment in VAL],
             "test": [i for i in items if i.assignment in TEST]}
    if args.limit:
        rng = random.Random(0)
        split = {k: rng.sample(v, min(args.limit, len(v))) for k, v in split.items()}
    log(f"items: " + ", ".join(f"{k} {len(v)} ({len({(i.qid) for i in v})} questions)" for k, v in split.items()))

    model, tok = load_model(args, device)
    log(f"model loaded on {device} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params)")
    fmt = detect_format(tok, getattr(model.config, "model_type", None))
    digit_ids = []
    for d in range(6):
        ids = tok.encode(str(d), add_special_tokens=False)
        if len(ids) != 1:
            raise SystemExit(f"digit {d} is not one token ({ids}); this benchmark assumes it is")
        digit_ids.append(ids[0])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    for its in split.values():
        for it in its:
            it.ids = score_prefix(tok, fmt, it)
    lens = [len(i.ids) for its in split.values() for i in its]
    log(f"format {fmt}; prompt+prefix tokens: mean {np.mean(lens):.0f}, max {max(lens)}")
    example = split["test"][0]
    (out / "mohler_example_prompt.txt").write_text(tok.decode(example.ids))

    train, val, test = split["train"], split["val"], split["test"]
    train_mean = float(np.mean([i.score for i in train]))
    report: dict = {
        "command": "python bench/mohler_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if amp else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "split": {"train": TRAIN, "val": VAL, "test": TEST, **{f"n_{k}": len(v) for k, v in split.items()},
                  "n_test_questions": len({i.qid for i in test})},
        "format": fmt, "train_mean": train_mean,
    }
    t0 = time.time()
    ev0, greedy0 = predict(model, test, pad_id, digit_ids, device, amp)
    report["zero_shot"] = {"test": metrics_of(test, ev0, args.n_boot), "test_greedy": metrics_of(test, greedy0, 0),
                           "eval_s": time.time() - t0}
    report["constant"] = {"test": metrics_of(test, np.full(len(test), train_mean), args.n_boot)}
    log(f"zero-shot test: r {report['zero_shot']['test']['pearson_r']['value']} "
        f"qwk {report['zero_shot']['test']['qwk']['value']:.3f} mae {report['zero_shot']['test']['mae']['value']:.3f}; "
        f"constant {train_mean:.2f}: mae {report['constant']['test']['mae']['value']:.3f}")

    def save() -> None:
        slim = json.loads(json.dumps(report))
        for run in slim.get("runs", []):
            for e in run["epochs"]:
                e.pop("test_pred", None)
        (out / "mohler_quality.json").write_text(json.dumps(slim, indent=1))

    save()
    report["runs"] = []
    per_config_s = None
    for name in args.configs.split(","):
        cfg = Config(**{**CONFIGS[name].__dict__})
        if args.epochs:
            cfg.epochs = args.epochs
        left = args.time_budget_s - (time.time() - t_start)
        if per_config_s is not None and per_config_s * cfg.epochs > left:
            log(f"skipping {name}: ~{per_config_s * cfg.epochs:.0f}s needed, {left:.0f}s left")
            continue
        t0 = time.time()
        run = train_config(model, cfg, train, val, test, pad_id, digit_ids, device, amp, log, args.n_boot)
        per_config_s = (time.time() - t0) / cfg.epochs
        report["runs"].append(run)
        save()

    rows = {"constant (train mean)": report["constant"]["test"], "zero-shot (expected value)": report["zero_shot"]["test"],
            "zero-shot (greedy digit)": report["zero_shot"]["test_greedy"]}
    best_preds = []
    for run in report["runs"]:
        e = run["epochs"][run["best_epoch"] - 1]
        rows[f"LoRA {run['config']['name']} (epoch {e['epoch']}, by val)"] = e["test"]
        rows[f"LoRA {run['config']['name']} greedy digit"] = e["test_greedy"]
        best_preds.append(np.array(e["test_pred"]))
    if len(best_preds) > 1:
        ens = np.mean(best_preds, axis=0)
        report["ensemble"] = {"test": metrics_of(test, ens, args.n_boot)}
        rows[f"ensemble of {len(best_preds)} configs (mean)"] = report["ensemble"]["test"]
    if report["runs"]:
        # Which config validation would pick: its best epoch's test figures are the headline.
        pick = max(report["runs"], key=lambda r: r["epochs"][r["best_epoch"] - 1]["val"]["pearson_r"]["value"] or -1)
        report["picked_by_val"] = {"config": pick["config"]["name"], "epoch": pick["best_epoch"]}
    table = format_table(rows, f"Mohler item level, test = {', '.join(TEST)} ({len(test)} items, unseen questions)")
    report["table_markdown"] = table
    report["total_s"] = time.time() - t_start
    save()
    (out / "mohler_quality.md").write_text(table + "\n")
    log("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Grading speed: submissions per minute with the real grading path (prompt format, greedy
decoding with the KV cache, repair), one at a time and batched.

    python bench/grading_speed.py [--model embedded:gemma-3-270m] [--n 4] [--batch-sizes 1,4]
                                  [--max-new-tokens 128] [--gpt-oss-20b-shaped] [--out bench/results]

Submissions are the sample Markdown files in data/samples/submissions, each with its rubric from
data/samples/rubrics (file name prefix). Generation runs to a stop token or --max-new-tokens; the retry
that follows an answer without JSON is off here, so the figure is the generation path alone.
--gpt-oss-20b-shaped adds a GPT-OSS-20b-shaped model with random bf16 weights (GPU only): its
output is noise, so every answer runs to --max-new-tokens (a worst case for length).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from inference.engine import SCORINGS, GraderEngine  # noqa: E402
from data.loading import load_rubric  # noqa: E402
from data.markdown import normalize_submission, read_markdown  # noqa: E402


def sample_items(n: int) -> list[tuple[str, str, object]]:
    rubrics = {p.stem: load_rubric(p) for p in sorted((REPO / "data" / "samples" / "rubrics").glob("*.json"))}
    items = []
    for p in sorted((REPO / "data" / "samples" / "submissions").glob("*.md")):
        stem = next((s for s in sorted(rubrics, key=len, reverse=True) if p.stem.startswith(s)), None)
        if stem is None:
            continue
        items.append((p.name, normalize_submission(read_markdown(p), rubrics[stem]), rubrics[stem]))
    # Round-robin over assignments so a handful covers several rubrics.
    by_rubric: dict[int, list] = {}
    for it in items:
        by_rubric.setdefault(id(it[2]), []).append(it)
    mixed = [x for group in zip(*by_rubric.values()) for x in group] + items
    seen, out = set(), []
    for it in mixed:
        if it[0] not in seen:
            seen.add(it[0])
            out.append(it)
    return out[:n]


def measure(engine: GraderEngine, items, batch_sizes, max_new_tokens, scoring="generated") -> list[dict]:
    # The retry that follows an answer without JSON is off: the figure is the generation path alone.
    engine.grade_many(items[:1], adapter=None, batch_size=1, max_new_tokens=8, retry=False)  # warm-up
    rows = []
    for bs in batch_sizes:
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = engine.grade_many(items, adapter=None, scoring=scoring, batch_size=bs, max_new_tokens=max_new_tokens,
                                retry=False)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        new = sum(r.new_tokens for r in res)
        rows.append({
            "model": engine.base_model, "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
            "batch_size": bs, "n": len(items), "seconds": round(dt, 2),
            "submissions_per_min": round(len(items) / dt * 60, 2), "new_tokens": new,
            "new_tokens_per_s": round(new / dt, 1), "mean_prompt_tokens": round(sum(r.prompt_tokens for r in res) / len(res)),
            "valid_json_without_repair": sum(not r.repaired for r in res), "max_new_tokens": max_new_tokens,
            "scoring": scoring,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def gpt_oss_20b_shaped(device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GptOssConfig

    from data.tokenizer_offline import build_gpt_oss_tokenizer

    cfg = GptOssConfig(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)],
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=199998, pad_token_id=199999,
        eos_token_id=[200002, 199999, 200012],
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(str(build_gpt_oss_tokenizer()))
    return GraderEngine("gpt-oss-20b-shaped (random bf16 weights)", model=model, tokenizer=tok)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded:gemma-3-270m")
    ap.add_argument("--device")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gpt-oss-20b-shaped", action="store_true")
    ap.add_argument("--skip-model", action="store_true", help="only the GPT-OSS-shaped run")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--scoring", default="generated", choices=SCORINGS,
                    help="generated: generation alone (the recorded figures); expected adds the expected-score pass")
    args = ap.parse_args(argv)
    items = sample_items(args.n)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    rows = []
    if not args.skip_model:
        engine = GraderEngine(args.model, device=args.device)
        rows += measure(engine, items, sizes, args.max_new_tokens, args.scoring)
        del engine
    if args.gpt_oss_20b_shaped:
        engine = gpt_oss_20b_shaped(args.device or "cuda")
        rows += measure(engine, items, sizes, args.max_new_tokens, args.scoring)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "gpu" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    report = {"command": "python bench/grading_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "device": torch.cuda.get_device_name(0) if dev == "gpu" else f"cpu ({torch.get_num_threads()} threads)",
              "rows": rows}
    (out / f"grading_speed_{dev}.json").write_text(json.dumps(report, indent=1))
    print("| model | device | batch | submissions/min | new tokens/s | mean prompt tokens |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {report['device']} | {r['batch_size']} | {r['submissions_per_min']} | "
              f"{r['new_tokens_per_s']} | {r['mean_prompt_tokens']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

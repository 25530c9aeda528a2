"""Grading speed: submissions per minute through the real grading path, by grading unit.

    python bench/grading_speed.py [--model embedded:gemma-3-270m] [--unit item,submission] [--n 14]
                                  [--batch-sizes 8] [--max-new-tokens 64] [--also-unshared] [--constrained]
                                  [--gpt-oss-20b-shaped] [--skip-model] [--device cpu]
                                  [--out bench/results]

- ``--unit item`` (the default since issue 13; justifications off): each question alone, one
  forward pass to its score position, the expected score from the distribution over 0..max
  (``GraderEngine.grade_items``). No generation. The time split is encode (tokenization, prompt
  rendering) vs model (the forward passes). Each question's prefix shared by the submissions of
  its rubric goes through the model once; ``--also-unshared`` first measures the item unit with
  that off too (every question's whole prompt through the model: the path before issue 14). Tokens/s counts the prompt tokens graded (what the model reads) per second;
  ``model_tokens`` is how many actually went through the model.
- ``--unit submission``: the grade JSON generated whole (greedy, KV cache) and repaired where it
  has to be, then the expected-score pass: the path before issue 13, the baseline row. The time
  split is prefill vs decode vs scoring (parse, repair, expected-score pass); the retry that
  follows an answer without JSON is off, so the figure is one generation per submission. Free
  decoding (the baseline); ``--constrained`` adds a row decoded under the grade schema (xgrammar;
  its budget is raised to what the smallest grade of the rubric takes) with jump-forward over its
  forced spans: ``model_steps`` (forward passes, the prefill included) against ``new_tokens``
  (tokens written) shows the steps saved. Justifications are on: the schema allows them, and a
  model that writes them (a random one always does) writes them until their character bound or
  the token budget closes them.

Submissions are the sample Markdown files in data/samples/submissions (14, five rubrics), each
with its rubric from data/samples/rubrics (file name prefix); ``--n`` above 14 cycles through them
(``--n 64``: a GPU batch of 64). --gpt-oss-20b-shaped adds a GPT-OSS-20b-shaped model with random
bf16 weights (GPU only; eager attention: GPT-OSS refuses sdpa, and the constrained decoder's
position-windowed masks are dense, which flex attention does not take): its free output is noise
that runs to --max-new-tokens (a worst case for length); constrained, it writes justifications of
noise until their bounds or the budget close them, then the grade.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import inference.engine  # noqa: E402,F401  (before torch: it sets the CPU threads' wait policy)
from inference import item_grading  # noqa: E402
from data.loading import load_rubric  # noqa: E402
from data.markdown import normalize_submission, read_markdown  # noqa: E402
from inference.engine import GraderEngine  # noqa: E402

import torch  # noqa: E402

UNITS = ("item", "submission")


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
    # More than the samples: cycle through them (each copy its own name).
    return [(name if k < len(out) else f"{name}#{k // len(out)}", md, rubric)
            for k, (name, md, rubric) in ((k, out[k % len(out)]) for k in range(n))]


def model_tokens(engine: GraderEngine, items) -> int:
    """Tokens the item path puts through the model: each shared prefix once, then every answer
    (the same rule as GraderEngine.grade_items, from the same encoding)."""
    from data.markdown import split_sections
    from data.prompt_format import encode_score_prompt

    limit = getattr(engine.model.config, "max_position_embeddings", None)
    encoded = [[encode_score_prompt(engine.tokenizer, engine.format, rubric, k, a, limit - 8 if limit else None)
                for k, a in enumerate(split_sections(md, rubric) or [md.strip()] * len(rubric.questions))]
               for _, md, rubric in items]
    keys = [rubric.model_dump_json() for _, _, rubric in items]
    prefixes = item_grading._shared_prefixes(encoded, keys)
    total = sum(len(ex.input_ids) for exs in encoded for ex in exs)
    for (key, k), n in prefixes.items():
        users = sum(1 for exs, kk in zip(encoded, keys) if kk == key and k < len(exs) and exs[k].value_ids)
        total -= n * (users - 1)
    return total


def _sync(engine: GraderEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def measure(engine: GraderEngine, items, unit: str, batch_sizes, max_new_tokens: int, shared_prefix: bool,
            constrained: bool = False) -> list[dict]:
    """One timed run per batch size, after a warm-up on one submission of each rubric (it also
    compiles each rubric's grammar; a prefix is never kept from one call to the next, so the
    warm-up gives the timed run nothing else)."""
    firsts = list({id(it[2]): it for it in items}.values())
    engine.grade_many(firsts, adapter=None, unit=unit, batch_size=len(firsts), max_new_tokens=8, retry=False,
                      constrained=constrained, share_prefix=shared_prefix)  # warm-up
    rows = []
    for bs in batch_sizes:
        _sync(engine)
        t0 = time.perf_counter()
        res = engine.grade_many(items, adapter=None, unit=unit, batch_size=bs, max_new_tokens=max_new_tokens,
                                retry=False, constrained=constrained, share_prefix=shared_prefix)
        _sync(engine)
        dt = time.perf_counter() - t0
        prompt = sum(r.prompt_tokens for r in res)
        new = sum(r.new_tokens for r in res)
        steps = sum(r.model_steps for r in res)
        split = {k: round(sum((r.timings or {}).get(k, 0.0) for r in res), 2) for k in res[0].timings or {}}
        row = {
            "model": engine.base_model, "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
            "unit": unit, "batch_size": bs, "n": len(items), "seconds": round(dt, 2),
            "submissions_per_min": round(len(items) / dt * 60, 2), "prompt_tokens": prompt, "new_tokens": new,
            "time_split_s": split, "valid_without_repair": sum(not r.repaired for r in res),
        }
        if unit == "item":
            row["_probs"] = [p for r in res for p in (r.score_probs or [])]
            row.update(shared_prefix=shared_prefix,
                       model_tokens=model_tokens(engine, items) if shared_prefix else prompt,
                       questions=sum(len(r.grade.items) for r in res),
                       prompt_tokens_per_s=round(prompt / dt, 1))
        else:
            row.update(constrained=constrained, max_new_tokens=max_new_tokens, new_tokens_per_s=round(new / dt, 1),
                       prompt_tokens_per_s=round(prompt / split.get("prefill_s", dt), 1) if split.get("prefill_s") else None,
                       model_steps=steps, tokens_per_step=round(new / max(steps, 1), 2),
                       justifications=_justifications(res),
                       note=("jump-forward: forced spans written in the step of the token before them; "
                             "justifications allowed, written until their bound or the budget closes them")
                       if constrained else "free decoding, no grammar")
        rows.append(row)
        if unit != "item":
            print(json.dumps(row), flush=True)
    return rows


def set_variant(engine: GraderEngine, variant: str) -> None:
    """Put the GPT-OSS-shaped model in ``variant``'s state (see --variants). Packed experts always
    take the fast path's expert forward (they have no other)."""
    from inference.attention import SINKS_SDPA, register
    from training import fast_path, packed

    attn, *extras = variant.split("+")
    if attn == SINKS_SDPA:
        register()
    engine.model.set_attn_implementation(attn)
    if "project" in extras or packed.is_quantized(engine.model):
        fast_path.install_moe_forward(engine.model)
    else:
        fast_path.uninstall_moe_forward(engine.model)
    fast_path.compile_layers(engine.model, enable="compile" in extras)


def _max_diff(a: list, b: list) -> float | None:
    """The largest difference between two runs' score probabilities, question by question."""
    diffs = [abs(x[key] - y[key]) for x, y in zip(a, b) if x and y for key in x]
    return round(max(diffs), 5) if diffs else None


def profile(engine: GraderEngine, items, batch_size: int, top: int = 25) -> dict:
    """One item-unit run under torch.profiler: the time on the host against the GPU's busy time, and
    the ops that take the GPU's time (printed as a table)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    _sync(engine)
    t0 = time.perf_counter()
    with torch_profile(activities=acts) as prof:
        res = engine.grade_many(items, adapter=None, unit="item", batch_size=batch_size, retry=False)
        _sync(engine)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    key = "self_device_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=top), flush=True)
    gpu_busy = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6
    split = {k: round(sum((r.timings or {}).get(k, 0.0) for r in res), 2) for k in res[0].timings or {}}
    row = {"profile": True, "batch_size": batch_size, "wall_s_profiled": round(wall, 2),
           "gpu_busy_s": round(gpu_busy, 2), "time_split_s": split,
           "top_ops": [{"op": e.key, "calls": e.count, key: round(getattr(e, key) / 1e6, 3)}
                       for e in sorted(events, key=lambda e: -getattr(e, key))[:top]]}
    print(json.dumps({k: v for k, v in row.items() if k != "top_ops"}), flush=True)
    return row


def _justifications(results) -> dict:
    """How many items of the written grades have a justification, and their mean length."""
    lengths = []
    for r in results:
        try:
            items = json.loads(r.raw_text).get("items", [])
        except ValueError:
            continue
        lengths += [len(it["justification"]) for it in items if isinstance(it, dict) and it.get("justification")]
    total = sum(len(r.grade.items) for r in results)
    return {"items_with": len(lengths), "items": total,
            "mean_chars": round(sum(lengths) / len(lengths), 1) if lengths else 0}


def gpt_oss_20b_shaped(device: str):
    """A GPT-OSS-20b-shaped model with random bf16 weights and the real tokenizer, eager attention
    (GPT-OSS refuses sdpa, its attention sinks; flex attention does not take the dense masks of
    inference.constrained.decode_grades)."""
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
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(str(build_gpt_oss_tokenizer()))
    return GraderEngine("gpt-oss-20b-shaped (random bf16 weights)", model=model, tokenizer=tok)


def packed_twin(folder: str, device: str):
    """A GPT-OSS checkpoint folder (e.g. a reduced-layer 120b twin from bench/launcher_twin.py)
    with its MXFP4 experts kept packed, loaded as the engine loads a 120b that would not fit the
    card dequantized (``inference.engine.load_packed_gpt_oss``), eager attention."""
    from transformers import AutoTokenizer

    from inference.engine import load_packed_gpt_oss

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = load_packed_gpt_oss(Path(folder), dev, dtype, "mxfp4")
    model.set_attn_implementation("eager")
    layers = model.config.num_hidden_layers
    print(json.dumps({"packed_twin": folder, "layers": layers, "load_s": round(time.perf_counter() - t0, 1),
                      "gpu_mem_gib": round(torch.cuda.memory_allocated() / 2**30, 2) if dev.type == "cuda" else None}),
          flush=True)
    tok = AutoTokenizer.from_pretrained(folder)
    return GraderEngine(f"packed twin, {layers} layers ({Path(folder).name})", model=model, tokenizer=tok)


def encode_only(n: int, repeats: int = 3) -> dict:
    """The item path's encode step alone (``inference.item_grading._encode_questions``: split the
    sections, render each question's prompt in the harmony format, tokenize) for ``n`` sample
    submissions with the real GPT-OSS tokenizer, no model: the CPU side of item grading with
    GPT-OSS. Best of ``repeats`` runs (the first also fills the per-question prompt cache's misses)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from data.tokenizer_offline import build_gpt_oss_tokenizer

    tok = AutoTokenizer.from_pretrained(str(build_gpt_oss_tokenizer()))
    engine = SimpleNamespace(tokenizer=tok, format="harmony",
                             model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=131072)))
    items = sample_items(n)
    times, questions = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        questions, _ = item_grading._encode_questions(engine, items, None, 0)
        times.append(time.perf_counter() - t0)
    n_q = sum(len(row) for row in questions)
    row = {"unit": "item", "encode_only": True, "n": n, "questions": n_q,
           "prompt_tokens": sum(len(q.example.input_ids) for r in questions for q in r),
           "seconds": round(min(times), 3), "questions_per_s": round(n_q / min(times), 1),
           "first_run_seconds": round(times[0], 3)}
    print(json.dumps(row), flush=True)
    return row


def save(args, argv, rows: list[dict]) -> dict:
    """Write the report so far to --out (grading_speed_gpu.json or _cpu.json); returns it."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "gpu" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    report = {"command": "python bench/grading_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "device": torch.cuda.get_device_name(0) if dev == "gpu" else f"cpu ({torch.get_num_threads()} threads)",
              "rows": rows}
    (out / f"grading_speed_{dev}.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded:gemma-3-270m")
    ap.add_argument("--device")
    ap.add_argument("--unit", default="item", help="item, submission, or both: item,submission")
    ap.add_argument("--n", type=int, default=14,
                    help="how many submissions (14: all the samples; more cycles through them, e.g. 64 for a GPU batch)")
    ap.add_argument("--batch-sizes", default="8")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="submission unit only")
    ap.add_argument("--also-unshared", action="store_true",
                    help="item unit: also a row with every question's whole prompt through the model (the path "
                         "before issue 14)")
    ap.add_argument("--constrained", action="store_true",
                    help="submission unit: also a row with decoding constrained to the grade schema (xgrammar)")
    ap.add_argument("--decoding", default=None,
                    help="submission unit: free, constrained, or both (free,constrained; what --constrained "
                         "means); constrained alone skips the baseline row when it is already recorded")
    ap.add_argument("--gpt-oss-20b-shaped", action="store_true")
    ap.add_argument("--packed-twin", metavar="FOLDER",
                    help="also a GPT-OSS checkpoint with its MXFP4 experts kept packed (the 120b's grading path), "
                         "e.g. a reduced-layer 120b twin: python bench/launcher_twin.py --shape 120b --layers 12 --out FOLDER")
    ap.add_argument("--skip-model", action="store_true", help="only the GPT-OSS-shaped run")
    ap.add_argument("--variants", default="eager",
                    help="GPT-OSS-shaped run: forward-pass variants measured in turn, comma-separated, each an "
                         "attention implementation (eager, flex_attention, fused_sinks: inference.attention) with +project (the training fast path's "
                         "grouped-GEMM experts) and/or +compile (torch.compile per layer), e.g. "
                         "eager,flex_attention+project; each row says how far its distributions lie from the first's")
    ap.add_argument("--profile", action="store_true",
                    help="item unit: one more run of the last batch size under torch.profiler; prints where the time goes")
    ap.add_argument("--encode-only", action="store_true",
                    help="only the item path's encode step with the GPT-OSS tokenizer (harmony), no model")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    units = [u.strip() for u in args.unit.split(",")]
    decodings = [d.strip() for d in (args.decoding or ("free,constrained" if args.constrained else "free")).split(",")]
    if not decodings or any(d not in ("free", "constrained") for d in decodings):
        ap.error(f"--decoding takes free, constrained or free,constrained, not {args.decoding!r}")
    if any(u not in UNITS for u in units):
        ap.error(f"--unit takes {', '.join(UNITS)} (comma-separated), not {args.unit!r}")
    if args.encode_only:
        print(json.dumps({"command": "python bench/grading_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                          "cpu_threads": torch.get_num_threads(), **encode_only(args.n)}))
        return 0
    items = sample_items(args.n)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    engines = []
    if not args.skip_model:
        engines.append(lambda: GraderEngine(args.model, device=args.device))
    if args.gpt_oss_20b_shaped:
        engines.append(lambda: gpt_oss_20b_shaped(args.device or "cuda"))
    if args.packed_twin:
        engines.append(lambda: packed_twin(args.packed_twin, args.device or "cuda"))
    rows: list[dict] = []
    for make in engines:
        engine = make()
        variants = ([v.strip() for v in args.variants.split(",")] if engine.base_model.startswith(("gpt-oss-20b-shaped", "packed twin"))
                    else [None])
        with torch.inference_mode():
            for unit in units:
                if unit == "item":
                    reference = None
                    for variant in variants:
                        if variant is not None:
                            set_variant(engine, variant)
                        for shared in [False, True] if args.also_unshared else [True]:
                            try:
                                got = measure(engine, items, unit, sizes, args.max_new_tokens, shared)
                            except Exception as exc:  # a variant that does not take these inputs
                                print(json.dumps({"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:2000]}),
                                      flush=True)
                                continue
                            for r in got:
                                r["variant"] = variant or "default"
                                r["experts"] = getattr(engine.model.config, "_experts_implementation", None)
                                if reference is None:
                                    reference = r.pop("_probs")
                                else:
                                    r["max_abs_prob_diff_vs_first"] = _max_diff(reference, r.pop("_probs"))
                                print(json.dumps(r), flush=True)
                            rows += got
                            save(args, argv, rows)  # a call cut short keeps what it measured
                        if args.profile:
                            rows.append(profile(engine, items, sizes[-1]))
                            save(args, argv, rows)
                else:
                    for decoding in decodings:
                        rows += measure(engine, items, unit, sizes, args.max_new_tokens, True, decoding == "constrained")
        del engine
    report = save(args, argv, rows)
    print("| model | device | unit | batch | n | submissions/min | tokens/s | new tokens / model steps | "
          "time split (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("profile"):
            continue
        tps = r["prompt_tokens_per_s"] if r["unit"] == "item" else r["new_tokens_per_s"]
        split = ", ".join(f"{k.removesuffix('_s')} {v}" for k, v in r["time_split_s"].items())
        unit = r["unit"] + ((", shared prefix" if r["shared_prefix"] else ", unshared") if r["unit"] == "item"
                            else ", constrained" if r["constrained"] else "")
        if r.get("variant") not in (None, "default"):
            unit += f", {r['variant']}"
        steps = f"{r['new_tokens']} / {r['model_steps']}" if r["unit"] == "submission" else "-"
        print(f"| {r['model']} | {report['device']} | {unit} | {r['batch_size']} | {r['n']} | "
              f"{r['submissions_per_min']} | {tps} | {steps} | {split} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

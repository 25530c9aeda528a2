"""Grading quality on real data, through the product: `python -m training run` on the Mohler
short-answer set, then `python -m inference evaluate` on assignments (and questions) it never saw.

    python bench/mohler_quality.py [--data ../shared/datasets/mohler/json] [--model embedded:gemma-3-270m]
                                   [--out DIR] [--set key=value ...] [--work /tmp/mohler-bench]
                                   [--anchors 3 5 10] [--anchor-draws 3] [--base]

What it does, nothing else:
1. Splits the data by assignment, near-duplicate questions on one side (the data's README lists
   the pairs: exam a11 re-asks a02/a03/a04 questions, exam a12 re-asks a05-a10 ones): train =
   a05-a09 + a12, validation = a01 + a10 without 10.7 (whose twin 12.11 is in training: two
   assignments, questions unseen in training), test = a02-a04 + a11. Items whose answer text was
   lost (``answer_text_lost``) are left out. The split is written as JSON files under --work
   (never into the repo: the data is not ours).
2. Trains with `python -m training run --config CONFIG`: the `embedded-grader` preset (the
   measured recipe) with --model, the split, and --set overrides (e.g. train_anchors=0);
   validation by agreement on the validation split; the run keeps best/ (best validation QWK)
   with its calibration, review threshold and anchor blend.
3. Evaluates best/ with `python -m inference evaluate --adapter RUN/best --data TEST --validation VAL
   --anchors K... --json ...`: the adapter (vs a constant; --base adds the base alone), items and
   submissions; with k teacher anchors per test question drawn from its own answers (left out of
   scoring); the coverage curve and the review threshold chosen on the validation split.
Prints the tables and the commands; writes NAME.json (+ NAME_evaluate.json) to --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.run_folder import RunFolder  # noqa: E402
SPLIT = {"train": ["a05", "a06", "a07", "a08", "a09", "a12"], "validation": ["a01", "a10"],
         "test": ["a02", "a03", "a04", "a11"]}
# Questions left out of a split because a near-duplicate sits in another (10.7 ~ 12.11, in training).
LEFT_OUT = {"validation": {"10.7"}}
PRESET = "embedded-grader"


def write_split(data: Path, work: Path) -> dict[str, Path]:
    """The split as folders of graded JSON (lost answers dropped); {split: folder}."""
    if not data.is_dir():
        raise SystemExit(f"{data} does not exist: the Mohler data is read from ../shared/datasets/mohler/json "
                         "(pass --data)")
    folders = {}
    for name, assignments in SPLIT.items():
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in sorted(data.glob("*.json")):
            d = json.loads(f.read_text())
            if d.get("assignment") not in assignments and not any(f"-{a}-" in f.name for a in assignments):
                continue
            items = [it for it in d["rubric_alignment"] if not it.get("answer_text_lost") and it["answer"].strip()
                     and str(it.get("question_id")) not in LEFT_OUT.get(name, set())]
            if not items:
                continue
            d["rubric_alignment"] = items
            d["score"] = sum(it["score"] for it in items)
            d["max_score"] = sum(it["max_score"] for it in items)
            (folder / f.name).write_text(json.dumps(d))
        folders[name] = folder
    return folders


def run(cmd: list[str], log) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    log(p.stdout[-6000:])
    if p.returncode != 0:
        log(p.stderr[-6000:])
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}")
    log(f"(took {time.time() - t0:.0f} s)")
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "mohler" / "json"))
    ap.add_argument("--model", default="embedded:gemma-3-270m")
    ap.add_argument("--work", default="/tmp/mohler-bench")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--name", default="mohler-item")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="RunConfig override (JSON value)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--anchors", nargs="*", type=int, default=[3, 5, 10], help="anchors per test question (evaluate)")
    ap.add_argument("--anchor-draws", type=int, default=3)
    ap.add_argument("--base", action="store_true", help="also evaluate the base model alone (zero-shot)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_f = open(out / f"{args.name}.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    work = Path(args.work)
    split = write_split(Path(args.data), work)
    from training.presets import preset

    cfg = {**preset(PRESET).model_dump(), "name": args.name, "model": args.model, "datasets": [str(split["train"])],
           "validation_datasets": [str(split["validation"])]}
    for kv in args.set:
        k, v = kv.split("=", 1)
        try:
            cfg[k] = json.loads(v)
        except ValueError:
            cfg[k] = v
    cfg_path = work / f"{args.name}.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    log("split: " + ", ".join(f"{k} {len(list(v.glob('*.json')))} submissions" for k, v in split.items()))
    log(f"config: {json.dumps(cfg)}")

    py = sys.executable
    p = run([py, "-m", "training", "run", "--config", str(cfg_path)], log)
    run_dir = Path(p.stdout.strip().splitlines()[-1])
    adapter = RunFolder(run_dir).default_adapter()
    report_path = out / f"{args.name}_evaluate.json"
    run([py, "-m", "inference", "evaluate", "--adapter", str(adapter), "--data", str(split["test"]),
         "--validation", str(split["validation"]), "--json", str(report_path), "--n-boot", str(args.n_boot),
         "--anchor-draws", str(args.anchor_draws)] + (["--anchors", *map(str, args.anchors)] if args.anchors else [])
        + ([] if args.base else ["--no-base"]), log)
    report = json.loads(report_path.read_text())
    metrics = RunFolder(run_dir).read_metrics()
    evals = [m for m in metrics if m.get("kind") == "eval"]
    ad = report["predictors"]["adapter"]
    const = report["predictors"]["constant (training mean)"]
    summary = {
        "config": cfg, "run_dir": str(run_dir), "adapter": str(adapter),
        "validation_by_epoch": [{k: e.get(k) for k in ("step", "epoch", "eval_loss", "val_mae", "val_pearson_r", "val_qwk")} for e in evals],
        "test_items": {k: ad["items"][k]["value"] for k in ("mae", "pearson_r", "qwk")},
        "test_items_full": {k: ad["items"][k] for k in ("mae", "pearson_r", "qwk")},
        "test_submission_mae": ad["submissions"]["mae"]["value"],
        "constant_item_mae": const["items"]["mae"]["value"],
        "constant_submission_mae": const["submissions"]["mae"]["value"],
        "spread": ad["spread_within_assignment"],
        "calibrated_items": {k: ad["calibrated_scores"]["items"][k]["value"] for k in ("mae", "pearson_r", "qwk")} if ad.get("calibrated_scores") else None,
        "calibrated_submission_mae": ad["calibrated_scores"]["submissions"]["mae"]["value"] if ad.get("calibrated_scores") else None,
        "base": {k: report["predictors"]["base zero-shot"]["items"][k]["value"] for k in ("mae", "pearson_r", "qwk")}
        if "base zero-shot" in report["predictors"] else None,
        "anchors": {k: v["mean"] for k, v in (report.get("anchors") or {}).get("by_k", {}).items()},
        "selective": {k: {"curve": v["curves"]["confidence"], "threshold": v.get("threshold")}
                      for k, v in (report.get("selective") or {}).get("by_k", {}).items()},
        "repair_rate": ad["repair_rate"],
        "train_tokens_per_s": [m.get("tokens_per_s") for m in metrics if m.get("kind") == "train"][-5:],
    }
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=1))
    log(report["table_markdown"])
    for key in ("anchors_markdown", "selective_markdown"):
        if report.get(key):
            log(report[key])
    log(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

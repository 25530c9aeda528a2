"""Command line: grade submissions, grade a folder, evaluate against human grades, export a merged model.

    python -m inference grade    [--base MODEL] [--adapter DIR] --rubric RUBRIC.json FILE.md...
    python -m inference batch    [--base MODEL] [--adapter DIR] --rubric RUBRIC.json --out-dir OUT DIR
    python -m inference evaluate [--base MODEL] [--adapter DIR] --data PATH... [--json OUT]
    python -m inference export   --adapter DIR --out DIR [--base MODEL]
    python -m inference export-grades --out FILE.xlsx|FILE.csv [--adapter DIR]
    python -m inference teacher-agreement [--adapter DIR] [--json OUT] [--n-boot N]

--adapter is an adapter folder, or a run's folder: then the run's adapter to grade with (best/, the
best validation agreement; else final/; else its last complete checkpoint). --base defaults to the
model the adapter was trained on (its run_config.json), and without an adapter to the embedded
Gemma 3 270M. Scores are the model's expected score per question unless
--scoring generated. Every grade is recorded in the studio's SQLite store.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from inference.generation import SCORINGS
from scoring.selective import DEFAULT_TARGET_QWK

CALIBRATE = {"auto": None, "on": True, "off": False}
NO_ANCHORS_HELP = ("grade without the teacher's anchors (answers of the same questions graded by the teacher: "
                   "imported datasets and Review-tab corrections; an answer the teacher graded keeps that score)")


def _engine(args):
    from inference.engine import get_engine
    from inference.adapters import resolve_base

    base = resolve_base(args.base, args.adapter)
    with _libraries_to_stderr():
        return get_engine(base, device=args.device, trust_remote_code=args.trust_remote_code)


def _libraries_to_stderr():
    """stdout carries only the command's result (`| jq` parses it). Loading a model, or building
    an embedded one on first use, imports DeepSpeed (transformers' save_pretrained does), whose
    logger writes to the sys.stdout of that moment: inside this block that is stderr, for good."""
    return contextlib.redirect_stdout(sys.stderr)


def _anchors(args):
    """The teacher's anchors from the store (imported grades and Review-tab corrections), unless
    --no-anchors; said on stderr when there are any."""
    if args.no_anchors:
        return None
    from data.store import Store

    bank = Store().anchor_bank()
    if bank:
        print(f"anchors: {len(bank)} teacher-graded answers of {bank.questions()} questions (--no-anchors to "
              "grade without them)", file=sys.stderr)
    return bank


def _submission(path: Path, rubric) -> str:
    from data.markdown import normalize_submission, read_markdown

    return normalize_submission(read_markdown(path), rubric)


def cmd_grade(args) -> int:
    from data.loading import load_rubric
    from inference.gradebook import clashing_names
    from inference.results import store_grade

    rubric = load_rubric(args.rubric)
    submissions = [(Path(f), _submission(Path(f), rubric)) for f in args.files]
    clash = clashing_names((path.name, md) for path, md in submissions)
    if clash:  # stored under one name, two students' grades would be one gradebook row
        print(f"grade: different files share the name {', '.join(clash)}: rename them (a file's name is its "
              "submission's row in the gradebook)", file=sys.stderr)
        return 2
    engine = _engine(args)
    out = []
    for path, md in submissions:
        on_token = (lambda t: (sys.stderr.write(t), sys.stderr.flush())) if args.stream else None
        r = engine.grade(md, rubric, adapter=args.adapter, scoring=args.scoring, calibrate=CALIBRATE[args.calibrate],
                         max_new_tokens=args.max_new_tokens, on_token=on_token, anchors=_anchors(args))
        store_grade(r, rubric, path.name, submission_md=md)
        if args.stream:
            sys.stderr.write("\n")
        out.append({"file": str(path), **r.to_dict()})
    print(json.dumps(out, indent=1, ensure_ascii=False))
    return 0


def cmd_batch(args) -> int:
    """Grade a folder, streaming each finished batch to grades.csv and grades.jsonl; a second run
    over the same --out-dir grades only what is not there yet (killed runs resume)."""
    from tqdm import tqdm

    from data.loading import load_rubric
    from inference.adapters import check_adapter_dir, resolve_base
    from inference.results import store_grade
    from inference.grades_csv import BatchOutput, OutputMismatchError, content_sha256

    rubric = load_rubric(args.rubric)
    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"batch: {folder} is not a folder", file=sys.stderr)
        return 2
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".md", ".markdown", ".txt") and p.is_file())
    if not files:
        print(f"batch: no .md files in {folder}", file=sys.stderr)
        return 2
    hashes = {p.name: content_sha256(p.read_bytes()) for p in files}
    adapter = str(check_adapter_dir(args.adapter)) if args.adapter else None
    try:
        out = BatchOutput(args.out_dir, base_model=resolve_base(args.base, args.adapter), adapter=adapter,
                          rubric=rubric, files=hashes)
    except OutputMismatchError as e:
        print(f"batch: {e}", file=sys.stderr)
        return 2
    done = out.done()
    todo = [p for p in files if (p.name, hashes[p.name]) not in done]
    if out.n_cut or out.n_changed or len(todo) < len(files):
        print(f"batch: resuming in {out.folder}: {len(files) - len(todo)} of {len(files)} already graded"
              + (", a half-written last line dropped" if out.n_cut else "")
              + (f", {out.n_changed} changed since graded (graded again)" if out.n_changed else ""), file=sys.stderr)
    results = []
    if todo:
        engine = _engine(args)
        items = [(p.name, _submission(p, rubric), rubric) for p in todo]

        def write(finished) -> None:  # each batch as it finishes: the record first, then the store
            out.append([(items[i][0], hashes[items[i][0]], r) for i, r in finished])
            for i, r in finished:
                store_grade(r, rubric, items[i][0], submission_md=items[i][1])

        batch_size = args.batch_size or engine.default_batch_size()
        with tqdm(total=len(items), desc="grading", unit="sub", file=sys.stderr) as bar:
            results = engine.grade_many(items, adapter=args.adapter, scoring=args.scoring,
                                        calibrate=CALIBRATE[args.calibrate], batch_size=batch_size,
                                        max_new_tokens=args.max_new_tokens, progress=bar.update, on_batch=write,
                                        anchors=_anchors(args))
    n_rep = sum(r.repaired for r in results)
    print(f"graded {len(results)} submissions ({n_rep} repaired; {len(files) - len(todo)} already graded) "
          f"-> {out.csv}, {out.jsonl}")
    return 0


def cmd_evaluate(args) -> int:
    from tqdm import tqdm

    from inference.evaluate import evaluate

    bars: dict = {}

    def progress(predictor: str, done: int, total: int) -> None:
        bar = bars.get(predictor)
        if bar is None:
            bar = bars[predictor] = tqdm(desc=predictor, total=total, unit="sub", file=sys.stderr)
        bar.update(done - bar.n)

    adapter = [args.adapter] + [adapter_of(a) for a in args.ensemble] if args.ensemble else args.adapter
    if args.ensemble and args.adapter is None:
        print("evaluate: --ensemble averages with --adapter's distributions: give --adapter too", file=sys.stderr)
        return 2
    with _libraries_to_stderr():
        report = evaluate(args.data, adapter=adapter, base=args.base, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, n_boot=args.n_boot, include_base=not args.no_base,
                          progress=progress, scoring=args.scoring, unit=args.unit, device=args.device,
                          trust_remote_code=args.trust_remote_code, out_path=args.json, anchors=args.anchors,
                          anchor_draws=args.anchor_draws, anchor_seed=args.anchor_seed, validation=args.validation,
                          target_qwk=args.target_qwk)
    for bar in bars.values():
        bar.close()
    print(report["table_markdown"])
    for name, p in report["predictors"].items():
        spread = p.get("spread_within_assignment") or {}
        if "repair_rate" in p:
            print(f"\n{name}: graded by {p['unit']}; repaired {p['n_repaired']} of {report['n_submissions']} "
                  f"({', '.join(f'{k} {v}' for k, v in p['repair_kinds'].items()) or 'no repairs'}); "
                  f"{p['n_needs_review']} questions need review; totals within an assignment spread "
                  f"sd {spread.get('pred_sd')} vs the humans' {spread.get('human_sd')}")
        if p.get("calibration"):
            c, raw, cal = p["calibration"], p["uncalibrated_scores"]["items"], p["calibrated_scores"]["items"]
            print(f"{name}: calibration {'applied' if c['applied'] else 'not applied'} (on held-out validation it "
                  f"{'helped' if c['helps_on_validation'] else 'did not help' if c['helps_on_validation'] is False else 'was not checked'}"
                  f"); item MAE {raw['mae']['value']:.3f} without, {cal['mae']['value']:.3f} with; "
                  f"QWK {raw['qwk']['value']} without, {cal['qwk']['value']} with")
    const = report["predictors"]["constant (training mean)"]
    print(f"\nconstant predictor: {const['mean_fraction']:.3f} of each maximum, from the {const['source']}")
    if report.get("anchors_markdown"):
        print("\nwith k teacher-graded answers of each question as anchors (drawn from the data, not scored):\n"
              + report["anchors_markdown"])
    if report.get("selective_markdown"):
        print("\nselective grading (accept the surest grades, review the rest):\n" + report["selective_markdown"])
    if report.get("teacher_agreement_markdown"):
        print("\nagreement with the teacher's corrections (Review tab):\n" + report["teacher_agreement_markdown"])
    if args.json:
        print(f"report -> {args.json}")
    return 0


def cmd_export(args) -> int:
    from inference.adapters import export_merged

    out = export_merged(args.adapter, args.out, base_model=args.base, trust_remote_code=args.trust_remote_code)
    print(f"merged model -> {out}")
    return 0


def cmd_teacher_agreement(args) -> int:
    from inference.teacher_agreement import format_agreement, teacher_agreement

    adapters = {str(Path(args.adapter).expanduser().resolve())} if args.adapter else None
    results = teacher_agreement(adapters=adapters, n_boot=args.n_boot)
    if not results:
        which = f" graded by {args.adapter}" if args.adapter else ""
        print(f"teacher-agreement: no corrected answers{which} yet: correct grades in the Review tab first "
              "(the studio's store holds the grades and corrections)", file=sys.stderr)
        return 1
    print(format_agreement(results))
    if args.json:
        Path(args.json).write_text(json.dumps([a.to_dict() for a in results], indent=1, ensure_ascii=False),
                                    encoding="utf-8")
        print(f"report -> {args.json}")
    return 0


def cmd_export_grades(args) -> int:
    from inference.gradebook import export_gradebook

    try:
        path, book = export_gradebook(args.out, adapter=args.grades_of)
    except ValueError as e:
        print(f"export-grades: {e}", file=sys.stderr)
        return 2
    print(f"gradebook: {len(book.rows)} submissions x {len(book.columns)} questions -> {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m inference", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, adapter_required=False, scoring=True):
        p.add_argument("--base", help="base model: folder or embedded:NAME (default: the adapter's, else "
                                      "embedded:gemma-3-270m)")
        p.add_argument("--adapter", required=adapter_required,
                       help="LoRA adapter folder, or a run folder (its best/, else final/, else last checkpoint)")
        p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder")
        if scoring:
            p.add_argument("--scoring", choices=SCORINGS, default="expected",
                           help="expected: each score is the mean of the model's probabilities for 0..max "
                                "at that score (default); generated: the digits the model wrote")
            p.add_argument("--calibrate", choices=["auto", "on", "off"], default="auto",
                           help="map expected scores through the calibration stored with the adapter (fitted on "
                                "the run's validation set): auto (default) where it helped on held-out "
                                "validation, on, or off")

    p = sub.add_parser("grade", help="grade Markdown submissions, print JSON grades")
    common(p)
    p.add_argument("--no-anchors", action="store_true", help=NO_ANCHORS_HELP)
    p.add_argument("--rubric", required=True, help="rubric JSON (or a graded submission of the assignment)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--stream", action="store_true", help="print tokens to stderr as they come")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_grade)

    p = sub.add_parser("batch", help="grade every .md file of a folder; write grades.csv (one row per question) "
                                     "and grades.jsonl")
    common(p)
    p.add_argument("--no-anchors", action="store_true", help=NO_ANCHORS_HELP)
    p.add_argument("--rubric", required=True)
    p.add_argument("--out-dir", required=True,
                   help="grades.csv and grades.jsonl grow here as batches finish; run again to resume")
    p.add_argument("--batch-size", type=int, help="submissions per batch (default: 64 on a GPU, 8 on CPU)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("folder")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("evaluate", help="compare with human grades: adapter, base zero-shot, constant")
    common(p)
    p.add_argument("--data", required=True, nargs="+", help="graded submissions: .json/.jsonl files or folders")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--batch-size", type=int, help="submissions per batch (default: 64 on a GPU, 8 on CPU)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--no-base", action="store_true", help="skip the zero-shot base run")
    p.add_argument("--unit", choices=["item", "submission"],
                   help="grade each question alone (item) or generate whole grades (default: the adapter's own)")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="DIR",
                   help="more adapters (or run folders) whose score distributions are averaged with --adapter's")
    p.add_argument("--anchors", nargs="+", type=int, default=[], metavar="K",
                   help="also grade with K answers of each question drawn from --data as the teacher's anchors "
                        "(left out of scoring), for each K given, e.g. --anchors 3 5 10 (item grading)")
    p.add_argument("--anchor-draws", type=int, default=3, help="random draws of the anchors per K (default 3)")
    p.add_argument("--anchor-seed", type=int, default=0)
    p.add_argument("--validation", nargs="+", metavar="PATH",
                   help="graded data (not --data) to choose the review threshold on, graded the same way; "
                        "default: the threshold stored with the adapter")
    p.add_argument("--target-qwk", type=float, default=DEFAULT_TARGET_QWK,
                   help=f"agreement the accepted grades must reach; grades below the threshold that gives "
                        f"it need review (default {DEFAULT_TARGET_QWK})")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("teacher-agreement", help="each adapter against the teacher's corrections (Review tab): "
                                                 "MAE, r, QWK overall and per question, oldest adapter first")
    p.add_argument("--adapter", help="only this adapter folder, or a run folder (its best/, else final/, ...)")
    p.add_argument("--json", help="write the full report (with every score pair) here")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (0: none)")
    p.set_defaults(func=cmd_teacher_agreement)

    p = sub.add_parser("export", help="merge the adapter into its base and save a plain model folder")
    common(p, adapter_required=True, scoring=False)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("export-grades", help="the stored grades as a gradebook: a row per submission, a column per "
                                             "question, total and max (.csv or .xlsx)")
    p.add_argument("--out", required=True, help="FILE.csv or FILE.xlsx")
    # Not --adapter's usual dest: here a run folder means every adapter of that run, not its best one.
    p.add_argument("--adapter", dest="grades_of", metavar="DIR",
                   help="only grades made with this adapter (or any adapter of this run folder); default: all, "
                        "each submission's newest grade")
    p.set_defaults(func=cmd_export_grades)
    return ap


def adapter_of(value: str | None) -> str | None:
    """--adapter as given, or for a run folder (config.json, no adapter_config.json) the run's
    default adapter, said on stderr (stdout carries only the result)."""
    from data.run_folder import ADAPTER_CONFIG, RunFolder
    from inference.adapters import AdapterError

    if value is None:
        return None
    run = RunFolder(Path(value).expanduser())
    if not run.exists() or (run.path / ADAPTER_CONFIG).is_file():
        return value
    chosen = run.default_adapter()
    if chosen is None:
        raise AdapterError(f"run folder {run.path} has no complete checkpoint yet (nothing with its "
                           "complete.json): wait for the first save, or give a checkpoint folder")
    print(f"adapter: {chosen} (the run's adapter to grade with)", file=sys.stderr)
    return str(chosen)


def main(argv: list[str] | None = None) -> int:
    from data.library_noise import quiet_library_noise

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_library_noise()
    args = build_parser().parse_args(argv)
    from inference.adapters import AdapterError
    from data.loading import DataError
    from data.model_zoo import ModelNotFoundError

    try:
        if hasattr(args, "adapter"):
            args.adapter = adapter_of(args.adapter)
        return args.func(args)
    except (AdapterError, DataError, ModelNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

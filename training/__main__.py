"""`python -m training COMMAND`: the studio's training tools, usable without the UI.

    run      --preset NAME | --config FILE [--set key=value ...] [--resume RUN] [--detach]
             exits 2 when the config is refused, 3 when a live run holds the same GPUs (or the CPU)
    stop     RUN                     finish the current step, save, mark "stopped"
    status   [RUN]                   one run in detail, or the newest runs
    list                             runs and stored datasets
    validate PATH... [--max-mb N]    check graded-submission files, report every problem
    import   NAME PATH...            store a dataset (validated) under NAME, for datasets=db:NAME;
             [--map FIELD=COLUMN ...] [--group-by COL] [--max-score N] [--shape long|wide]
                                     .csv/.xlsx files: which column is what (unmapped fields are
                                     guessed from the header and printed)
    corrections-dataset [NAME]       store the teacher's corrections (Review tab) as dataset NAME
    tokenizer [--out DIR]            build the offline GPT-OSS tokenizer
    presets                          print the presets as JSON
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_run(args: argparse.Namespace) -> int:
    from training import launcher, memory, presets
    from training.adapter_quality import weak_agreement_note
    from training.checks import config_warnings
    from training.config import load_config
    from training.overrides import apply_overrides, overridden

    if args.resume and not (args.preset or args.config):
        cfg = None  # the run's own config.json (overrides applied below)
        if args.set:
            from data.run_folder import RunFolder

            cfg = load_config(RunFolder.of(args.resume).config)
    elif args.config:
        cfg = load_config(args.config)
    elif args.preset:
        cfg = presets.preset(args.preset)
    else:
        choice = presets.preset_choice(memory.gpu_count(), memory.gpu_memory_gib(), model=overridden(args.set, "model"))
        print(f"no --preset or --config: using preset {choice.name}, the one for this machine ({choice.reason})",
              file=sys.stderr)
        cfg = presets.preset(choice.name)
    if cfg is not None and args.set:
        cfg = apply_overrides(cfg, args.set)
    for warning in config_warnings(cfg) if cfg is not None else []:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        handle = launcher.launch(cfg, resume=args.resume)
    except launcher.ConfigRefused as e:
        print(str(e), file=sys.stderr)
        return 2
    except launcher.DevicesBusy as e:
        print(str(e), file=sys.stderr)
        return 3
    print(f"run {handle.run_id}: {handle.run_dir}")
    print(f"command: {launcher.command_text(handle.command)}")
    print(f"log: {handle.folder.log}")
    if args.detach:
        print(f"detached; follow with: python -m training status {handle.run_id}  (stop: python -m training stop {handle.run_id})")
        return 0
    status = launcher.follow(handle)
    adapter = handle.folder.default_adapter() if status == "finished" else None
    print(f"run {handle.run_id} {status}" + (f"; adapter: {adapter}" if adapter else ""))
    note = weak_agreement_note(adapter)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    if status == "stopped":
        print(f"resume with: python -m training run --resume {handle.run_id}")
    print(handle.run_dir)
    return 0 if status in ("finished", "stopped") else 1


def _cmd_stop(args: argparse.Namespace) -> int:
    from training.launcher import stop_run

    if stop_run(args.run):
        print(f"stop requested for {args.run}: it saves a checkpoint after the current step")
        return 0
    print(f"{args.run} is not running")
    return 1


def _fmt_run(r: dict) -> str:
    return f"{r['run_id']:<40} {r['status']:<9} {r.get('updated_at') or ''}"


def _cmd_status(args: argparse.Namespace) -> int:
    from training.adapter_quality import weak_agreement_note
    from training.launcher import run_status
    from data.store import Store

    if not args.run:
        runs = Store().list_runs()[:20]
        for r in runs:
            print(_fmt_run(r))
        if not runs:
            print("no runs yet: python -m training run --preset smoke")
        return 0
    try:
        st = run_status(args.run)
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 1
    print(_fmt_run(st))
    print(f"folder: {st['run_dir']}  alive: {st['alive']}")
    if st.get("error"):
        print(f"error: {st['error']}")
    t = st.get("last_train")
    if t:
        print(f"step {t['step']}/{t['total_steps']}  epoch {t['epoch']}  loss {t['loss']:.4f}  "
              f"lr {t['lr']:.2e}  {t['tokens_per_s']:.0f} tok/s  elapsed {t['elapsed_s']:.0f}s")
    e = st.get("last_eval")
    if e:
        print(f"eval loss {e['eval_loss']:.4f} at step {e['step']}")
    for c in st["checkpoints"]:
        print(f"  checkpoint step {c['step']}: {c['path']}{' (final)' if c.get('final') else ''}")
    from data.run_folder import RunFolder

    adapter = RunFolder(st["run_dir"]).default_adapter()
    if adapter:
        print(f"adapter to grade with: {adapter}")
        note = weak_agreement_note(adapter)
        if note:
            print(f"warning: {note}")
    for used in Store().run_corrections(st["run_id"]):
        print(f"trained on {len(used.correction_ids)} teacher corrections ({used.spec}, dataset {used.dataset_id}): "
              f"ids {', '.join(map(str, used.correction_ids))}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from data.store import Store

    store = Store()
    print("runs:")
    for r in store.list_runs():
        print("  " + _fmt_run(r))
    print("datasets:")
    for d in store.list_datasets():
        print(f"  {d['id']:>3} {d['name']:<30} {d['n_submissions']} submissions, {d['n_items']} items")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from data.loading import validate_cli

    return validate_cli(args.paths, max_bytes=int(args.max_mb * 1024 * 1024))


def _import_spreadsheets(args: argparse.Namespace, paths: list[str]) -> list:
    """Each spreadsheet's report, read with the mapping the flags give (guesses for the rest,
    said on stderr) and a progress bar per file."""
    from tqdm import tqdm

    from data.loading import FileReport
    from data.spreadsheet import ColumnMap, guess_mapping, parse_map_args, read_sheet_file, sheet_submissions

    reports = []
    for path in paths:
        sheet, read = read_sheet_file(path, encoding=args.encoding, max_bytes=int(args.max_mb * 1024 * 1024))
        if sheet is None:
            reports.append(FileReport(file=path, problems=read))
            continue
        shape = args.shape or ("wide" if any(m.split("=", 1)[0].strip() in ("questions", "answers", "max_row")
                                             for m in args.map) else None)
        guessed = guess_mapping(sheet, shape)
        mapping = parse_map_args(args.map, guessed)
        updates = {k: v for k, v in (("group_by", args.group_by), ("default_max_score", args.max_score)) if v}
        mapping = ColumnMap.model_validate({**mapping.model_dump(), **updates})
        print(f"{path}: columns {mapping.describe()}", file=sys.stderr)
        with tqdm(total=len(sheet.rows), desc=Path(path).name, unit="row", file=sys.stderr) as bar:
            report = sheet_submissions(sheet, mapping, lambda done, total: bar.update(done - bar.n))
        report.problems[:0] = read  # how it was read (--encoding auto: the encoding found)
        reports.append(report)
    return reports


def _cmd_import(args: argparse.Namespace) -> int:
    from data.loading import check_across_files, load_graded
    from data.spreadsheet import is_spreadsheet
    from data.store import Store

    sheets = [p for p in args.paths if is_spreadsheet(p) and not Path(p).is_dir()]
    if not sheets and (args.map or args.group_by or args.max_score or args.shape):
        print("import: --map, --group-by, --max-score and --shape are for .csv/.xlsx files", file=sys.stderr)
        return 2
    others = [p for p in args.paths if p not in sheets]
    reports = (load_graded(others).files if others else []) + _import_spreadsheets(args, sheets)
    report = check_across_files(reports)
    if not report.ok:
        print(report.format())
        print("nothing imported: fix the errors above first", file=sys.stderr)
        return 1
    if sheets and report.warnings:
        print(report.format(), file=sys.stderr)
    store = Store()
    ds_id, created = store.import_dataset(args.name, report.submissions, [str(Path(p).resolve()) for p in args.paths])
    if created:
        print(f"stored: dataset {args.name!r} id {ds_id}, {len(report.submissions)} submissions; "
              f"train on it with --set datasets=db:{args.name}")
    else:  # stored before, maybe under another name: that name is the one a run can use
        name = store.find_dataset(ds_id)["name"]
        print(f"already stored (same content) as dataset {name!r} id {ds_id}, {len(report.submissions)} submissions; "
              f"train on it with --set datasets=db:{name}")
    return 0


def _cmd_corrections_dataset(args: argparse.Namespace) -> int:
    from data.store import CorrectionError, Store

    try:
        ds_id, created, data = Store().store_corrections_dataset(args.name)
    except CorrectionError as e:
        print(f"nothing stored: {e}", file=sys.stderr)
        return 1
    for why in data.skipped:
        print(f"left out: {why}", file=sys.stderr)
    name = Store().find_dataset(ds_id)["name"]
    verb = "stored" if created else "already stored (the same corrections)"
    print(f"{verb}: dataset {name!r} id {ds_id}, {len(data.submissions)} submissions from "
          f"{len(data.correction_ids)} corrections; train on it with --set datasets=db:{name}")
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from data.tokenizer_offline import build_gpt_oss_tokenizer

    print(build_gpt_oss_tokenizer(Path(args.out) if args.out else None))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from training.presets import PRESETS

    print(json.dumps({k: v.model_dump() for k, v in PRESETS.items()}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from data.library_noise import quiet_library_noise

    quiet_library_noise()
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="start (or resume) a training run")
    src = r.add_mutually_exclusive_group()
    from training.presets import PRESETS

    src.add_argument("--preset", help=" | ".join(PRESETS) + " (default: the one for this machine's GPUs, "
                     "cpu-default without one)")
    src.add_argument("--config", help="a RunConfig JSON file")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    r.add_argument("--resume", metavar="RUN", help="continue RUN from its last complete checkpoint")
    r.add_argument("--detach", action="store_true", help="start and return (the run keeps going)")
    r.set_defaults(fn=_cmd_run)

    s = sub.add_parser("stop", help="stop a run after its current step (it saves first)")
    s.add_argument("run")
    s.set_defaults(fn=_cmd_stop)

    s = sub.add_parser("status", help="a run's progress, or the newest runs")
    s.add_argument("run", nargs="?")
    s.set_defaults(fn=_cmd_status)

    sub.add_parser("list", help="runs and datasets").set_defaults(fn=_cmd_list)

    v = sub.add_parser("validate", help="check graded-submission files")
    v.add_argument("paths", nargs="+")
    v.add_argument("--max-mb", type=float, default=20.0)
    v.set_defaults(fn=_cmd_validate)

    i = sub.add_parser("import", help="store a dataset under a name")
    i.add_argument("name")
    i.add_argument("paths", nargs="+", help=".json/.jsonl files or folders, .csv/.tsv/.xlsx spreadsheets")
    i.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="spreadsheets: which column holds FIELD (repeatable): submission, question_id, question, "
                        "reference_answer, answer, score, max_score, graders (comma-separated), group_by; "
                        "wide shape: questions, answers (comma-separated), max_row. An empty COLUMN drops a guess")
    i.add_argument("--group-by", help="spreadsheets: rows with the same value here (and submission) form one submission")
    i.add_argument("--max-score", type=float, help="spreadsheets: each question's maximum where no column or row says it")
    i.add_argument("--shape", choices=["long", "wide"],
                   help="spreadsheets: long = a row per answer, wide = a row per student, a column per question "
                        "(default: guessed)")
    i.add_argument("--encoding", default="utf-8", help="CSV text encoding (default utf-8; Excel's plain CSV: cp1252; "
                   "auto: UTF-8 when it is, else detected and said)")
    i.add_argument("--max-mb", type=float, default=20.0, help="refuse spreadsheets larger than this")
    i.set_defaults(fn=_cmd_import)

    c = sub.add_parser("corrections-dataset", help="store the teacher's corrections as a dataset")
    c.add_argument("name", nargs="?", help="dataset name (default: corrections-<date>)")
    c.set_defaults(fn=_cmd_corrections_dataset)

    t = sub.add_parser("tokenizer", help="build the offline GPT-OSS tokenizer")
    t.add_argument("--out")
    t.set_defaults(fn=_cmd_tokenizer)

    sub.add_parser("presets", help="print the presets").set_defaults(fn=_cmd_presets)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

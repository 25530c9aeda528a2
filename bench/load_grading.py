"""Load test of the studio's grading endpoint: N concurrent requests through gradio_client.

    .venv/bin/python bench/load_grading.py [--model embedded:gemma-3-270m] [--requests 32]
        [--max-new-tokens 64] [--max-jobs 2] [--url URL] [--out bench/results/load_grading.json]

Starts `python app.py` on a free port (own store and checkpoints folder in a temp dir) unless
--url is given, sends one warm-up request (loads the model), then fires all requests at once
(each its own gradio_client job on one client, i.e. one browser session's worth of clicks) and
waits for all. Prints p50/p95/max latency (submit -> result, queue wait included), throughput,
the most requests seen processing at once (the server's --max-jobs limit) and the command.
Exit status 1 if any request failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RUBRIC = REPO / "data" / "samples" / "rubrics" / "algebra-linear.json"
SUBMISSIONS = sorted((REPO / "data" / "samples" / "submissions").glob("algebra-linear-*.md"))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def run_load(url: str, *, n: int, model: str, max_new_tokens: int, auth: tuple[str, str] | None = None,
             warmup: bool = True) -> dict:
    """Fire `n` concurrent /grade requests at `url`; returns the figures (and per-request errors)."""
    from gradio_client import Client
    from gradio_client.utils import Status

    client = Client(url, auth=auth, verbose=False)
    texts = [p.read_text(encoding="utf-8") for p in SUBMISSIONS] or ["## Question 1: x\n\nx\n"]
    # Each request names its student (the Grade tab refuses pasted text without one).
    args = lambda i: (model, "", str(RUBRIC), None, texts[i % len(texts)], False, max_new_tokens,  # noqa: E731
                      f"student-{i}")

    warm_s = None
    if warmup:
        t = time.perf_counter()
        client.predict(*args(0), api_name="/grade")
        warm_s = time.perf_counter() - t

    submitted: list[float] = []
    jobs = []
    t0 = time.perf_counter()
    for i in range(n):
        submitted.append(time.perf_counter())
        jobs.append(client.submit(*args(i), api_name="/grade"))

    # Watch how many run at once (the queue's concurrency limit) while waiting.
    # A job's end time is when the watcher first sees it done (50 ms resolution). The client learns
    # of a job's end a little after the server has started the next one, so one poll can see a
    # finished job still "processing" beside its successor: a job counts as running at once with
    # others only when two polls in a row (>= 50 ms) see them all processing. A server running more
    # than --max-jobs would show it for a whole grade (seconds), not one poll.
    max_processing, max_seen_once, done = 0, 0, threading.Event()
    # A running grade reports its phase (gr.Progress) or streams its output: either is processing.
    RUNNING = (Status.PROCESSING, Status.PROGRESS, Status.ITERATING)
    finished: list[float | None] = [None] * n

    def watch():
        nonlocal max_processing, max_seen_once
        before: set[int] = set()
        while not done.is_set():
            busy: set[int] = set()
            for k, j in enumerate(jobs):
                if finished[k] is None and j.done():
                    finished[k] = time.perf_counter()
                elif finished[k] is None and j.status().code in RUNNING:
                    busy.add(k)
            max_seen_once = max(max_seen_once, len(busy))
            max_processing = max(max_processing, len(busy & before))
            before = busy
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    latencies, errors, totals = [], [], []
    for i, job in enumerate(jobs):
        try:
            out = job.result(timeout=3600)
            total_md = out[4]  # (tuned raw, tuned total, tuned table, base raw, base total, base table)
            if not str(total_md).startswith("**Base:"):
                errors.append(f"request {i}: unexpected output {str(total_md)[:200]!r}")
            totals.append(total_md)
        except Exception as exc:  # noqa: BLE001 - every failure is reported
            errors.append(f"request {i}: {type(exc).__name__}: {exc}")
    time.sleep(0.2)  # let the watcher see the last one done
    done.set()
    watcher.join(timeout=5)
    end = time.perf_counter()
    for i in range(n):
        latencies.append((finished[i] or end) - submitted[i])
    wall = max(f or end for f in finished) - t0
    ok = n - len(errors)
    return {
        "url": url, "model": model, "requests": n, "ok": ok, "errors": errors,
        "max_new_tokens": max_new_tokens, "warmup_s": None if warm_s is None else round(warm_s, 2),
        "wall_s": round(wall, 2), "throughput_rps": round(n / wall, 3),
        "p50_s": round(percentile(latencies, 50), 2) if latencies else None,
        "p95_s": round(percentile(latencies, 95), 2) if latencies else None,
        "max_s": round(max(latencies), 2) if latencies else None,
        "mean_s": round(statistics.mean(latencies), 2) if latencies else None,
        "max_processing_at_once": max_processing,
        "max_processing_in_one_poll": max_seen_once,
    }


def start_app(workdir: Path, max_jobs: int):
    from tests.test_reliability_support import AppServer, studio_env

    env = studio_env(workdir / "checkpoints", workdir / "studio.db")
    return AppServer(workdir, env, "--max-jobs", str(max_jobs)).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:gemma-3-270m")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-jobs", type=int, default=2, help="the app's --max-jobs (when it is started here)")
    p.add_argument("--url", help="an already running studio (default: start one)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("GRADER_CACHE", str(REPO / ".cache"))

    srv = None
    url = args.url
    if not url:
        srv = start_app(Path(tempfile.mkdtemp(prefix="load-grading-")), args.max_jobs)
        url = srv.url
    try:
        res = run_load(url, n=args.requests, model=args.model, max_new_tokens=args.max_new_tokens)
    finally:
        if srv:
            srv.stop()
    res["command"] = shlex.join([".venv/bin/python", "bench/load_grading.py", *(argv if argv is not None else sys.argv[1:])])
    res["cpu_count"] = os.cpu_count()
    res["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)  # other work on the machine skews the figures
    res["max_jobs"] = args.max_jobs if not args.url else None
    print(f"{res['requests']} concurrent /grade requests on {res['model']} "
          f"(max_new_tokens {res['max_new_tokens']}, app --max-jobs {res['max_jobs']}):")
    print(f"  ok {res['ok']}/{res['requests']}, errors {len(res['errors'])}")
    print(f"  latency p50 {res['p50_s']} s, p95 {res['p95_s']} s, max {res['max_s']} s "
          f"(submit -> result, queue included); warm-up {res['warmup_s']} s")
    print(f"  throughput {res['throughput_rps']} requests/s over {res['wall_s']} s; "
          f"at most {res['max_processing_at_once']} processing at once")
    print(f"  machine: {res['cpu_count']} CPUs, 1-min load average at the end {res['load_avg_1m_at_end']}")
    print(f"  command: {res['command']}")
    for e in res["errors"][:10]:
        print("  " + e)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The studio through its HTTP API (gradio_client), against a real `python app.py` server.

One server per module (own store and checkpoints folder); one smoke training run shared by the
flow test: upload sample data -> store -> launch -> loss points -> checkpoint -> grade Markdown.
"""
from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from scoring.distribution import REVIEW_THRESHOLD

from tests.test_reliability_support import frozen, listening_addresses, wait_for
from tests.conftest import REPO

DATA = REPO / "data" / "samples"
# The run tests wait for: smoke preset (tiny GPT-OSS, one gloo rank) incl. a first JIT build.
TRAIN_TIMEOUT_S = 900
SMOKE_MAX_LENGTH = 1536
# The UI tests train on one sample assignment (10 graded files): 8 train, 2 eval examples.
TRAIN_ASSIGNMENT = "algebra-linear"
# The API flow stops its run part-way and resumes it: enough steps that Stop lands before the end.
FLOW_STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def app_server(tmp: Path, *args: str, env: dict[str, str] | None = None,
               timeout_s: float = 240) -> Iterator[str]:
    """`python app.py --port N ARGS` with its own store/checkpoints under `tmp`; yields the URL."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "checkpoints").mkdir(exist_ok=True)
    full_env = {**os.environ, "GRADER_DB": str(tmp / "studio.db"),
                "GRADER_CHECKPOINTS": str(tmp / "checkpoints"), "PYTHONUNBUFFERED": "1",
                **(env or {})}
    full_env.pop("GRADER_AUTH", None) if "GRADER_AUTH" not in (env or {}) else None
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), *args],
                            cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError("app.py exited:\n" + (tmp / "server.log").read_text()[-4000:])
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except urllib.error.HTTPError:
                break  # answering (e.g. login required)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("app.py did not answer:\n"
                                       + (tmp / "server.log").read_text()[-4000:])
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def kill_runs(checkpoints: Path) -> None:
    """Test cleanup: end every training run started under `checkpoints` (own process groups)."""
    import signal

    for pid_file in checkpoints.glob("*/pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def ui_run_config(dataset: str, max_steps: int = 2):
    """The smoke preset (tiny GPT-OSS, real DeepSpeed launcher) cut to a few steps on one gloo rank:
    enough for loss points, a checkpoint per step, an eval point and a final adapter (the UI shows
    one rank's run as it shows two's; tests/test_reliability_support.py's tiny_overrides says why)."""
    from training.presets import PRESETS

    smoke = PRESETS["smoke"]
    return smoke.model_copy(update={
        "datasets": [f"db:{dataset}"], "max_steps": max_steps, "save_every_steps": 1,
        "per_device_batch_size": 1, "gradient_accumulation_steps": 1, "num_processes": 1,
        # The sample data's harmony prompts are ~1.1-1.4k tokens: keep every example trainable.
        "max_length": max(smoke.max_length, SMOKE_MAX_LENGTH)})


def launch_values(dataset: str, max_steps: int = 2) -> list:
    """The Launch endpoint's inputs, made by the same form generator the page uses."""
    from app.forms import ModelForm
    from training.config import RunConfig

    return ModelForm(RunConfig).values_of(ui_run_config(dataset, max_steps))


class AppServer:
    """`python app.py` on a fixed store/checkpoints folder that can be stopped and started again
    (an app restart while a run trains)."""

    def __init__(self, workdir: Path, *args: str):
        self.workdir, self.args = workdir, args
        self._cm = None
        self.url = ""

    def start(self) -> str:
        self._cm = app_server(self.workdir, *self.args)
        self.url = self._cm.__enter__()
        return self.url

    def stop(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[AppServer]:
    srv = AppServer(tmp_path_factory.mktemp("ui_client"))
    srv.start()
    yield srv
    srv.stop()
    kill_runs(srv.workdir / "checkpoints")


@pytest.fixture(scope="module")
def server(app) -> str:
    return app.url


def test_server_listens_on_localhost_only_by_default(server):
    port = int(server.rsplit(":", 1)[1].strip("/"))
    addrs = listening_addresses(port)
    assert addrs == {"0100007F"}, f"listening on {addrs} (expected only 127.0.0.1)"


def test_malformed_upload_reports_file_path_reason_and_stores_nothing(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    bad = tmp_path / "broken.json"
    bad.write_text('[{"score": 7, "max_score": 5, "rubric_alignment": '
                   '[{"question": "Q1", "answer": "a", "score": 7, "max_score": 5}]}]')
    good = sorted((DATA / "graded").rglob("*.json"))[0]
    summary, problems, *_ = client.predict([handle_file(str(bad)), handle_file(str(good))],
                                           "embedded:tiny-gpt-oss", 512, api_name="/validate")
    assert "errors" in summary.lower() and "broken.json" in summary
    rows = problems["data"]
    assert rows and all(r[0] == "broken.json" for r in rows)
    assert any("score" in r[1] for r in rows), rows
    msg, table, _ = client.predict("should-not-exist", api_name="/store_dataset")
    assert "Nothing stored" in msg
    assert "should-not-exist" not in str(table["data"])


def test_configure_shows_validation_memory_warning_and_command(server):
    """The Configure endpoint: what a config costs per GPU, whether it fits, the exact command."""
    from gradio_client import Client

    from app.forms import ModelForm
    from training.config import RunConfig
    from training.presets import PRESETS

    client = Client(server, verbose=False)
    form = ModelForm(RunConfig)
    too_big = PRESETS["smoke"].model_copy(update={"gpu_memory_gib": 0.25})
    messages, memory, command = client.predict(*form.values_of(too_big),
                                               api_name="/describe_config")
    assert "likely out of memory" in memory and "does NOT fit in 0.25 GiB" in memory, memory
    assert "run out of GPU memory" in messages
    assert "deepspeed.launcher.launch" in command and "train_entry.py" in command
    assert "# ranks: 2 on localhost (CPU, gloo)" in command
    broken = form.values_of(PRESETS["smoke"])
    broken[form.names.index("max_steps")] = "many"
    messages, _, _ = client.predict(*broken, api_name="/describe_config")
    assert "Invalid config" in messages and "max_steps" in messages, messages
    missing = form.values_of(PRESETS["smoke"].model_copy(update={"model": "/nowhere/model"}))
    messages, _, _ = client.predict(*missing, api_name="/describe_config")
    assert "Launch refused until fixed" in messages and "/nowhere/model" in messages, messages


def test_upload_train_restart_and_grade_flow(app):
    """Upload -> store -> launch -> loss points -> app restart reattaches -> checkpoint -> grade."""
    from gradio_client import Client, handle_file

    t0 = time.monotonic()

    def phase(name: str) -> None:  # progress on stdout (pytest -s): where the minutes go
        print(f"[ui flow {time.monotonic() - t0:6.1f}s] {name}", flush=True)

    client = Client(app.url, verbose=False)
    files = sorted((DATA / "graded" / TRAIN_ASSIGNMENT).glob("*.json"))
    assert files, "sample data missing"
    summary, problems, stats, _plot, preview = client.predict(
        [handle_file(str(f)) for f in files], "embedded:tiny-gpt-oss", SMOKE_MAX_LENGTH,
        api_name="/validate")[:5]
    assert "All files valid" in summary, (summary, problems)
    assert f"{len(files)} submissions" in stats and "would be cut" in stats, stats
    assert preview["data"], "preview table empty"
    msg, table, _ = client.predict("samples", api_name="/store_dataset")
    assert "Stored dataset" in msg, msg
    assert "samples" in str(table["data"])

    phase("stored; launching")
    message, run = client.predict(*launch_values("samples", FLOW_STEPS), api_name="/launch")
    assert message.startswith("Launched"), message
    run_id = run if isinstance(run, str) else run.get("value")
    # A second launch on the same devices is refused with a clear message.
    again, _ = client.predict(*launch_values("samples", FLOW_STEPS), api_name="/launch")
    assert again.startswith("Refused") and run_id in again, again

    def view(c):
        return c.predict(run_id, api_name="/run_view")  # status, progress bar, figure, log tail

    def has_loss():
        status, _, fig, log = view(client)
        assert "failed" not in status, (status, log)
        return status if re.search(r"\bloss \d", status) and "train loss" in str(fig) else None

    wait_for(has_loss, TRAIN_TIMEOUT_S, "loss points", poll_s=0.5)
    phase("loss points seen; restarting the app")

    # Freeze the run (SIGSTOP to its process group) across the app restart: on a fast machine its
    # few steps could otherwise end before Stop arrives. Its processes stay alive, as a long run's do.
    with frozen(int((app.workdir / "checkpoints" / run_id / "pid").read_text()), app.workdir / "studio.db"):
        # Restart the app while the run trains: the new app shows the same run (reattached)...
        app.stop()
        app.start()
        client = Client(app.url, verbose=False)
        picked, status, *_ = client.predict(api_name="/current_run")
        assert (picked.get("value") if isinstance(picked, dict) else picked) == run_id
        assert run_id in status and "running" in status, status
        # ...and controls it: Stop finishes the step and saves; Resume continues from that checkpoint.
        assert "Stopping" in client.predict(run_id, api_name="/stop")

    def settled(state):
        def check():
            status, bar, fig, log = view(client)
            assert "failed" not in status, (status, log)
            done = f"**{state}**" in status and "still exiting" not in status
            return (status, bar, fig) if done else None
        return check

    phase("restarted app reattached; stopping")
    status, bar, _ = wait_for(settled("stopped"), TRAIN_TIMEOUT_S, "the run to stop", poll_s=0.5)
    stopped_at = int(re.search(r'data-step="(\d+)"', bar).group(1))
    assert 1 <= stopped_at < FLOW_STEPS and "checkpoints:" in status, (status, bar)
    phase("stopped; resuming")
    message, _ = client.predict(run_id, api_name="/resume")
    assert "Resuming" in message, message
    status, bar, fig = wait_for(settled("finished"), TRAIN_TIMEOUT_S, "the resumed run to finish", poll_s=0.5)
    assert "checkpoints:" in status and "(final)" in status, status
    assert f'data-step="{FLOW_STEPS}"' in bar and "eval loss" in str(fig)
    phase("resumed run finished; grading")
    # The checkpoints are offered in the Grade tab.
    update = client.predict(api_name="/refresh_adapters")
    choices = {label: path for label, path in update["choices"]}
    assert f"{run_id}/final" in choices and f"{run_id}/checkpoint-1" in choices, choices

    rubric = DATA / "rubrics" / f"{TRAIN_ASSIGNMENT}.json"
    md = next((DATA / "submissions").glob(f"{TRAIN_ASSIGNMENT}-*.md")).read_text()
    out = client.predict("embedded:tiny-gpt-oss", choices[f"{run_id}/final"], str(rubric), None,
                         md, True, 24, "chloe", api_name="/grade")
    tuned_raw, tuned_total, tuned_table, base_raw, base_total, base_table = out
    assert tuned_total.startswith("**Tuned:") and " / " in tuned_total, tuned_total
    assert base_total.startswith("**Base:"), base_total
    n_questions = len(json.loads(rubric.read_text())["questions"])
    assert len(tuned_table["data"]) == n_questions == len(base_table["data"])
    assert [r[0] for r in tuned_table["data"]] == [
        q["question"] for q in json.loads(rubric.read_text())["questions"]]
    # Each question shows the model's confidence, and those below the grader's review threshold
    # (the adapter's own, chosen on its validation data; the base model's the default) say so.
    from scoring.selective import load_review

    head = tuned_table["headers"]
    tuned_threshold = (load_review(choices[f"{run_id}/final"]) or {}).get("threshold", REVIEW_THRESHOLD)
    for table, threshold in ((tuned_table, tuned_threshold), (base_table, REVIEW_THRESHOLD)):
        for row in table["data"]:
            conf, review = float(row[head.index("confidence")]), row[head.index("review")]
            assert 0 <= conf <= 1 and review in ("needs review", "")
            if abs(conf - threshold) > 0.01:  # the table shows confidence rounded to 2 places
                assert review == ("needs review" if conf < threshold else "")

    phase("graded; batch grading")
    # Many submissions at once -> a table and a CSV to download.
    mds = sorted((DATA / "submissions").glob(f"{TRAIN_ASSIGNMENT}-*.md"))
    table, csv_file = client.predict("embedded:tiny-gpt-oss", choices[f"{run_id}/final"],
                                     str(rubric), None, [handle_file(str(m)) for m in mds], 16,
                                     api_name="/grade_batch")
    assert sorted(r[0] for r in table["data"]) == sorted(m.name for m in mds)
    with open(csv_file, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(mds) * n_questions and {r["file"] for r in rows} == {m.name for m in mds}

    phase("batch graded; runs tab")
    # Runs: the history row, export (merge) a checkpoint, then delete the dataset and the run.
    history = client.predict(api_name="/runs")[0]
    row = next(r for r in history["data"] if r[0] == run_id)
    assert row[2] == "finished" and row[6] is not None and row[7] is not None, row
    msg = client.predict(choices[f"{run_id}/checkpoint-1"], api_name="/export_adapter")
    assert "Merged model written" in msg, msg
    merged = Path(re.search(r"`(.+?)`", msg).group(1))
    assert (merged / "config.json").exists() and list(merged.glob("*.safetensors"))
    msg = client.predict("samples", api_name="/delete_dataset")[0]
    assert "Deleted dataset" in msg, msg
    msg, history, *_ = client.predict(run_id, api_name="/delete_run")
    assert "Deleted run" in msg and run_id not in str(history["data"]), msg


def test_login_required_and_upload_size_limited(tmp_path):
    """GRADER_AUTH turns on the login; a wrong password is refused; uploads over --max-upload-mb
    are refused by the server before any handler reads them."""
    import httpx
    from gradio_client import Client

    with app_server(tmp_path, "--max-upload-mb", "0.05",
                    env={"GRADER_AUTH": "teacher:s3cret"}) as url:
        with pytest.raises(ValueError, match="login"):
            Client(url, auth=("teacher", "wrong"), verbose=False)
        with httpx.Client(base_url=url) as http:
            assert http.post("/gradio_api/upload", files={"files": ("a.json", b"[]")}).status_code == 401
            assert http.post("/login", data={"username": "teacher", "password": "wrong"}).status_code == 400
            assert http.post("/login", data={"username": "teacher", "password": "s3cret"}).status_code == 200
            big = http.post("/gradio_api/upload", files={"files": ("big.json", b"[1]," * 20000)})
            assert big.status_code == 413
        client = Client(url, auth=("teacher", "s3cret"), verbose=False)
        picked, status, *_ = client.predict(api_name="/current_run")
        assert "No run yet" in status

"""Security of the running studio (`python app.py` as a real process, raw HTTP and gradio_client):
localhost-only by default, login with --auth, upload names never used as paths, upload size
limit, dataset/run names that look like paths, adapters from the checkpoints folder and
safetensors only (a pickle adapter never gets unpickled)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from tests.test_reliability_support import REPO, app_server, listening_addresses, studio_env

USER, PASSWORD = "alice", "s3cret-pw"
MAX_UPLOAD_MB = 0.05  # 52,428 bytes
DATA = REPO / "data" / "samples"
RUBRIC = str(DATA / "rubrics" / "algebra-linear.json")
MD = (DATA / "submissions" / "algebra-linear-chloe.md")


class Pickled:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    ckpts = root / "checkpoints"
    env = studio_env(ckpts, root / "studio.db", GRADIO_TEMP_DIR=str(root / "gradio" / "a" / "b"))
    with app_server(root, env, "--auth", f"{USER}:{PASSWORD}",
                    "--max-upload-mb", str(MAX_UPLOAD_MB)) as srv:
        yield {"root": root, "srv": srv, "ckpts": ckpts, "env": env}


@pytest.fixture(scope="module")
def client(studio):
    from gradio_client import Client

    return Client(studio["srv"].url, auth=(USER, PASSWORD), verbose=False)


@pytest.fixture(scope="module")
def session(studio):
    """A logged-in HTTP session (cookie) for raw requests."""
    import httpx

    s = httpx.Client(base_url=studio["srv"].url, timeout=60)
    r = s.post("login", data={"username": USER, "password": PASSWORD})
    assert r.status_code == 200, r.text
    yield s
    s.close()


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_server_listens_on_127_0_0_1_only_by_default(studio):
    assert listening_addresses(studio["srv"].port) == {"0100007F"}


def test_auth_refuses_missing_and_wrong_passwords(studio):
    import httpx
    from gradio_client import Client

    url = studio["srv"].url
    assert httpx.get(url + "gradio_api/info").status_code == 401
    bad = httpx.post(url + "login", data={"username": USER, "password": "wrong"})
    assert bad.status_code in (400, 401), bad.text
    assert "set-cookie" not in {k.lower() for k in bad.headers}
    for auth in (None, (USER, "wrong"), ("mallory", PASSWORD)):
        with pytest.raises(Exception):
            Client(url, auth=auth, verbose=False)
    Client(url, auth=(USER, PASSWORD), verbose=False).view_api(print_info=False)


def test_uploaded_file_name_is_never_used_as_a_path(studio, session, client):
    before = _files_under(studio["root"]) | _files_under(REPO)
    r = session.post("gradio_api/upload", files={"files": ("../../evil.json", b"[]", "application/json")})
    assert r.status_code == 200, r.text
    [server_path] = r.json()
    gradio_tmp = Path(studio["env"]["GRADIO_TEMP_DIR"]).resolve()
    assert gradio_tmp in Path(server_path).resolve().parents
    summary, problems, *_ = client.predict(
        [{"path": server_path, "orig_name": "../../evil.json", "meta": {"_type": "gradio.FileData"}}],
        "embedded:tiny-gpt-oss", 512, api_name="/validate")
    assert "**evil.json**" in summary and "../" not in summary
    assert all(row[0] == "evil.json" for row in problems["data"]), problems
    new = (_files_under(studio["root"]) | _files_under(REPO)) - before
    outside = [p for p in new if gradio_tmp not in p.resolve().parents and p.name == "evil.json"]
    assert not outside, outside


def test_upload_over_the_size_limit_is_refused_by_the_server(studio, session):
    limit = int(MAX_UPLOAD_MB * 1024 * 1024)
    big = b"[" + b",".join([b"{}"] * (limit // 3 + 10)) + b"]"
    assert len(big) > limit
    before = _files_under(Path(studio["env"]["GRADIO_TEMP_DIR"]))
    r = session.post("gradio_api/upload", files={"files": ("big.json", big, "application/json")})
    assert r.status_code == 413, (r.status_code, r.text)
    assert str(limit) in r.text  # says what the limit is
    after = _files_under(Path(studio["env"]["GRADIO_TEMP_DIR"]))
    assert not [p for p in after - before if p.name == "big.json"]


def test_dataset_and_run_names_that_look_like_paths_stay_names(studio, client):
    from gradio_client import handle_file

    good = sorted((DATA / "graded").rglob("*.json"))[0]
    summary, *_ = client.predict([handle_file(str(good))], "embedded:tiny-gpt-oss", 512,
                                 api_name="/validate")
    assert "All files valid" in summary, summary
    before = _files_under(studio["root"]) | _files_under(REPO)
    name = "../../../evil-dataset"
    msg, table, _ = client.predict(name, api_name="/store_dataset")
    after = (_files_under(studio["root"]) | _files_under(REPO)) - before
    assert not [p for p in after if "evil" in p.name], after  # a row in SQLite, never a file
    if "Stored" in msg:
        assert name in str(table["data"])  # stored under that exact name, as text
    # Run ids that would step outside the checkpoints folder are refused, nothing deleted.
    outside = studio["root"] / "keep-me"
    outside.mkdir(exist_ok=True)
    (outside / "f.txt").write_text("x")
    try:
        msg = client.predict(f"../{outside.name}", api_name="/delete_run")[0]
    except Exception as exc:  # refused with an error: fine, as long as nothing is deleted
        msg = str(exc)
    assert "not a folder name inside" in msg or "Pick" in msg, msg
    assert outside.exists() and (outside / "f.txt").exists(), msg


def _adapter_config(base: str) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
            "target_modules": ["q_proj"], "base_model_name_or_path": base}


def _grade(client, adapter: str):
    return client.predict("embedded:tiny-gpt-oss", adapter, RUBRIC, None, MD.read_text(), False, 8,
                          api_name="/grade")


def test_pickle_only_adapter_is_refused_and_never_unpickled(studio, client, tmp_path):
    folder = studio["ckpts"] / "pickled-run" / "checkpoint-1"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(_adapter_config("embedded:tiny-gpt-oss")))
    marker = tmp_path / "UNPICKLED"
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump(Pickled(marker), f)
    choices = client.predict(api_name="/refresh_adapters")["choices"]
    assert str(folder) not in [c[1] for c in choices]
    with pytest.raises(Exception) as err:
        _grade(client, str(folder))
    assert "safetensors" in str(err.value), err.value
    assert not marker.exists()
    # The engine itself (CLI path) refuses it too, before any weights are read.
    from inference.adapters import check_adapter_dir

    with pytest.raises(Exception, match="pickle"):
        check_adapter_dir(folder)
    assert not marker.exists()


def test_adapters_outside_the_checkpoints_folder_are_refused(studio, client, tmp_path):
    outside = tmp_path / "elsewhere" / "checkpoint-1"
    outside.mkdir(parents=True)
    (outside / "adapter_config.json").write_text(json.dumps(_adapter_config("embedded:tiny-gpt-oss")))
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(1)}, str(outside / "adapter_model.safetensors"))
    candidates = [str(outside), str(studio["ckpts"]) + "/../../../../../../.." + str(outside)]
    link = studio["ckpts"] / "linked-run"
    link.symlink_to(outside.parent, target_is_directory=True)
    candidates.append(str(link / "checkpoint-1"))
    try:
        for adapter in candidates:
            with pytest.raises(Exception) as err:
                _grade(client, adapter)
            assert "not inside" in str(err.value), (adapter, err.value)
        choices = [c[1] for c in client.predict(api_name="/refresh_adapters")["choices"]]
        assert not [c for c in choices if "elsewhere" in c], choices
    finally:
        link.unlink()
        shutil.rmtree(outside.parent)


def _raw_call(session, api: str, data: list) -> str:
    """Call an endpoint over plain HTTP (no gradio_client: it would upload local paths itself)
    and return the event stream's text."""
    r = session.post(f"gradio_api/call/{api}", json={"data": data})
    assert r.status_code == 200, r.text
    event_id = r.json()["event_id"]
    return session.get(f"gradio_api/call/{api}/{event_id}").text


def test_the_api_cannot_make_the_server_read_its_own_files(studio, session):
    """File inputs accept only what was uploaded: a request naming a server path (a file next to
    the store, /etc/passwd) gets an error, and rubric paths are limited to data/samples/rubrics."""
    secret = studio["root"] / "secret.json"
    secret.write_text(json.dumps([{"score": 1, "max_score": 1, "rubric_alignment": [
        {"question": "TOP-SECRET-QUESTION", "answer": "a", "score": 1, "max_score": 1}]}]))
    for path in (str(secret), "/etc/passwd", str(REPO / "data" / "samples" / "rubrics" / "algebra-linear.json")):
        out = _raw_call(session, "validate", [[{"path": path, "orig_name": "x.json",
                                                "meta": {"_type": "gradio.FileData"}}], "embedded:tiny-gpt-oss", 512])
        assert "event: error" in out, out[:500]
        assert "TOP-SECRET-QUESTION" not in out and "root:x" not in out and "All files valid" not in out
    out = _raw_call(session, "grade", ["embedded:tiny-gpt-oss", "", "/etc/passwd", None, MD.read_text(), False, 8])
    assert "event: error" in out and "root:x" not in out, out[:500]

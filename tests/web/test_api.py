"""The lesson page's JSON API and pages through FastAPI's test client: the same numbers as the library,
bad input named, foreign requests refused, nothing outside the runs folder readable."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from nnvitals import numbers
from nnvitals.study import exercise, store
from nnvitals.study.material import packaged
from nnvitals.web import create_app, runs
from nnvitals.web.guard import Guard

from .conftest import BASE, PORT, test_client


def test_calculators_answer_with_the_numbers_module(client):
    r = client.get("/api/numbers/baseline", params={"classes": 27})
    assert r.status_code == 200
    assert r.json()["baseline"] == numbers.baseline_loss(27)
    assert "3.2958 nats" in r.json()["text"] and "27 classes" in r.json()["text"]

    r = client.get("/api/numbers/verdict", params={"classes": 27, "loss": 13.5})
    assert r.json() == {k: v for k, v in numbers.judge_start_loss(13.5, 27).to_dict().items()}
    assert client.get("/api/numbers/verdict", params={"classes": 50, "loss": 3.95}).json()["status"] == "healthy"

    r = client.get("/api/numbers/tanh", params={"x": 2})
    assert r.json()["local_derivative"] == pytest.approx(1 - math.tanh(2) ** 2)
    assert "7.1% of its gradient" in r.json()["text"]


@pytest.mark.parametrize(("method", "path", "payload", "field"), [
    ("GET", "/api/numbers/baseline", {"classes": 1}, "classes"),
    ("GET", "/api/numbers/baseline", {"classes": "many"}, "classes"),
    ("GET", "/api/numbers/verdict", {"classes": 27}, "loss"),
    ("GET", "/api/numbers/verdict", {"classes": 27, "loss": -1}, "loss"),
    ("GET", "/api/numbers/tanh", {"x": "nan"}, "x"),
    ("POST", "/api/exercise/check", {"case": {"kind": "tanh", "preactivation": 2}, "answers": ["0.96", "lots"]},
     "answers.1"),
    ("POST", "/api/exercise/check", {"case": {"kind": "start-loss", "classes": 27}, "answers": []}, "case"),
    ("POST", "/api/exercise/check", {"case": {"kind": "guess"}, "answers": []}, "case.kind"),
    ("POST", "/api/review/grade", {"card_id": "card-baseline", "rating": 5}, "rating"),
    ("POST", "/api/review/grade", {"card_id": "card-unknown", "rating": 3}, "card_id"),
    ("POST", "/api/lab/job", {"steps": 0}, "steps"),
    ("POST", "/api/lab/job", {"stages": ["naive", "warp-drive"]}, "stages"),
    ("POST", "/api/lab/job", {"stages": []}, "stages"),
])
def test_bad_input_is_422_naming_the_field(client, method, path, payload, field):
    r = client.get(path, params=payload) if method == "GET" else client.post(path, json=payload)
    assert r.status_code == 422
    body = r.json()
    assert field in [d["field"] for d in body["detail"]]
    assert body["message"].startswith(f"{field}: ")


def test_the_three_cases_checked_against_the_exercise_module(client):
    for case in packaged().cases:
        problem = exercise.pose(case)
        inputs = {"kind": case.kind, "classes": case.classes, "loss": case.loss, "preactivation": case.preactivation}
        right = client.post("/api/exercise/check", json={"case": inputs, "answers": [s.shown for s in problem.steps]})
        assert right.status_code == 200, right.text
        result = right.json()
        assert [s["right"] for s in result["steps"]] == [True] * len(problem.steps)
        assert result["solution"] == list(problem.solution) and result["verdict"] == problem.verdict
        off = [f"{s.expected + 3 * s.tolerance:.4f}" for s in problem.steps]
        wrong = client.post("/api/exercise/check", json={"case": inputs, "answers": off}).json()
        assert [s["right"] for s in wrong["steps"]] == [False] * len(problem.steps)
        skipped = client.post("/api/exercise/check", json={"case": inputs, "answers": []}).json()
        assert [s["right"] for s in skipped["steps"]] == [None] * len(problem.steps)
        assert [s["shown"] for s in skipped["steps"]] == [s.shown for s in problem.steps]
    tanh = {"kind": "tanh", "preactivation": 2}
    assert client.post("/api/exercise/check", json={"case": tanh, "answers": ["0,964", "7%"]}).json()["right"] == 2
    too_many = client.post("/api/exercise/check", json={"case": tanh, "answers": ["1", "2", "3"]})
    assert too_many.status_code == 422 and "asks for 2 figures" in too_many.json()["message"]


def test_a_drilled_case_can_be_checked(client):
    posed = client.get("/api/exercise/drill", params={"seed": 7}).json()
    assert posed == client.get("/api/exercise/drill", params={"seed": 7}).json()  # the seed repeats the draw
    inputs = {k: posed[k] for k in ("kind", "classes", "loss", "preactivation")}
    checked = client.post("/api/exercise/check", json={"case": inputs, "answers": []}).json()
    assert [s["prompt"] for s in checked["steps"]] == [s["prompt"] for s in posed["steps"]]
    kinds = {client.get("/api/exercise/drill", params={"seed": s}).json()["kind"] for s in range(12)}
    assert kinds == {"start-loss", "baseline", "tanh"}


def test_grades_go_to_the_studys_own_database(client, folders):
    db = folders["db"]
    state = client.get("/api/review").json()
    assert (state["due"], state["new"], state["cards"]) == (0, 8, 8)
    assert state["card"]["id"] == packaged().cards[0].id and state["db"] == str(db)

    graded = client.post("/api/review/grade", json={"card_id": "card-saturation", "rating": 1})
    assert graded.status_code == 200
    assert graded.json()["review"]["rating_name"] == "Again"
    assert graded.json()["queue"]["new"] == 7
    stats = store.stats(db)  # what `nnvitals study stats` reads
    assert stats.reviews == 1 and stats.new == 7
    assert next(s for s in stats.schedules if s.card_id == "card-saturation").lapses == 1

    store.grade(db, "card-baseline", 3)  # a grade given in the terminal shows on the page
    assert client.get("/api/review").json()["reviews"] == 2


def test_a_foreign_database_is_refused_not_touched(tmp_path):
    notes = tmp_path / "notes.db"
    notes.write_bytes(b"these are my notes, not a database\n" * 10)
    app = create_app(tmp_path / "runs", notes, port=PORT)
    with test_client(app) as c:
        r = c.get("/api/review")
        assert r.status_code == 503 and "not an SQLite database" in r.json()["detail"]
        assert c.post("/api/review/grade", json={"card_id": "card-baseline", "rating": 3}).status_code == 503
    assert notes.read_bytes() == b"these are my notes, not a database\n" * 10


@pytest.mark.parametrize("host", ["evil.example:8765", "127.0.0.1:9999", "localhost", "127.0.0.1:8765@evil.example"])
def test_requests_for_another_host_are_refused(client, host):
    r = client.get("/api/review", headers={"Host": host})
    assert r.status_code == 403 and "refused" in r.json()["detail"]
    r = client.post("/api/review/grade", json={"card_id": "card-baseline", "rating": 3}, headers={"Host": host})
    assert r.status_code == 403
    assert client.get("/api/review").json()["reviews"] == 0  # nothing was written


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "http://127.0.0.1:9999"},
    {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site"},
])
def test_cross_site_writes_are_refused(client, headers):
    r = client.post("/api/review/grade", json={"card_id": "card-baseline", "rating": 3}, headers=headers)
    assert r.status_code == 403 and "this server's pages" in r.json()["detail"]
    r = client.post("/api/lab/job", json={"stages": ["naive"], "steps": 1}, headers=headers)
    assert r.status_code == 403
    assert client.get("/api/lab/job").json()["state"] == "idle"  # no run was started
    assert client.get("/api/review").json()["reviews"] == 0


def test_the_pages_own_requests_and_other_names_for_it_are_accepted(client):
    same = {"Origin": BASE, "Sec-Fetch-Site": "same-origin"}
    r = client.post("/api/review/grade", json={"card_id": "card-baseline", "rating": 3}, headers=same)
    assert r.status_code == 200
    for host in (f"localhost:{PORT}", f"[::1]:{PORT}"):
        assert client.get("/", headers={"Host": host}).status_code == 200


def test_listening_beyond_loopback_still_refuses_domain_names():
    guard = Guard("0.0.0.0", 8765)
    assert guard.host_problem("192.168.1.20:8765") is None  # reached by address from the network
    assert guard.host_problem("localhost:8765") is None
    assert "DNS rebinding" in (guard.host_problem("rebind.example:8765") or "")
    assert guard.host_problem("192.168.1.20:80") is not None


def fake_run(runs: Path, run_id: str, description: str) -> Path:
    folder = runs / run_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": {"stages": ["naive"], "profile": "quick",
                                                               "steps": 5, "seed": 1}, "started": 1.0}))
    stage = {"name": "naive", "title": "<b>bold</b> title", "start_loss_batch": 27.0, "baseline": 3.2958,
             "verdict": "too-high", "saturation_init": 0.5, "saturation_end": 0.4, "train_loss": 2.5,
             "val_loss": 2.6}
    (folder / "summary.json").write_text(json.dumps({
        "dataset": {"description": description, "words": 3, "vocab_size": 27, "baseline": 3.2958,
                    "lesson_data": False}, "stages": [stage]}))
    (folder / "report.html").write_text("<!doctype html><p>the report</p>")
    return folder


def test_everything_shown_is_escaped(client, folders):
    fake_run(folders["runs"], "run-1", '<script>alert("words")</script>')
    for page in ("/lab", "/lab/runs", "/lab/runs/run-1"):
        html = client.get(page).text
        assert "&lt;script&gt;alert(&#34;words&#34;)&lt;/script&gt;" in html
        assert "<script>alert" not in html and "<b>bold</b>" not in html
    missing = client.get("/lab/runs/<img src=x onerror=alert(1)>")
    assert missing.status_code == 404 and "<img src=x" not in missing.text


# Encoded, so that the client sends the dots and slashes as they are instead of resolving them itself.
@pytest.mark.parametrize("run_id", ["%2E%2E", "...", ".hidden", "run-1%2F%2E%2E", "..%2F..%2Fetc", "outside",
                                    "not-a-run", "%2Fetc%2Fpasswd", "run-1%00"])
def test_run_ids_cannot_reach_outside_the_runs_folder(client, folders, run_id):
    fake_run(folders["runs"], "run-1", "words")
    secret = folders["runs"].parent / "secret"
    fake_run(secret.parent, "secret", "the secret run")  # a run, but beside the runs folder
    (folders["runs"] / "outside").symlink_to(secret, target_is_directory=True)
    (folders["runs"] / "not-a-run").mkdir()
    assert client.get("/api/runs/run-1").status_code == 200  # the real one is readable
    for path in (f"/api/runs/{run_id}", f"/lab/runs/{run_id}/report.html", f"/lab/runs/{run_id}"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert "the secret run" not in r.text and "the report" not in r.text
    assert [r["id"] for r in client.get("/api/runs").json()] == ["run-1"]
    for name in ("..", "../secret", "/etc", "run-1/..", "outside"):
        with pytest.raises(runs.UnknownRun):
            runs.run_folder(folders["runs"], name)


def wait_for(client, states, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get("/api/lab/job").json()
        if job["state"] in states:
            return job
        time.sleep(0.2)
    raise AssertionError(f"the lab run never reached {states}: {job}")


def test_a_lab_run_can_be_cancelled_and_keeps_its_checkpoint(client, folders):
    assert client.post("/api/lab/job/cancel").status_code == 409  # nothing to cancel
    started = client.post("/api/lab/job", json={"stages": ["naive"], "steps": 200_000})
    assert started.status_code == 202 and started.json()["state"] == "running"
    run_id = started.json()["run_id"]
    second = client.post("/api/lab/job", json={"stages": ["naive"], "steps": 5})
    assert second.status_code == 409 and "still in progress" in second.json()["detail"]  # one at a time
    deadline = time.monotonic() + 60
    while client.get("/api/lab/job").json()["stages"][0]["steps"] is None:  # until training has started
        assert time.monotonic() < deadline
        time.sleep(0.2)
    cancelled = client.post("/api/lab/job/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] in ("cancelling", "cancelled")
    job = wait_for(client, {"cancelled", "failed", "finished"}, timeout=40)
    assert job["state"] == "cancelled"
    listed = client.get("/api/runs").json()
    assert listed[0]["id"] == run_id and not listed[0]["finished"]
    assert (folders["runs"] / run_id / "naive" / "checkpoint.pt").is_file()  # `nnvitals lab --resume` continues
    assert "nnvitals lab --resume" in client.get("/lab").text


def test_a_run_that_cannot_start_says_why(tmp_path):
    app = create_app(tmp_path / "runs", tmp_path / "db.sqlite3", port=PORT, lab_data=tmp_path / "no-such-words.txt")
    with test_client(app) as c:
        assert c.post("/api/lab/job", json={"stages": ["naive"], "steps": 5}).status_code == 202
        job = wait_for(c, {"failed", "finished", "cancelled"})
    assert job["state"] == "failed"
    assert job["message"].startswith("error:") and "no-such-words.txt" in job["message"]


def test_the_api_is_documented(client):
    schema = client.get("/openapi.json").json()
    assert {"/api/numbers/baseline", "/api/numbers/verdict", "/api/numbers/tanh", "/api/exercise/check",
            "/api/exercise/drill", "/api/review", "/api/review/grade", "/api/runs", "/api/runs/{run_id}",
            "/api/lab/job", "/api/lab/job/cancel"} <= set(schema["paths"])
    grade = schema["paths"]["/api/review/grade"]["post"]
    assert "422" in grade["responses"] and grade["summary"]
    assert client.get("/docs").status_code == 404  # FastAPI's interactive docs would load a CDN's scripts


def test_pages_come_with_their_assets_and_nothing_from_elsewhere(client):
    for page in ("/", "/exercise", "/flashcards", "/flashcards/print", "/review", "/lab"):
        r = client.get(page)
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text
        assert "default-src 'self'" in r.headers["content-security-policy"]
    lesson = client.get("/").text
    assert all(q.prompt.replace("'", "&#39;") in lesson for q in packaged().questions)
    assert client.get("/static/style.css").status_code == 200

"""The lesson page's JSON API and pages through FastAPI's test client: the same numbers as the library,
bad input named, foreign requests refused, nothing outside the runs folder readable."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

from nnvitals import numbers
from nnvitals.study import exercise, store
from nnvitals.study.material import packaged
from nnvitals.web import create_app, runs
from nnvitals.web.guard import Guard

from .conftest import BASE, PORT, alive, fake_lab, fake_run, test_client


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
    ("POST", "/api/review/grade", {"card_id": "card-baseline", "rating": True}, "rating"),
    ("POST", "/api/review/grade", {"card_id": "card-baseline", "rating": "3"}, "rating"),
    ("POST", "/api/lab/job", {"steps": True}, "steps"),
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


def test_a_body_that_is_not_json_is_named_as_the_body(client):
    r = client.post("/api/review/grade", content=b"{rating: 3", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["message"].startswith("body: not valid JSON (")
    assert client.get("/api/review").json()["reviews"] == 0


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


def test_files_linked_from_inside_a_run_folder_are_not_served(client, folders):
    secret = fake_run(folders["runs"].parent, "secret", "the secret run", report="<p>the secret report</p>")
    linked = folders["runs"] / "linked"
    linked.mkdir(parents=True)
    (linked / "config.json").write_text(json.dumps({"config": {"stages": ["naive"]}, "started": 2.0}))
    (linked / "summary.json").symlink_to(secret / "summary.json")
    (linked / "report.html").symlink_to(secret / "report.html")
    borrowed = folders["runs"] / "borrowed"  # a folder whose very config is elsewhere is no run at all
    borrowed.mkdir()
    (borrowed / "config.json").symlink_to(secret / "config.json")
    (borrowed / "report.html").symlink_to(secret / "report.html")
    for path in ("/lab/runs/linked/report.html", "/api/runs/linked", "/lab/runs/borrowed/report.html",
                 "/api/runs/borrowed"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert "secret" not in r.text
    assert "secret" not in client.get("/lab/runs/linked").text
    assert [(r["id"], r["finished"]) for r in client.get("/api/runs").json()] == [("linked", False)]
    if Path("/etc/hostname").is_file():
        (linked / "report.html").unlink()
        (linked / "report.html").symlink_to("/etc/hostname")
        assert client.get("/lab/runs/linked/report.html").status_code == 404


def test_a_malformed_run_is_listed_as_unreadable_and_the_others_still_show(client, folders):
    fake_run(folders["runs"], "good", "the good words")
    bad_config = folders["runs"] / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text(json.dumps({"config": "x", "started": "yesterday"}))
    for run_id, dataset in (("no-dataset", None), ("null-words", {"description": "d", "words": None})):
        folder = fake_run(folders["runs"], run_id)
        done = json.loads((folder / "summary.json").read_text())
        if dataset is None:
            del done["dataset"]
        else:
            done["dataset"] = dataset
        done["stages"][0]["val_loss"] = "low"
        (folder / "summary.json").write_text(json.dumps(done))
    odd = fake_run(folders["runs"], "odd-times")
    (odd / "config.json").write_text(json.dumps({"config": {"stages": "naive", "steps": -3}, "started": "yesterday"}))

    for page in ("/lab", "/lab/runs", "/lab/runs/no-dataset", "/lab/runs/bad-config", "/lab/runs/null-words"):
        assert client.get(page).status_code == 200, page
    listed = {r["id"]: r for r in client.get("/api/runs").json()}
    assert set(listed) == {"good", "bad-config", "no-dataset", "null-words", "odd-times"}
    assert listed["good"]["finished"] and listed["good"]["problem"] is None
    assert listed["bad-config"]["problem"] == "config.json is not a lab run's configuration"
    assert listed["no-dataset"]["problem"] == "summary.json is not a lab run's summary"
    assert listed["null-words"]["finished"] and listed["null-words"]["dataset"]["words"] is None
    assert listed["null-words"]["results"][0]["val_loss"] is None
    assert listed["odd-times"]["started"] is None and listed["odd-times"]["steps"] is None
    html = client.get("/lab").text
    assert "the good words" in html and "Unreadable: summary.json is not a lab run&#39;s summary" in html


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


def wait_until(condition, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def pids_of(folder: Path) -> list[int]:
    wait_until(lambda: (folder / "pids").is_file())
    return [int(p) for p in (folder / "pids").read_text().split()]


def test_a_bare_start_runs_every_stage_and_the_list_says_which_run_is_going(tmp_path):
    app = create_app(tmp_path / "runs", tmp_path / "db.sqlite3", port=PORT, lab_command=fake_lab(tmp_path))
    with test_client(app) as c:
        started = c.post("/api/lab/job")  # no body: every field has its default
        assert started.status_code == 202, started.text
        job = started.json()
        assert [s["name"] for s in job["stages"]] == list(runs.stage_names())
        folder = tmp_path / "runs" / job["run_id"]
        pids_of(folder)
        page = c.get("/lab").text
        assert "Running now" in page and f"--resume {folder.resolve()}" not in page
        assert [r["running"] for r in c.get("/api/runs").json()] == [True]
        (tmp_path / "runs" / "go").touch()
        assert wait_for(c, {"finished", "failed", "cancelled"}, timeout=15)["state"] == "finished"
        assert "Running now" not in c.get("/lab").text


def test_a_run_that_ignores_cancel_is_killed_with_its_workers(tmp_path):
    runner = runs.LabRunner(tmp_path / "runs", command=fake_lab(tmp_path, ignore_sigint=True, worker=True),
                            grace_s=0.5)
    job = runner.start(["naive"], 5)
    pids = pids_of(tmp_path / "runs" / job["run_id"])
    assert runner.cancel()["state"] == "cancelling"
    wait_until(lambda: runner.status()["state"] != "cancelling")
    status = runner.status()
    assert status["state"] == "cancelled" and "killed" in status["message"]
    wait_until(lambda: not any(alive(pid) for pid in pids))  # the worker too
    runner.start(["naive"], 5)  # free for the next run
    runner.shutdown()


def test_stopping_the_server_stops_the_run_and_its_workers(tmp_path):
    runner = runs.LabRunner(tmp_path / "runs", command=fake_lab(tmp_path, ignore_sigint=True, worker=True),
                            grace_s=0.3)
    job = runner.start(["naive"], 5)
    pids = pids_of(tmp_path / "runs" / job["run_id"])
    started = time.monotonic()
    runner.shutdown()
    assert time.monotonic() - started < 10
    wait_until(lambda: not any(alive(pid) for pid in pids))
    assert runner.status()["state"] == "cancelled"


def test_a_run_that_finishes_after_a_late_cancel_is_finished(tmp_path):
    runner = runs.LabRunner(tmp_path / "runs", command=fake_lab(tmp_path, ignore_sigint=True), grace_s=30)
    job = runner.start(["naive"], 5)
    pids_of(tmp_path / "runs" / job["run_id"])
    assert runner.cancel()["state"] == "cancelling"
    (tmp_path / "runs" / "go").touch()  # it saves its summary and exits 0 before it sees the Ctrl-C
    wait_until(lambda: runner.status()["state"] != "cancelling")
    assert runner.status()["state"] == "finished" and runner.status()["fraction"] == 1.0


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
    def returns(operation, code):
        return operation["responses"][code]["content"]["application/json"]["schema"].get("$ref", "").split("/")[-1]

    grade = schema["paths"]["/api/review/grade"]["post"]
    assert returns(grade, "200") == "Graded" and "422" in grade["responses"]
    assert grade["requestBody"]["required"] is True
    start = schema["paths"]["/api/lab/job"]["post"]
    assert returns(start, "202") == "JobStatus" and "409" in start["responses"]
    assert not start["requestBody"].get("required", False)  # a bare POST starts the default run
    job = schema["components"]["schemas"]["JobStatus"]["properties"]
    assert set(job["state"]["enum"]) == {"idle", "running", "cancelling", "cancelled", "finished", "failed"}
    assert returns(schema["paths"]["/api/numbers/baseline"]["get"], "200") == "Baseline"
    assert client.get("/docs").status_code == 404  # FastAPI's interactive docs would load a CDN's scripts


def test_a_report_is_shown_sandboxed(client, folders):
    fake_run(folders["runs"], "run-1")
    policy = client.get("/lab/runs/run-1/report.html").headers["content-security-policy"]
    assert "sandbox" in policy.split("; ") and "form-action 'none'" in policy
    assert re.search(r'<iframe class="report"[^>]* sandbox>', client.get("/lab/runs/run-1").text)


def test_pages_come_with_their_assets_and_nothing_from_elsewhere(client):
    for page in ("/", "/exercise", "/flashcards", "/flashcards/print", "/review", "/lab"):
        r = client.get(page)
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text
        assert "default-src 'self'" in r.headers["content-security-policy"]
    lesson = client.get("/").text
    assert all(q.prompt.replace("'", "&#39;") in lesson for q in packaged().questions)
    assert client.get("/static/style.css").status_code == 200

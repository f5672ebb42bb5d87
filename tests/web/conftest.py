"""The lesson page under test: an app per test for the API, a real server and Chromium for the browser tests."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import string
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nnvitals.web import create_app

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "images" / "web"
PORT = 8765  # the port the API tests' app believes it serves (no socket is opened for them)
BASE = f"http://127.0.0.1:{PORT}"


def tiny_words(path: Path, count: int = 200, seed: int = 0) -> Path:
    """A small made-up word list using all 26 letters, so the vocabulary has the lesson's 27 symbols."""
    rng = random.Random(seed)
    words = list(string.ascii_lowercase)
    while len(words) < count:
        words.append("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8))))
    path.write_text("\n".join(words) + "\n")
    return path


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    return {"runs": tmp_path / "runs", "db": tmp_path / "study.sqlite3", "words": tiny_words(tmp_path / "words.txt")}


def test_client(app: Any, base: str = BASE) -> Any:
    """FastAPI's TestClient, as the browser at `base` would reach the app."""
    with warnings.catch_warnings():
        # This starlette release would rather drive the app with httpx2; httpx is what it runs on here.
        warnings.filterwarnings("ignore", message=".*httpx2")
        from fastapi.testclient import TestClient
    return TestClient(app, base_url=base)


test_client.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture
def client(folders: dict[str, Path]) -> Iterator[Any]:
    app = create_app(folders["runs"], folders["db"], port=PORT, lab_data=folders["words"])
    with test_client(app) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    runs: Path
    db: Path


@contextmanager
def serving(root: Path, **options: Any) -> Iterator[LiveServer]:
    """uvicorn serving the page (runs and database in `root`) on a free loopback port, in a thread."""
    import uvicorn

    port = free_port()
    app = create_app(root / "runs", root / "study.sqlite3", port=port, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    yield LiveServer(f"http://127.0.0.1:{port}", root / "runs", root / "study.sqlite3")
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The page with the real lab behind it."""
    root = tmp_path_factory.mktemp("serve")
    with serving(root, lab_data=tiny_words(root / "words.txt")) as server:
        yield server


def fake_run(runs: Path, run_id: str, description: str = "words", report: str = "<!doctype html><p>the report</p>"
             ) -> Path:
    """A finished lab run as `nnvitals lab` leaves it, without running it."""
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
    (folder / "report.html").write_text(report)
    return folder


FAKE_LAB = """
import json, os, signal, subprocess, sys, time
from pathlib import Path

args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
stages = args[args.index("--stages") + 1].split(",") if "--stages" in args else ["naive"]
if {ignore_sigint}:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
out.mkdir(parents=True)
(out / "config.json").write_text(json.dumps({{"config": {{"stages": stages, "profile": "quick", "steps": 5}},
                                              "started": time.time()}}))
pids = [os.getpid()]
if {worker}:  # a worker process that ignores Ctrl-C as well, as a stuck one would
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"
    pids.append(subprocess.Popen([sys.executable, "-c", code]).pid)
(out / "pids").write_text(" ".join(map(str, pids)))
with open(out / "events.jsonl", "a") as events:
    events.write(json.dumps({{"event": "start", "stage": stages[0], "step": 0, "steps": 5}}) + "\\n")
while not (out.parent / "go").exists():  # the test says when it finishes
    time.sleep(0.02)
(out / "summary.json").write_text(json.dumps({{
    "dataset": {{"description": "fake words", "words": 3, "vocab_size": 27, "baseline": 3.2958,
                 "lesson_data": False}}, "stages": []}}))
(out / "report.html").write_text("<p>the report</p>")
"""


def fake_lab(folder: Path, *, ignore_sigint: bool = False, worker: bool = False) -> list[str]:
    """A command standing in for `nnvitals lab`: it starts a run at once and finishes it when a file named
    `go` appears in the runs folder; it can ignore Ctrl-C, and leave a worker process behind that does too."""
    script = folder / "fake_lab.py"
    script.write_text(FAKE_LAB.format(ignore_sigint=ignore_sigint, worker=worker))
    return [sys.executable, str(script)]


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie waiting to be reaped does not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X")


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright. Missing: skipped, except under CI=true where it fails."""
    in_ci = os.environ.get("CI", "").lower() == "true"

    def unavailable(why: str):
        if in_ci:
            pytest.fail(f"CI=true and the browser tests cannot run: {why}", pytrace=False)
        pytest.skip(why)

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[test]')")
    if shutil.which(CHROMIUM) is None:
        unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        except Exception as e:  # the launcher's own error says what is missing
            unavailable(f"Chromium at {CHROMIUM} does not start: {e}")
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    yield pg
    context.close()


@pytest.fixture
def screenshot(tmp_path):
    """screenshot(page, name): a picture of the page, into docs/images/web/ for the README when
    NNVITALS_SCREENSHOTS=1 (`NNVITALS_SCREENSHOTS=1 make test` refreshes them), else into a temporary folder."""
    folder = SCREENSHOTS if os.environ.get("NNVITALS_SCREENSHOTS") == "1" else tmp_path

    def take(pg, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        pg.screenshot(path=str(path), full_page=False)
        assert path.read_bytes().startswith(b"\x89PNG")

    return take

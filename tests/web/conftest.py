"""The lesson page under test: an app per test for the API, a real server and Chromium for the browser tests."""

from __future__ import annotations

import os
import random
import shutil
import socket
import string
import threading
import time
import warnings
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """uvicorn serving the page on a free loopback port, in a thread of the test process."""
    import uvicorn

    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    app = create_app(root / "runs", root / "study.sqlite3", port=port, lab_data=tiny_words(root / "words.txt"))
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

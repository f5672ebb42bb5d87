"""Helpers for the study tests: a throw-away review database and a real terminal to drive."""

import io
import os
import sys
from pathlib import Path

import pexpect
import pytest


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A database path that does not exist yet; the CLI finds it through $NNVITALS_DB."""
    path = tmp_path / "data" / "study.sqlite3"
    monkeypatch.setenv("NNVITALS_DB", str(path))
    return path


@pytest.fixture
def piped(monkeypatch: pytest.MonkeyPatch):
    """Feed `text` to the command's stdin as a pipe would (not a terminal)."""

    def feed(text: str) -> None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))

    return feed


@pytest.fixture
def terminal(db: Path):
    """Start `nnvitals study ARGS...` in a pseudo-terminal, as a learner would."""
    children: list[pexpect.spawn] = []

    def spawn(*args: str) -> pexpect.spawn:
        # a plain terminal, wide enough that no expected phrase is wrapped
        env = {**os.environ, "NNVITALS_DB": str(db), "TERM": "dumb", "COLUMNS": "300", "LINES": "60"}
        child = pexpect.spawn(sys.executable, ["-m", "nnvitals.cli", "study", *args], env=env,
                              encoding="utf-8", timeout=30, dimensions=(60, 300))
        child.delaybeforesend = None  # type as fast as a script can: keys typed early must not be lost
        children.append(child)
        return child

    yield spawn
    for child in children:
        if child.isalive():
            child.close(force=True)

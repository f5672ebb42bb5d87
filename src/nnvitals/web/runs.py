"""The lab as the page sees it: the runs in the runs folder, and one lab run at a time in the background.

The run itself is `nnvitals lab` in a child process (its own interpreter, so training never competes with
the server for the GIL, and a cancel is the same Ctrl-C the terminal gives). The child appends its events
to `<run>/events.jsonl` (`--events`), which is all the progress bars read. Nothing here imports torch;
the stage names are read from the lab's models module when first needed.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# The lab's file names (nnvitals.lab.experiment and .report, which import torch).
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
EVENTS_FILE = "events.jsonl"

# A run id is one folder name inside the runs folder: no separators, no leading dot, no "..".
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_STEPS = 200_000  # the full profile's steps per stage
CANCEL_GRACE_S = 20.0  # after Ctrl-C the lab finishes its step and saves a checkpoint; then it is killed


@functools.cache
def stage_names() -> tuple[str, ...]:
    """The lab's stages in the lesson's order (imports torch once)."""
    from nnvitals.lab import models

    return tuple(models.STAGE_NAMES)


class UnknownRun(LookupError):
    """No lab run by that id in the runs folder (or an id that could point outside it)."""


class Busy(RuntimeError):
    """A lab run is already in progress."""


def run_folder(runs_dir: Path, run_id: str) -> Path:
    """The folder of run `run_id`, only if it is a lab run directly inside `runs_dir` (symlinks resolved)."""
    if not _RUN_ID.match(run_id) or ".." in run_id:
        raise UnknownRun(run_id)
    base = runs_dir.resolve()
    folder = (base / run_id).resolve()
    if folder.parent != base or not (folder / CONFIG_FILE).is_file():
        raise UnknownRun(run_id)
    return folder


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def summary(runs_dir: Path, run_id: str) -> dict[str, Any] | None:
    """The run's summary.json (see nnvitals.lab.report), None while it has none."""
    data = _read_json(run_folder(runs_dir, run_id) / SUMMARY_FILE)
    return data if isinstance(data, dict) else None


def report_path(runs_dir: Path, run_id: str) -> Path:
    path = run_folder(runs_dir, run_id) / REPORT_FILE
    if not path.is_file():
        raise UnknownRun(run_id)
    return path


def describe(runs_dir: Path, run_id: str) -> dict[str, Any]:
    """One run for the list: what was asked and, once finished, each stage's headline numbers."""
    folder = run_folder(runs_dir, run_id)
    config = _read_json(folder / CONFIG_FILE) or {}
    asked = config.get("config", {}) if isinstance(config, dict) else {}
    done = summary(runs_dir, run_id)
    item: dict[str, Any] = {
        "id": run_id,
        "finished": done is not None,
        "started": config.get("started") if isinstance(config, dict) else None,
        "stages": asked.get("stages", []),
        "profile": asked.get("profile"),
        "steps": asked.get("steps"),
        "folder": str(folder),
    }
    if done is None:
        return item
    item["dataset"] = {k: done["dataset"].get(k) for k in ("description", "words", "vocab_size", "baseline",
                                                           "lesson_data")}
    item["results"] = [
        {k: st.get(k) for k in ("name", "title", "start_loss_batch", "baseline", "verdict", "saturation_init",
                                "saturation_end", "train_loss", "val_loss", "val_loss_calibrated")}
        | {"reference": st.get("reference")}
        for st in done.get("stages", [])
    ]
    return item


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every lab run in the folder, newest first."""
    if not runs_dir.is_dir():
        return []
    found = []
    for entry in runs_dir.iterdir():
        try:
            found.append(describe(runs_dir, entry.name))
        except UnknownRun:
            continue  # not a lab run
    return sorted(found, key=lambda r: (r["started"] or 0, r["id"]), reverse=True)


# --- the background run ---------------------------------------------------------------------------


@dataclass
class _Job:
    run_id: str
    folder: Path
    stages: tuple[str, ...]
    steps: int | None
    process: subprocess.Popen[bytes]
    stderr: IO[bytes]
    started: float
    cancelled: bool = False
    ended: float | None = None
    message: str | None = None
    returncode: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


def _stage_progress(stages: Sequence[str], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = {s: {"name": s, "state": "waiting", "step": 0, "steps": None, "loss": None} for s in stages}
    for e in events:
        row = rows.get(e.get("stage", ""))
        if row is None:
            continue
        kind = e.get("event")
        if kind == "start":
            row.update(state="running", step=e["step"], steps=e["steps"])
        elif kind == "progress":
            row.update(state="running", step=e["step"], steps=e["steps"], loss=e["loss"])
        elif kind == "done":
            r = e["result"]
            row.update(state="done", step=r["steps"], steps=r["steps"], loss=r.get("val_loss"))
        elif kind == "interrupted":
            row.update(state="stopped", step=e["step"])
    return list(rows.values())


class LabRunner:
    """Starts `nnvitals lab` in the background, one run at a time, and reports how far it got."""

    def __init__(self, runs_dir: Path, data: Path | None = None, command: Sequence[str] | None = None):
        self.runs_dir = runs_dir
        self.data = data
        self.command = list(command) if command else [sys.executable, "-m", "nnvitals", "lab"]
        self._lock = threading.Lock()
        self._job: _Job | None = None

    def _new_id(self) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_id, n = f"{stamp}-lab", 2
        while (self.runs_dir / run_id).exists():
            run_id, n = f"{stamp}-lab-{n}", n + 1
        return run_id

    def start(self, stages: Sequence[str] | None, steps: int | None) -> dict[str, Any]:
        with self._lock:
            if self._job is not None and self._job.process.poll() is None:
                raise Busy(f"the lab run {self._job.run_id} is still in progress; wait for it or cancel it")
            try:
                self.runs_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OSError(f"cannot create the runs folder {self.runs_dir}: {e.strerror or e}") from None
            run_id = self._new_id()
            folder = self.runs_dir / run_id
            args = [*self.command, "--out", str(folder), "--events", str(folder / EVENTS_FILE), "--json"]
            if self.data is not None:
                args += ["--data", str(self.data)]
            if stages:
                args += ["--stages", ",".join(stages)]
            if steps is not None:
                args += ["--steps", str(steps)]
            stderr = tempfile.TemporaryFile()  # noqa: SIM115  (read and closed when the run ends)
            env = {**os.environ, "MPLBACKEND": "Agg"}
            # Its own session: a Ctrl-C meant for the server does not reach it; shutdown() stops it instead.
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                       env=env, start_new_session=True)
            self._job = _Job(run_id, folder, tuple(stages or stage_names()), steps, process, stderr, time.time())
            return self._status(self._job)

    def cancel(self) -> dict[str, Any]:
        with self._lock:
            job = self._job
            if job is None or job.process.poll() is not None:
                raise LookupError("no lab run is in progress")
            job.cancelled = True
            job.process.send_signal(signal.SIGINT)  # the lab saves a checkpoint at the next step and stops
            return self._status(job)

    def status(self) -> dict[str, Any]:
        with self._lock:
            if self._job is None:
                return {"state": "idle", "run_id": None, "stages": [], "fraction": 0.0, "message": None,
                        "seconds": 0.0, "finished": False}
            return self._status(self._job)

    def _status(self, job: _Job) -> dict[str, Any]:
        code = job.process.poll()
        if code is not None and job.ended is None:
            job.ended, job.returncode = time.time(), code
            job.stderr.seek(0)
            lines = [ln.strip() for ln in job.stderr.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            job.stderr.close()
            if code != 0 and not job.cancelled:
                errors = [ln for ln in lines if ln.startswith("error:")]
                job.message = (errors or lines or [f"the lab stopped with exit code {code}"])[-1]
        job.events = self._events(job)
        if code is None:
            state = "cancelling" if job.cancelled else "running"
        elif job.cancelled:
            state = "cancelled"
        else:
            state = "finished" if code == 0 and (job.folder / SUMMARY_FILE).is_file() else "failed"
            if state == "failed" and job.message is None:
                job.message = f"the lab ended (exit code {code}) without writing its summary"
        stages = _stage_progress(job.stages, job.events)
        parts = [1.0 if s["state"] == "done" else (s["step"] / s["steps"] if s["steps"] else 0.0) for s in stages]
        return {
            "state": state,
            "run_id": job.run_id,
            "stages": stages,
            "fraction": 1.0 if state == "finished" else (sum(parts) / len(parts) if parts else 0.0),
            "message": job.message,
            "seconds": (job.ended or time.time()) - job.started,
            "finished": state == "finished",
        }

    @staticmethod
    def _events(job: _Job) -> list[dict[str, Any]]:
        path = job.folder / EVENTS_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            return job.events
        events = []
        for line in text.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                break  # a line still being written
            if isinstance(event, dict):
                events.append(event)
        return events

    def shutdown(self) -> None:
        """Stop a run still going when the server stops: Ctrl-C, then kill after a grace period."""
        with self._lock:
            job = self._job
        if job is None or job.process.poll() is not None:
            return
        job.cancelled = True
        job.process.send_signal(signal.SIGINT)
        try:
            job.process.wait(CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait()

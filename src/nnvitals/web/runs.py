"""The lab as the page sees it: the runs in the runs folder, and one lab run at a time in the background.

The run itself is `nnvitals lab` in a child process (its own interpreter, so training never competes with
the server for the GIL, and a cancel is the same Ctrl-C the terminal gives). The child appends its events
to `<run>/events.jsonl` (`--events`), which is all the progress bars read. Nothing here imports torch;
the stage names are read from the lab's models module when first needed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
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
    if not _RUN_ID.match(run_id):
        raise UnknownRun(run_id)
    base = runs_dir.resolve()
    folder = (base / run_id).resolve()
    if folder.parent != base or _own_file(folder, CONFIG_FILE) is None:
        raise UnknownRun(run_id)
    return folder


def _own_file(folder: Path, name: str) -> Path | None:
    """`folder`/`name` when it is a file of the run itself: a link to a file elsewhere is not."""
    path = (folder / name).resolve()
    return path if path.parent == folder and path.is_file() else None


def _read_json(folder: Path, name: str) -> Any:
    path = _own_file(folder, name)
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def summary(runs_dir: Path, run_id: str) -> dict[str, Any] | None:
    """The run's summary.json (see nnvitals.lab.report), None while it has none."""
    data = _read_json(run_folder(runs_dir, run_id), SUMMARY_FILE)
    return data if isinstance(data, dict) else None


def report_path(runs_dir: Path, run_id: str) -> Path:
    path = _own_file(run_folder(runs_dir, run_id), REPORT_FILE)
    if path is None:
        raise UnknownRun(run_id)
    return path


# What the list shows is read from files anyone can edit: each value is kept only when it has the lab's type.

def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


_STAGE_NUMBERS = ("start_loss_batch", "baseline", "saturation_init", "saturation_end", "train_loss", "val_loss",
                  "val_loss_calibrated")


def _stage(st: dict[str, Any]) -> dict[str, Any]:
    reference = st.get("reference")
    return ({"name": _text(st.get("name")), "title": _text(st.get("title")), "verdict": _text(st.get("verdict"))}
            | {k: _number(st.get(k)) for k in _STAGE_NUMBERS}
            | {"reference": {k: _number(v) for k, v in reference.items() if _number(v) is not None}
               if isinstance(reference, dict) else None})


def describe(runs_dir: Path, run_id: str) -> dict[str, Any]:
    """One run for the list: what was asked and, once finished, each stage's headline numbers.

    A run whose files do not have the lab's shape is listed with `problem` saying so, and no numbers.
    """
    folder = run_folder(runs_dir, run_id)
    config = _read_json(folder, CONFIG_FILE)
    asked = config.get("config") if isinstance(config, dict) else None
    stages = asked.get("stages") if isinstance(asked, dict) else None
    item: dict[str, Any] = {
        "id": run_id,
        "finished": False,
        "problem": None,
        "started": _number(config.get("started")) if isinstance(config, dict) else None,
        "stages": [s for s in stages if isinstance(s, str)] if isinstance(stages, list) else [],
        "profile": _text(asked.get("profile")) if isinstance(asked, dict) else None,
        "steps": _count(asked.get("steps")) if isinstance(asked, dict) else None,
        "folder": str(folder),
    }
    if not isinstance(asked, dict):
        item["problem"] = f"{CONFIG_FILE} is not a lab run's configuration"
        return item
    if _own_file(folder, SUMMARY_FILE) is None:
        return item  # not finished (yet)
    done = summary(runs_dir, run_id)
    dataset = done.get("dataset") if done is not None else None
    results = done.get("stages") if done is not None else None
    if not isinstance(dataset, dict) or not isinstance(results, list) or not all(isinstance(st, dict)
                                                                                  for st in results):
        item["problem"] = f"{SUMMARY_FILE} is not a lab run's summary"
        return item
    item["finished"] = True
    item["dataset"] = {"description": _text(dataset.get("description")), "words": _count(dataset.get("words")),
                       "vocab_size": _count(dataset.get("vocab_size")), "baseline": _number(dataset.get("baseline")),
                       "lesson_data": dataset.get("lesson_data") is True}
    item["results"] = [_stage(st) for st in results]
    return item


def list_runs(runs_dir: Path, running: str | None = None) -> list[dict[str, Any]]:
    """Every lab run in the folder, newest first; `running` names the one in progress (marked so)."""
    if not runs_dir.is_dir():
        return []
    found = []
    for entry in runs_dir.iterdir():
        try:
            found.append(describe(runs_dir, entry.name) | {"running": entry.name == running})
        except UnknownRun:
            continue  # not a lab run
    return sorted(found, key=lambda r: (r["started"] or 0.0, r["id"]), reverse=True)


# --- the background run ---------------------------------------------------------------------------


@dataclass
class _Job:
    run_id: str
    folder: Path
    process: subprocess.Popen[bytes]
    stderr: IO[bytes]
    started: float
    cancelled: bool = False
    killed: bool = False
    ended: float | None = None
    message: str | None = None
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    events_read: int = 0  # bytes of events.jsonl already applied to `rows`


def _apply(rows: dict[str, dict[str, Any]], event: Any) -> None:
    """One line of events.jsonl into the stage rows (lines of another shape are passed over)."""
    if not isinstance(event, dict):
        return
    stage = event.get("stage")
    row = rows.get(stage) if isinstance(stage, str) else None
    if row is None:
        return
    kind = event.get("event")
    result = event.get("result")
    if kind == "done" and isinstance(result, dict):
        steps = _count(result.get("steps"))
        row.update(state="done", step=steps or row["step"], steps=steps, loss=_number(result.get("val_loss")))
    elif kind in ("start", "progress", "interrupted") and _count(event.get("step")) is not None:
        row["step"] = event["step"]
        if kind == "interrupted":
            row["state"] = "stopped"
        else:
            row.update(state="running", steps=_count(event.get("steps")) or row["steps"])
            if kind == "progress":
                row["loss"] = _number(event.get("loss"))


class LabRunner:
    """Starts `nnvitals lab` in the background, one run at a time, and reports how far it got."""

    def __init__(self, runs_dir: Path, data: Path | None = None, command: Sequence[str] | None = None,
                 grace_s: float = CANCEL_GRACE_S):
        self.runs_dir = runs_dir
        self.data = data
        self.command = list(command) if command else [sys.executable, "-m", "nnvitals", "lab"]
        self.grace_s = grace_s
        self._lock = threading.Lock()
        self._job: _Job | None = None

    def _new_id(self) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_id, n = f"{stamp}-lab", 2
        while (self.runs_dir / run_id).exists():
            run_id, n = f"{stamp}-lab-{n}", n + 1
        return run_id

    def running(self) -> str | None:
        """The id of the run in progress, if any."""
        with self._lock:
            job = self._job
            return job.run_id if job is not None and job.process.poll() is None else None

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
            # Its own session and process group: a Ctrl-C meant for the server does not reach it, and _stop
            # reaches its worker processes too.
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                       env=env, start_new_session=True)
            rows = {s: {"name": s, "state": "waiting", "step": 0, "steps": None, "loss": None}
                    for s in stages or stage_names()}
            self._job = _Job(run_id, folder, process, stderr, time.time(), rows=rows)
            return self._status(self._job)

    def cancel(self) -> dict[str, Any]:
        """Ctrl-C for the run in progress (it saves a checkpoint and stops); killed if still going after grace_s."""
        with self._lock:
            job = self._job
            if job is None or job.process.poll() is not None:
                raise LookupError("no lab run is in progress")
            if not job.cancelled:
                job.cancelled = True
                threading.Thread(target=self._stop, args=(job, self.grace_s), daemon=True).start()
            return self._status(job)

    def shutdown(self) -> None:
        """Stop a run still going when the server stops, as cancel does, waiting for it to end."""
        with self._lock:
            job = self._job
            if job is None or job.process.poll() is not None:
                return
            job.cancelled = True
        self._stop(job, self.grace_s)

    @staticmethod
    def _stop(job: _Job, grace: float) -> None:
        """Ctrl-C to the run's whole process group (the lab and its workers); after `grace` seconds, kill it."""
        pgid = job.process.pid  # the leader of its own session (start_new_session)
        try:
            os.killpg(pgid, signal.SIGINT)
        except ProcessLookupError:
            return
        try:
            job.process.wait(grace)
        except subprocess.TimeoutExpired:
            job.killed = True
        # The lab waits for its workers, but a stuck one would outlive it: the group goes, whatever is left of it.
        # (While any member lives the group id is not reused, so this reaches no one else.)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        job.process.wait()

    def status(self) -> dict[str, Any]:
        with self._lock:
            if self._job is None:
                return {"state": "idle", "run_id": None, "stages": [], "fraction": 0.0, "message": None,
                        "seconds": 0.0}
            return self._status(self._job)

    def _status(self, job: _Job) -> dict[str, Any]:
        code = job.process.poll()
        if code is not None and job.ended is None:
            job.ended = time.time()
            job.stderr.seek(0)
            lines = [ln.strip() for ln in job.stderr.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            job.stderr.close()
            if code != 0 and not job.cancelled:
                errors = [ln for ln in lines if ln.startswith("error:")]
                job.message = (errors or lines or [f"the lab stopped with exit code {code}"])[-1]
        self._read_events(job)
        if code is None:
            state = "cancelling" if job.cancelled else "running"
        elif code == 0 and _own_file(job.folder.resolve(), SUMMARY_FILE) is not None:
            state = "finished"  # even when a cancel came too late to stop it
        elif job.cancelled:
            state = "cancelled"
            if job.killed:
                job.message = f"it did not stop within {self.grace_s:g} s of Ctrl-C, so it was killed"
        else:
            state = "failed"
            if job.message is None:
                job.message = f"the lab ended (exit code {code}) without writing its summary"
        stages = list(job.rows.values())
        parts = [1.0 if s["state"] == "done" else (s["step"] / s["steps"] if s["steps"] else 0.0) for s in stages]
        return {
            "state": state,
            "run_id": job.run_id,
            "stages": stages,
            "fraction": 1.0 if state == "finished" else (min(1.0, sum(parts) / len(parts)) if parts else 0.0),
            "message": job.message,
            "seconds": (job.ended or time.time()) - job.started,
        }

    @staticmethod
    def _read_events(job: _Job) -> None:
        """Apply the lines appended to events.jsonl since the last look (a line still being written waits)."""
        try:
            with (job.folder / EVENTS_FILE).open("rb") as f:
                f.seek(job.events_read)
                new = f.read()
        except OSError:
            return
        complete = new[:new.rfind(b"\n") + 1]
        job.events_read += len(complete)
        for line in complete.splitlines():
            try:
                _apply(job.rows, json.loads(line))
            except ValueError:
                continue

"""The lab run: each stage from initialisation to samples, and the run as a whole, resumable.

A run lives in one folder:

    config.json            what was asked (stages, profile, steps, seed) and which data (with its sha256)
    <stage>/init.json      starting losses, verdict and the doctor's findings at initialisation
    <stage>/init/*.png     the doctor's pictures at initialisation
    <stage>/checkpoint.pt  model, optimizer, generator and step; the trained model once training is done
    <stage>/training/*.png the Monitor's pictures over the run (deep stage: update-to-data ratio)
    <stage>/end/*.png      the doctor's pictures after training
    <stage>/result.json    everything the summary holds for the stage
    summary.json, report.html, loss.png

Each file is written atomically, and a stage with a result.json is done: continuing a run redoes only
what is missing, from the last checkpoint, and gives the numbers an uninterrupted run gives.

Stages can run in parallel worker processes. Every stage trains on one thread wherever it runs, so its
numbers do not depend on how many stages ran at once.
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import pickle
import queue
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnvitals import numbers
from nnvitals.lab import diagnose, models
from nnvitals.lab.data import DataError, Split, Splits, Words, embedded_words, read_words, split, write_atomic
from nnvitals.lab.train import (
    BATCH_SIZE,
    Interrupted,
    Progress,
    Schedule,
    StopFlag,
    load_checkpoint,
    schedule_for,
    split_loss,
    stop_on_sigint,
    train,
)

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
SAMPLES = 20
SAMPLE_SEED_OFFSET = 10  # samples come from their own generator, seeded seed + 10
LOSS_CURVE_POINTS = 200  # the loss log is kept in the summary as this many window means
# Training time per step relative to the one-hidden-layer network without BatchNorm (measured).
RELATIVE_COST = {"deep": 4.5, "batchnorm": 1.8}
TRAINING_THREADS = 1  # measured faster than two for these small layers, and it makes runs reproducible

Emit = Callable[[dict[str, Any]], None]


class RunError(Exception):
    """A run folder that cannot be started or continued; the message says why."""


@dataclass(frozen=True)
class LabConfig:
    stages: tuple[str, ...]
    profile: str
    steps: int | None  # overrides the profile's number of steps
    seed: int  # the generator that draws weights and minibatches

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = list(self.stages)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabConfig:
        return cls(tuple(d["stages"]), d["profile"], d["steps"], d["seed"])


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def dataset_info(words: Words, splits: Splits) -> dict[str, Any]:
    v = splits.vocab.size
    return {
        "path": str(words.path) if words.path is not None else None,
        "source": words.source,
        "description": words.description,
        "sha256": words.sha256,
        "lesson_data": words.is_lesson_data,
        "words": len(words.words),
        "vocab_size": v,
        "baseline": numbers.baseline_loss(v),
        "split_words": {"train": splits.train.words, "val": splits.val.words, "test": splits.test.words},
        "examples": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
    }


# --- starting a run, and finding it again --------------------------------------------------------------

def start_run(out: Path, config: LabConfig, words: Words) -> None:
    """Create the run folder and record what the run is; refuses a folder that already holds a run."""
    if (out / CONFIG_FILE).exists():
        raise RunError(f"{out} already holds a lab run: continue it with --resume {out}, or give another --out")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {out}: {e.strerror or e}") from None
    data = {"source": words.source, "path": str(words.path) if words.path else None, "sha256": words.sha256,
            "words": len(words.words)}
    write_json(out / CONFIG_FILE, {"config": config.to_dict(), "data": data, "started": time.time()})


def open_run(out: Path) -> tuple[LabConfig, Words]:
    """The settings and the data of an existing run, checking that the data has not changed since."""
    path = out / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{out} holds no lab run to continue (no {CONFIG_FILE}); start one with --out {out}")
    try:
        saved = json.loads(path.read_text())
        config = LabConfig.from_dict(saved["config"])
        data = saved["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path} is damaged ({e}); start a new run") from None
    try:
        words = embedded_words() if data["source"] == "embedded" else read_words(data["path"], data["source"])
    except DataError as e:
        raise RunError(f"the run's data cannot be read any more: {e}") from None
    if words.sha256 != data["sha256"]:
        raise RunError(f"the run's data ({data['path'] or words.description}) has changed since the run "
                       "started, so its numbers would not continue; start a new run")
    return config, words


# --- one stage ---------------------------------------------------------------------------------------

def _peek_batch(g: torch.Generator, n: int) -> torch.Tensor:
    """The first minibatch's indices, drawn from a copy of the generator (training draws the same ones)."""
    twin = torch.Generator()
    twin.set_state(g.get_state())
    return torch.randint(0, n, (BATCH_SIZE,), generator=twin)


def _start_losses(model: nn.Module, data: Split, xb: torch.Tensor, yb: torch.Tensor) -> tuple[float, float]:
    """The loss before any training on the first minibatch and over the whole training split.

    Measured on a copy in training mode, the mode of the first step, so BatchNorm layers normalise with
    the statistics of what they are given and their running estimates stay untouched.
    """
    twin = copy.deepcopy(model).train()
    with torch.no_grad():
        batch = float(F.cross_entropy(twin(xb), yb))
        whole = float(F.cross_entropy(twin(data.X), data.Y))
    return batch, whole


def batch_caveats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mates: torch.Tensor, seed: int) -> dict[str, Any]:
    """BatchNorm's two caveats, with numbers, for one example (x, y: one row each).

    In training mode the example's output depends on the other examples in its batch: it is placed in
    two batches whose other 31 members are drawn from `mates` independently. In eval mode it does not,
    and the example can be evaluated on its own. Measured on a copy: the running statistics stay as
    they are.
    """
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    batch_a = torch.cat([x, mates[torch.randint(0, len(mates), (BATCH_SIZE - 1,), generator=g)]])
    batch_b = torch.cat([x, mates[torch.randint(0, len(mates), (BATCH_SIZE - 1,), generator=g)]])

    def outputs(training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        twin.train(training)
        with torch.no_grad():
            return twin(batch_a)[0], twin(batch_b)[0]

    def loss(logits: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[None], y))

    train_a, train_b = outputs(True)
    eval_a, eval_b = outputs(False)
    twin.eval()
    with torch.no_grad():
        alone = twin(x)[0]
    return {
        "example": "the first validation example, in two batches of 32 whose other members are drawn at random",
        "train_mode": {"loss_in_batch_a": loss(train_a), "loss_in_batch_b": loss(train_b),
                       "max_logit_change": float((train_a - train_b).abs().max())},
        "eval_mode": {"loss_in_batch_a": loss(eval_a), "loss_in_batch_b": loss(eval_b),
                      "max_logit_change": float((eval_a - eval_b).abs().max())},
        "alone_eval": {"loss_alone": loss(alone), "loss_in_batch": loss(eval_a),
                       "max_logit_difference": float((alone - eval_a).abs().max())},
    }


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _loss_curve(losses: torch.Tensor) -> dict[str, Any]:
    every = max(1, math.ceil(len(losses) / LOSS_CURVE_POINTS))
    usable = len(losses) // every * every
    means = losses[:usable].reshape(-1, every).mean(1).tolist() if usable else []
    return {"every": every, "mean_loss": means}


def _relative(paths: list[str], out: Path) -> list[str]:
    return [os.path.relpath(p, out) for p in paths]


def run_stage(name: str, splits: Splits, config: LabConfig, out: Path, emit: Emit, stop: StopFlag) -> dict[str, Any]:
    """Initialise, diagnose, train, evaluate and sample one stage; returns its result (also saved)."""
    folder = out / name
    result_file = folder / "result.json"
    if result_file.exists():
        result: dict[str, Any] = json.loads(result_file.read_text())
        emit({"event": "done", "stage": name, "result": result, "earlier": True})
        return result
    with _threads(TRAINING_THREADS):
        return _run_stage(name, splits, config, out, folder, emit, stop)


def _run_stage(name: str, splits: Splits, config: LabConfig, out: Path, folder: Path, emit: Emit,
               stop: StopFlag) -> dict[str, Any]:
    st = models.stage(name)
    vocab = splits.vocab.size
    baseline = numbers.baseline_loss(vocab)
    schedule = schedule_for(name, config.profile, config.steps)
    data = splits.train
    g = torch.Generator().manual_seed(config.seed)
    model = models.build(name, vocab, g)
    first = _peek_batch(g, len(data))
    xb, yb = data.X[first], data.Y[first]

    init_file = folder / "init.json"
    if init_file.exists():
        init = json.loads(init_file.read_text())
    else:
        batch_loss, train_loss = _start_losses(model, data, xb, yb)
        verdict = numbers.judge_start_loss(batch_loss, vocab)
        doctor = diagnose.examine(model, xb, yb, folder / "init", lr=schedule.lr_at(0), at_init=True)
        doctor["plots"] = _relative(doctor["plots"], out)
        init = {"start_loss_batch": batch_loss, "start_loss_train": train_loss, "baseline": baseline,
                "verdict": verdict.status, "verdict_message": verdict.message, "verdict_fix": verdict.fix,
                "parameters": models.count_parameters(model), "doctor": doctor}
        write_json(init_file, init)

    checkpoint = folder / "checkpoint.pt"
    progress = _resume(checkpoint, model, schedule, folder) if checkpoint.exists() else Progress.fresh(g)
    emit({"event": "start", "stage": name, "title": st.title, "steps": schedule.steps, "step": progress.step,
          "init": init})

    def on_progress(step: int, loss: float) -> None:
        emit({"event": "progress", "stage": name, "step": step, "steps": schedule.steps, "loss": loss})

    training = None
    if name == "deep":
        try:
            watch = diagnose.Watch(model, progress.monitor)
        except (ValueError, KeyError, TypeError) as e:
            raise _cannot_continue(checkpoint, folder, e) from None
        with watch:
            progress = train(model, data, g, schedule, progress, checkpoint=checkpoint, stop=stop,
                             on_progress=on_progress, monitor=watch)
        training = watch.conclude(folder / "training")
        training["plots"] = _relative(training["plots"], out)
    else:
        progress = train(model, data, g, schedule, progress, checkpoint=checkpoint, stop=stop,
                         on_progress=on_progress)

    end = diagnose.examine(model, xb, yb, folder / "end", lr=schedule.lr_at(schedule.steps - 1), at_init=False)
    end["plots"] = _relative(end["plots"], out)

    model.eval()
    result: dict[str, Any] = {
        "name": name,
        "title": st.title,
        "parameters": init["parameters"],
        "start_loss_batch": init["start_loss_batch"],
        "start_loss_train": init["start_loss_train"],
        "baseline": baseline,
        "verdict": init["verdict"],
        "verdict_message": init["verdict_message"],
        "findings": init["doctor"]["codes"],
        "findings_end": end["codes"],
        "saturation_init": init["doctor"]["saturation"],
        "saturation_end": end["saturation"],
        "train_loss": split_loss(model, data.X, data.Y),
        "val_loss": split_loss(model, splits.val.X, splits.val.Y),
        "test_loss": split_loss(model, splits.test.X, splits.test.Y),
        "last_batch_loss": _finite(float(progress.losses[-1])) if len(progress.losses) else None,
        "seconds": progress.seconds,
        "steps": schedule.steps,
        "steps_per_second": schedule.steps / progress.seconds if progress.seconds > 0 else None,
        "schedule": schedule.to_dict(),
        "loss_curve": _loss_curve(progress.losses),
        "diagnosis": {"init": init["doctor"], "end": end, "training": training},
    }
    if training is not None:
        result["findings_training"] = training["codes"]
    if st.batchnorm:
        calibrated = copy.deepcopy(model)
        models.calibrate(calibrated, data.X)
        result["train_loss_calibrated"] = split_loss(calibrated, data.X, data.Y)
        result["val_loss_calibrated"] = split_loss(calibrated, splits.val.X, splits.val.Y)
        result["test_loss_calibrated"] = split_loss(calibrated, splits.test.X, splits.test.Y)
        result["caveats"] = batch_caveats(model, splits.val.X[:1], splits.val.Y[:1], data.X, config.seed)
    sampler = torch.Generator().manual_seed(config.seed + SAMPLE_SEED_OFFSET)
    result["samples"] = [splits.vocab.decode(w) for w in models.sample(model, vocab, sampler, SAMPLES)]
    write_json(folder / "result.json", result)
    emit({"event": "done", "stage": name, "result": result, "earlier": False})
    return result


def _resume(checkpoint: Path, model: nn.Module, schedule: Schedule, folder: Path) -> Progress:
    try:
        return load_checkpoint(checkpoint, model, schedule)
    except (ValueError, KeyError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise _cannot_continue(checkpoint, folder, e) from None


def _cannot_continue(checkpoint: Path, folder: Path, e: Exception) -> RunError:
    reason = (str(e).strip().splitlines() or [""])[0]
    return RunError(f"{checkpoint} cannot be continued ({type(e).__name__}: {reason}); delete {folder} to redo "
                    "that stage from the start")


# --- the whole run -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What a run produced: its summary (None when it was interrupted) and where it lives."""

    out: Path
    summary: dict[str, Any] | None
    interrupted: bool


def default_jobs(stages: int) -> int:
    """One worker per CPU this process may use, at most one per stage."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(stages, cpus))


def run(out: Path, config: LabConfig, words: Words, emit: Emit, jobs: int | None = None,
        stop: StopFlag | None = None) -> Outcome:
    """Run (or continue) every stage of the run in `out`, then write summary.json and report.html.

    Ctrl-C (or `stop`) stops each running stage at the next step boundary after a checkpoint;
    the outcome then says `interrupted` and `run` again on the same folder continues.
    """
    from nnvitals.lab import report

    splits = split(words.words)
    info = dataset_info(words, splits)
    emit({"event": "dataset", "dataset": info, "config": config.to_dict()})
    pending = [s for s in config.stages if not (out / s / "result.json").exists()]
    jobs = default_jobs(len(pending)) if jobs is None else max(1, jobs)
    stop = stop or StopFlag()
    results: dict[str, dict[str, Any]] = {}
    if jobs == 1 or len(pending) <= 1:
        with stop_on_sigint(stop):
            try:
                for name in config.stages:
                    if stop.requested:
                        break
                    results[name] = run_stage(name, splits, config, out, emit, stop)
            except Interrupted as e:
                emit({"event": "interrupted", "stage": name, "step": e.step})
    else:
        for name in config.stages:
            if name not in pending:
                results[name] = run_stage(name, splits, config, out, emit, stop)
        results.update(_run_parallel(pending, words, config, out, emit, stop, jobs))
    if any(s not in results for s in config.stages):
        return Outcome(out, None, True)
    summary = report.summary(info, config, [results[s] for s in config.stages], out)
    report.write(out, summary)
    return Outcome(out, summary, False)


def _run_parallel(pending: list[str], words: Words, config: LabConfig, out: Path, emit: Emit, stop: StopFlag,
                  jobs: int) -> dict[str, dict[str, Any]]:
    """Run stages in `jobs` worker processes, longest first; relays their events to `emit`."""
    ctx = multiprocessing.get_context("spawn")
    tasks = ctx.Queue()
    events = ctx.Queue()
    halt = ctx.Event()
    for name in sorted(pending, key=lambda s: -RELATIVE_COST.get(s, 1)):  # longest first: fewer idle workers
        tasks.put(name)
    for _ in range(jobs):
        tasks.put(None)
    args = (tasks, events, halt, words.words, config.to_dict(), str(out))
    # Workers start with Ctrl-C ignored (inherited), then install their own handler; see _worker.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        workers = [ctx.Process(target=_worker, args=args, daemon=True) for _ in range(jobs)]
        for w in workers:
            w.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    results: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    refusals: list[str] = []
    running = len(workers)
    forwarded = False
    with stop_on_sigint(stop):
        while running:
            if stop.requested and not forwarded:
                halt.set()
                for w in workers:
                    if w.pid is not None and w.is_alive():
                        os.kill(w.pid, signal.SIGINT)
                forwarded = True
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                if not any(w.is_alive() for w in workers):
                    failures.append("a worker process ended without reporting (killed?)")
                    break
                continue
            kind = event["event"]
            if kind == "exit":
                running -= 1
                continue
            if kind == "error":
                failures.append(f"stage {event['stage']} failed in a worker process:\n{event['message']}")
                stop.set()
                continue
            if kind == "refused":
                refusals.append(event["message"])
                stop.set()
                continue
            if kind == "done":
                results[event["stage"]] = event["result"]
            emit(event)
    for w in workers:
        w.join(timeout=30)
    if failures:
        raise RuntimeError("\n".join(failures))
    if refusals:
        raise RunError(refusals[0])
    return results


def _worker(tasks: Any, events: Any, halt: Any, words: tuple[str, ...], config: dict[str, Any], out: str) -> None:
    """A worker process: takes stage names until told to stop, reporting every event to the parent."""
    stop = StopFlag()
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    if halt.is_set():
        stop.set()
    torch.set_num_threads(TRAINING_THREADS)
    splits = split(words)
    cfg = LabConfig.from_dict(config)
    try:
        while not stop.requested and not halt.is_set():
            name = tasks.get()
            if name is None:
                break
            try:
                run_stage(name, splits, cfg, Path(out), events.put, stop)
            except Interrupted as e:
                events.put({"event": "interrupted", "stage": name, "step": e.step})
                break
            except RunError as e:
                events.put({"event": "refused", "stage": name, "message": str(e)})
                break
            except Exception:
                events.put({"event": "error", "stage": name, "message": traceback.format_exc()})
                break
    finally:
        events.put({"event": "exit"})

"""`nnvitals lab` and `nnvitals data`: the makemore part 3 experiment in the terminal."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from nnvitals.lab import data as lab_data
from nnvitals.lab import experiment, models, reference
from nnvitals.lab.train import PROFILES, schedule_for

SEVERITY_COLOUR = {"error": "red", "warning": "yellow", "info": "cyan"}
VERDICT_COLOUR = {"healthy": "green", "too-high": "red", "too-low": "yellow"}
TABLE_WIDTH = 110  # the final table with the notebook's columns


def _bad(message: str) -> Exception:
    # Imported here: nnvitals.cli imports this module while it is being set up.
    from nnvitals.cli import BadInput

    return BadInput(message)


def _stages(text: str | None) -> tuple[str, ...]:
    if text is None:
        return models.STAGE_NAMES
    asked = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in asked if s not in models.STAGE_NAMES]
    if unknown or not asked:
        what = f"unknown stage {unknown[0]!r}" if unknown else "no stage given"
        raise _bad(f"{what}: --stages takes a comma-separated list of {', '.join(models.STAGE_NAMES)}")
    return tuple(s for s in models.STAGE_NAMES if s in asked)


class _Speed(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} steps/s" if task.speed else "", style="progress.data.speed")


class _Presenter:
    """Shows the run's events as they come: one block per stage, a progress bar per stage."""

    def __init__(self, console: Console, quiet: bool):
        self.console = console
        self.quiet = quiet
        self.progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), _Speed(), TimeRemainingColumn(),
                                 console=console, disable=quiet)
        self.tasks: dict[str, Any] = {}
        self.vocab = 0

    def print(self, *args: Any) -> None:
        if not self.quiet:
            self.progress.console.print(*args)

    def __call__(self, event: dict[str, Any]) -> None:
        getattr(self, "_on_" + event["event"])(event)

    def _on_dataset(self, e: dict[str, Any]) -> None:
        ds, cfg = e["dataset"], e["config"]
        self.vocab = ds["vocab_size"]
        ex = ds["examples"]
        self.print(f"[bold]dataset[/]: {escape(ds['description'])}: {ds['words']:,} words, {ds['vocab_size']} symbols "
                   f"(uniform baseline {ds['baseline']:.4f} nats for {ds['vocab_size']} classes)")
        self.print(f"  split 80/10/10 (random.seed(42)): {ex['train']:,} / {ex['val']:,} / {ex['test']:,} "
                   "training / validation / test examples")
        if ds["lesson_data"]:
            self.print("  this is the lesson's names.txt: the notebook's figures are shown beside ours")
        one = schedule_for("naive", cfg["profile"], cfg["steps"])
        deep = schedule_for("deep", cfg["profile"], cfg["steps"])
        self.print(f"[bold]profile[/] {cfg['profile']}: {one.steps:,} steps of SGD per stage, batch 32, lr 0.1 then "
                   f"0.01 from step {one.decay_at:,} (deep: {deep.decay_at:,}); seed {cfg['seed']}")

    def _on_start(self, e: dict[str, Any]) -> None:
        init = e["init"]
        name = e["stage"]
        colour = VERDICT_COLOUR.get(init["verdict"], "white")
        resumed = f" (continuing from step {e['step']:,})" if e["step"] else ""
        self.print(f"\n[bold]{name}[/]: {escape(e['title'])}{resumed}")
        self.print(f"  start: {init['start_loss_batch']:.4f} on the first minibatch, {init['start_loss_train']:.4f} "
                   f"over the training split; uniform baseline {init['baseline']:.4f} "
                   f"-> [{colour}]{init['verdict']}[/]")
        self._findings("at initialisation", init["doctor"])
        self.tasks[name] = self.progress.add_task(name, total=e["steps"], completed=e["step"], loss="-")
        if not self.progress.live.is_started and not self.quiet:
            self.progress.start()

    def _on_progress(self, e: dict[str, Any]) -> None:
        task = self.tasks.get(e["stage"])
        if task is not None:
            self.progress.update(task, completed=e["step"], loss=f"{e['loss']:.4f}")

    def _on_done(self, e: dict[str, Any]) -> None:
        r = e["result"]
        task = self.tasks.get(e["stage"])
        if task is not None:
            self.progress.update(task, completed=r["steps"])
        if e["earlier"]:
            self.print(f"\n[bold]{r['name']}[/]: done in an earlier session (train {r['train_loss']:.4f}, "
                       f"val {r['val_loss']:.4f})")
            return
        rate = f", {r['steps_per_second']:,.0f} steps/s" if r["steps_per_second"] else ""
        self.print(f"\n[bold]{r['name']}[/] trained: train {r['train_loss']:.4f}, val {r['val_loss']:.4f}, "
                   f"test {r['test_loss']:.4f} ({r['steps']:,} steps in {r['seconds']:.1f} s{rate})")
        if "val_loss_calibrated" in r:
            self.print(f"  BatchNorm statistics for evaluation: val {r['val_loss']:.4f} with the running ones kept "
                       f"in training, {r['val_loss_calibrated']:.4f} calibrated over the whole training split")
        if r["diagnosis"].get("training"):
            self._findings("during training (Monitor)", r["diagnosis"]["training"])
        self._findings("after training", r["diagnosis"]["end"])
        if "caveats" in r:
            c = r["caveats"]
            tr, ev, alone = c["train_mode"], c["eval_mode"], c["alone_eval"]
            self.print(f"  caveat 1: one example in two different batches: loss {tr['loss_in_batch_a']:.4f} vs "
                       f"{tr['loss_in_batch_b']:.4f} in training mode "
                       f"(logits move up to {tr['max_logit_change']:.3g}); "
                       f"{ev['loss_in_batch_a']:.4f} vs {ev['loss_in_batch_b']:.4f} in eval mode "
                       f"(up to {ev['max_logit_change']:.2g})")
            self.print(f"  caveat 2: evaluated alone in eval mode: {alone['loss_alone']:.4f}, inside its batch "
                       f"{alone['loss_in_batch']:.4f} (largest logit difference {alone['max_logit_difference']:.2g})")
        self.print(f"  samples: {escape(', '.join(r['samples']))}")

    def _on_interrupted(self, e: dict[str, Any]) -> None:
        self.print(f"[yellow]{e['stage']}: stopped at step {e['step']:,}, checkpoint saved[/]")

    def _findings(self, when: str, doctor: dict[str, Any]) -> None:
        sat = doctor.get("saturation")
        sat_text = f"; tanh outputs beyond +-0.97: {100 * sat:.1f}%" if sat is not None else ""
        if not doctor["findings"]:
            self.print(f"  doctor {when}: no findings{sat_text}")
            return
        self.print(f"  doctor {when}{sat_text}:")
        for f in doctor["findings"]:
            colour = SEVERITY_COLOUR.get(f["severity"], "white")
            self.print(f"    [{colour}]{f['severity']:<7}[/] {f['code']} ({escape(f['where'])}): "
                       f"{escape(f['message'])}")

    def stop(self) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


def final_table(summary: dict[str, Any]) -> Table:
    """Stages x (start, train, val, reference): the numbers to compare at a glance."""
    lesson = summary["dataset"]["lesson_data"]
    table = Table(title=f"lab results: losses in nats (uniform baseline {summary['dataset']['baseline']:.4f})"
                        + ("; nb = the notebook" if lesson else ""), title_justify="left")
    columns = [("start", "start_loss_batch"), ("train", "train_loss"), ("val", "val_loss"),
               ("val cal.", "val_loss_calibrated")]
    table.add_column("stage")
    for head, _ in columns:
        table.add_column(head, justify="right")
    if lesson:
        for head, _ in columns:
            table.add_column(f"nb {head}", justify="right", style="dim")
    for st in summary["stages"]:
        row = [st["name"], *(_cell(st.get(key)) for _, key in columns)]
        if lesson:
            row += [_cell(st.get("reference", {}).get(key)) for _, key in columns]
        table.add_row(*row)
    return table


def _cell(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", "data_path", metavar="PATH",
              help="Word list, one word per line (default: $NNVITALS_DATA, then the names.txt of "
                   "`nnvitals data fetch`, then the embedded census first names).")
@click.option("--stages", metavar="LIST", help=f"Comma-separated subset of: {', '.join(models.STAGE_NAMES)}.")
@click.option("--profile", type=click.Choice(PROFILES),
              help="quick (default): 20,000 steps a stage; full: the lesson's 200,000.")
@click.option("--steps", type=click.IntRange(min=1), metavar="N", help="Steps per stage (the schedule scales).")
@click.option("--seed", type=int, metavar="N",
              help=f"Seed of the weights and minibatches (default {models.LESSON_SEED}).")
@click.option("--out", type=click.Path(path_type=Path), metavar="DIR", help="Run folder (default runs/<time>-lab).")
@click.option("--resume", type=click.Path(path_type=Path), metavar="DIR", help="Continue the run in DIR.")
@click.option("--jobs", type=click.IntRange(min=1), metavar="N",
              help="Stages trained at once, in worker processes (default: one per CPU core).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of the tables.")
@click.option("--events", "events_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Also append every event of the run to FILE, one JSON object a line, for a program following "
                   "the run (the lesson page's progress bars).")
def lab(data_path: str | None, stages: str | None, profile: str | None, steps: int | None, seed: int | None,
        out: Path | None, resume: Path | None, jobs: int | None, as_json: bool, events_path: Path | None) -> int:
    """Reproduce makemore part 3 stage by stage: naive, fix-softmax, fix-tanh, kaiming, batchnorm, deep.

    For each stage: the starting loss against the uniform baseline, the doctor's findings and figures
    at initialisation and after training, training with a progress bar, final losses, BatchNorm's
    running against calibrated statistics, and 20 sampled names. Ctrl-C saves a checkpoint;
    `--resume DIR` continues with exactly the numbers an uninterrupted run gives.
    """
    try:
        if resume is not None:
            options = (("--data", data_path), ("--stages", stages), ("--profile", profile), ("--steps", steps),
                       ("--seed", seed), ("--out", out))
            given = [name for name, value in options if value is not None]
            if given:
                raise _bad(f"--resume continues a run with the settings it was started with; drop {', '.join(given)}")
            run_dir = resume
            config, words = experiment.open_run(run_dir)
        else:
            words = lab_data.resolve(data_path)
            config = experiment.LabConfig(_stages(stages), profile or "quick", steps,
                                          models.LESSON_SEED if seed is None else seed)
            run_dir = out if out is not None else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-lab"
            experiment.start_run(run_dir, config, words)
    except (lab_data.DataError, experiment.RunError) as e:
        raise _bad(str(e)) from None

    console = Console(highlight=False, stderr=as_json, soft_wrap=True)
    if not console.is_terminal:
        console.width = max(console.width, TABLE_WIDTH)  # piped or captured: do not squeeze the final table
    presenter = _Presenter(console, quiet=as_json)
    try:
        events = events_path.open("a", encoding="utf-8") if events_path is not None else None
    except OSError as e:
        raise _bad(f"cannot write the events to {events_path}: {e.strerror or e}") from None

    def emit(event: dict[str, Any]) -> None:
        presenter(event)
        if events is not None:  # a line at a time, flushed, so a reader never sees half an event
            events.write(json.dumps(event, default=str) + "\n")
            events.flush()

    try:
        outcome = experiment.run(run_dir, config, words, emit, jobs=jobs)
    except experiment.RunError as e:
        raise _bad(str(e)) from None
    finally:
        presenter.stop()
        if events is not None:
            events.close()
    if outcome.interrupted or outcome.summary is None:
        print(f"interrupted: everything so far is saved in {run_dir}; continue with "
              f"`nnvitals lab --resume {run_dir}`", file=sys.stderr)
        return 130
    if as_json:
        sys.stdout.write(json.dumps(outcome.summary, indent=2) + "\n")
        return 0
    console.print()
    console.print(final_table(outcome.summary))
    if outcome.summary["dataset"]["lesson_data"]:
        console.print(f"notebook figures from {reference.SOURCE}")
    console.print(f"report: {run_dir / 'report.html'}")
    return 0


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def data() -> None:
    """The lab's dataset."""


@data.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def fetch(as_json: bool) -> None:
    """Download the lesson's names.txt into the user cache (checked by sha256); the lab then uses it."""
    try:
        path = lab_data.fetch(lab_data.NAMES_URL, lab_data.NAMES_SHA256)
        words = lab_data.read_words(path, "cache")
    except lab_data.DataError as e:
        raise _bad(str(e)) from None
    if as_json:
        sys.stdout.write(json.dumps({"path": str(path), "sha256": words.sha256, "words": len(words.words)}) + "\n")
        return
    Console(highlight=False).print(f"saved {path}: {len(words.words):,} words, sha256 {words.sha256} (verified); "
                                   "`nnvitals lab` now uses it when no --data is given")

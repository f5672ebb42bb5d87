"""`nnvitals study`: the lesson in the terminal. Thin: parses, asks, prints; the logic lives in
material (the lesson file), exercise (cases and checking), store (FSRS in SQLite) and export (Anki, PDF).

Interaction works in a terminal (single keypresses, colour) and piped (one line per answer, plain text,
end of input ends the session cleanly). Errors the learner can fix become one `error:` line, exit 2.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections import Counter
from collections.abc import Mapping
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Console
from rich.padding import Padding
from rich.text import Text

from nnvitals.study import exercise as exercises
from nnvitals.study import export, store
from nnvitals.study.material import Lesson, MaterialError, packaged

INTERRUPTED = 130  # the shell's code for Ctrl-C


def _lesson() -> Lesson:
    try:
        return packaged()
    except MaterialError as e:
        raise click.UsageError(str(e)) from None


class _Session:
    """A study session that ends quietly at the end of input (Ctrl-D) and, on Ctrl-C, after a line break,
    remembering to exit with INTERRUPTED; the caller then sums up what was done either way."""

    def __init__(self, term: _Term) -> None:
        self.term = term
        self.code = 0

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if kind is KeyboardInterrupt:
            self.term.say()
            self.code = INTERRUPTED
            return True
        return kind is EOFError


class _Term:
    """Prompts and output for one session: keypresses in a terminal, lines when piped."""

    def __init__(self) -> None:
        self.keys = sys.stdin.isatty()
        # Piped output is plain text, one paragraph per line; a terminal gets colour and wrapping.
        self.tty = sys.stdout.isatty()
        self.console = Console(highlight=False, soft_wrap=not self.tty)

    def say(self, text: str = "", style: str = "", indent: int = 0) -> None:
        if indent and self.tty:  # wrapped lines keep the indent
            self.console.print(Padding(Text(text, style=style), (0, 0, 0, indent), expand=False))
        else:
            self.console.print(Text(" " * indent + text, style=style))

    def rule(self, title: str) -> None:
        self.say()
        self.say(title, "bold cyan")

    def _ask(self, prompt: str) -> None:
        self.console.print(Text(prompt, style="bold"), end="")
        sys.stdout.flush()

    def line(self, prompt: str) -> str:
        """One line of text. EOFError at the end of piped input or on Ctrl-D."""
        self._ask(prompt)
        if self.keys:
            return input()
        text = sys.stdin.readline()
        if not text:
            self.say()
            raise EOFError
        self.say(text.rstrip("\n"))
        return text.strip()

    def key(self, prompt: str, choices: Mapping[str, str]) -> str:
        """One of `choices` (key -> label; "\\n" stands for Enter): a keypress, or a line when piped."""
        self._ask(prompt + " ")
        while True:
            if self.keys:
                pressed = _keypress()
                choice = "\n" if pressed in ("\r", "\n", " ") else pressed.lower()
                if choice in choices:
                    self.say(choices[choice], "dim")
                    return choice
                continue  # any other key: keep waiting
            text = sys.stdin.readline()
            if not text:
                self.say()
                raise EOFError
            choice = text.strip().lower()[:1] or "\n"
            if choice in choices:
                self.say(f"{text.strip()} ({choices[choice]})" if text.strip() else f"({choices[choice]})",
                         "dim")
                return choice
            self.say(f"{text.strip()!r} is not one of the choices")
            self._ask(prompt + " ")


def _keypress() -> str:
    """One keypress from the terminal. Ctrl-C raises KeyboardInterrupt, Ctrl-D EOFError.

    Unlike click.getchar, which enters raw mode with TCSAFLUSH and so drops keys typed a moment early,
    this switches with TCSANOW: type-ahead is kept.
    """
    try:
        import termios
        import tty
    except ImportError:  # Windows: click reads the console directly
        return click.getchar()
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        pressed = os.read(fd, 32).decode(sys.stdin.encoding or "utf-8", "replace")
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    if pressed.startswith("\x03"):
        raise KeyboardInterrupt
    if pressed.startswith("\x04") or not pressed:
        raise EOFError
    return pressed


DB_OPTION = click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help=f"Review database (default: ${store.ENV_VAR}, else $XDG_DATA_HOME/nnvitals/{store.FILE_NAME}, "
    f"else ~/.local/share/nnvitals/{store.FILE_NAME}).",
)
OUT_HELP = "Where to write it. The file appears complete or not at all."


def _db_path(db: Path | None) -> Path:
    return db if db is not None else store.default_path()


@click.group(no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
             short_help="Practice, exercise and flashcards for the lesson behind the numbers.")
def study() -> None:
    """Learn the lesson behind the numbers: activations, gradients and BatchNorm.

    \b
    A path through it:
      nnvitals study practice              five questions: answer, reveal, rate yourself
      nnvitals study exercise              three diagnosis cases, each from one number
      nnvitals study exercise --drill 5    five fresh cases to drill the arithmetic
      nnvitals study review                the eight flashcards, spaced repetition (FSRS)
      nnvitals study stats                 what is due and how the cards are going
      nnvitals study anki --out nn.apkg    the flashcards as an Anki deck
      nnvitals study print --out nn.pdf    the flashcards as printable pages

    Review progress lives in an SQLite file: --db FILE, else $NNVITALS_DB, else
    $XDG_DATA_HOME/nnvitals/study.sqlite3 (~/.local/share/nnvitals/ by default).
    Everything works in a terminal and piped; Ctrl-C stops and keeps what was graded.
    """


# --- practice ------------------------------------------------------------------------------------

_SELF_RATINGS = {"1": "knew it", "2": "partly", "3": "not yet", "q": "stop"}


@study.command(short_help="Five questions: answer, reveal the answer, rate yourself.")
def practice() -> int:
    """Five questions: answer each first, then reveal the answer and rate yourself.

    Type an attempt (or just think it) and press Enter to see the answer; then rate yourself
    1 knew it, 2 partly, 3 not yet (q stops). Attempts are kept until the summary, not saved.
    """
    lesson = _lesson()
    term = _Term()
    term.say(f"Practice: {lesson.title}", "bold")
    term.say(lesson.practice_intro)
    done: list[tuple[int, str, str]] = []  # (question number, attempt, self-rating)
    with _Session(term) as session:
        for number, q in enumerate(lesson.questions, 1):
            term.rule(f"Question {number} of {len(lesson.questions)}")
            term.say(q.prompt, "bold")
            attempt = term.line("Your attempt (Enter shows the answer): ")
            term.say("Answer", "bold green")
            term.say(q.answer, indent=2)
            if attempt:
                term.say("You wrote", "bold")
                term.say(attempt, indent=2)
            choice = term.key("How did it go? 1 knew it · 2 partly · 3 not yet · q stop:", _SELF_RATINGS)
            if choice == "q":
                break
            done.append((number, attempt, _SELF_RATINGS[choice]))

    term.rule("Summary")
    if not done:
        term.say("No question rated this time. Run `nnvitals study practice` to start again.")
        return session.code
    tally = Counter(rating for _, _, rating in done)
    term.say(f"{len(done)} of {len(lesson.questions)} rated: " + " · ".join(
        f"{tally[r]} {r}" for r in ("knew it", "partly", "not yet")))
    for number, attempt, rating in done:
        term.say(f"{number}. {rating:<8} {lesson.questions[number - 1].prompt}", indent=2)
        if attempt:
            term.say(f"your attempt: {attempt}", "dim", indent=14)
    weak = [n for n, _, r in done if r != "knew it"]
    if weak:
        term.say(f"Worth another look: question {', '.join(map(str, weak))}. The flashcards "
                 "(`nnvitals study review`) bring these facts back on a schedule.")
    else:
        term.say("All known. Next: `nnvitals study exercise` puts the numbers to work.")
    return session.code


# --- exercise ------------------------------------------------------------------------------------


def _ask_number(term: _Term, prompt: str) -> float | None:
    while True:
        text = term.line(f"  {prompt}: ")
        if not text:
            return None
        try:
            return exercises.parse_answer(text)
        except ValueError as e:
            term.say(f"{e} (Enter skips)", "yellow", indent=4)


@study.command(short_help="Diagnose cases from one number each; --drill N for fresh ones.")
@click.option("--drill", type=click.IntRange(1, 100), metavar="N",
              help="Instead of the three fixed cases, N fresh ones (1 to 100) with other class counts, "
                   "starting losses and pre-activations.")
def exercise(drill: int | None) -> int:
    """Diagnose from the numbers: work out each figure, type it in, see the worked solution.

    Each answer is checked against the value computed by nnvitals.numbers, within the tolerance
    shown in brackets. Enter skips a figure; percentages such as 7% are accepted.
    """
    lesson = _lesson()
    cases = list(lesson.cases) if drill is None else exercises.draw_cases(drill, lesson.drill_stories)
    term = _Term()
    drilling = f" (drill: {drill} fresh cases)" if drill else ""
    term.say(f"Exercise: diagnose from the numbers{drilling}", "bold")
    term.say(lesson.exercise_intro if drill is None else lesson.drill_intro)
    right = asked = 0
    with _Session(term) as session:
        for number, case in enumerate(cases, 1):
            problem = exercises.pose(case)
            term.rule(f"Case {number} of {len(cases)}")
            term.say(case.story, "bold")
            for step in problem.steps:
                answer = _ask_number(term, step.prompt)
                asked += 1
                if answer is None:
                    term.say(f"skipped: it is {step.shown}", "yellow", indent=4)
                elif step.check(answer):
                    right += 1
                    term.say(f"right: {step.shown} (you gave {answer:g})", "green", indent=4)
                else:
                    term.say(f"not within ±{step.tolerance:g} of {step.shown} (you gave {answer:g})", "red",
                             indent=4)
            term.say("Worked solution", "bold")
            for i, line in enumerate(problem.solution, 1):
                term.say(f"{i}. {line}", indent=2)
            term.say(f"Verdict: {problem.verdict}", "bold")
    term.rule("Summary")
    term.say(f"{right} of {asked} figures within tolerance.")
    if asked and drill is None:
        term.say(lesson.exercise_closing)
    term.say("More practice: `nnvitals study exercise --drill 5`.")
    return session.code


# --- review --------------------------------------------------------------------------------------


def _when(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never seen"
    seconds = (moment - now).total_seconds()
    if seconds <= 30:
        return "now"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"in {minutes} min"
    hours = round(seconds / 3600)
    if hours < 36:
        return f"in {hours} h"
    return f"in {round(seconds / 86400)} days"


_REVEAL_KEYS = {"\n": "answer", "u": "undo", "q": "quit"}
_GRADE_KEYS = {**{str(k): v for k, v in store.RATINGS.items()}, "u": "undo", "q": "quit"}
GRADE_PROMPT = "Grade 1 Again · 2 Hard · 3 Good · 4 Easy (u undo, q quit):"


@study.command(short_help="Review the eight flashcards with spaced repetition (FSRS).")
@DB_OPTION
@click.option("--cram", is_flag=True,
              help="Go through all eight cards now, whatever their schedule (grades still count).")
def review(db: Path | None, cram: bool) -> int:
    """Spaced repetition of the eight flashcards (FSRS).

    \b
    Keys: Enter or space shows the answer; then grade yourself
      1 Again (forgot)  2 Hard  3 Good  4 Easy
      u  undo the last grade of this session (the card comes back)
      q  quit; every grade so far is already saved
    Cards you have never seen come after the ones that are due.
    """
    lesson = _lesson()
    ids = lesson.card_ids
    path = _db_path(db)
    term = _Term()
    try:
        conn = store.open_store(path)
    except store.StoreError as e:
        raise click.UsageError(str(e)) from None
    graded: list[store.Review] = []
    with closing(conn):
        with _Session(term) as session:
            try:
                due, new = store.due_cards(conn, ids), store.new_cards(conn, ids)
                term.say(f"Review: {len(due)} due, {len(new)} new, {len(ids)} cards in all", "bold")
                queue = list(ids) if cram else due + new
                if cram:
                    term.say(f"Cram: all {len(ids)} cards regardless of schedule; grades are recorded as usual.")
                if not queue:
                    _nothing_due(term, conn, ids)
                    return 0
                term.say("Enter shows the answer · 1 Again · 2 Hard · 3 Good · 4 Easy · u undo · q quit", "dim")
                while queue:
                    card = lesson.card(queue[0])
                    schedule = store.schedules(conn, [card.id])[0]
                    after = len(queue) - 1
                    term.rule(f"Card {len(graded) + 1} · {card.id} · {schedule.state} · {after} more after it")
                    term.say(card.question, "bold")
                    choice = term.key("Enter shows the answer (u undo, q quit):", _REVEAL_KEYS)
                    if choice == "\n":
                        term.say(card.answer, indent=2)
                        choice = term.key(GRADE_PROMPT, _GRADE_KEYS)
                    if choice == "q":
                        break
                    if choice == "u":
                        _undo(term, conn, graded, queue)
                        continue
                    done = store.grade(conn, card.id, int(choice))
                    graded.append(done)
                    queue.pop(0)
                    term.say(f"{done.rating_name}: back {_when(done.due, done.reviewed_at)}", "dim", indent=2)
                    if not queue and not cram:
                        # learning steps are minutes long: a card graded early in the session may be due again
                        queue = store.due_cards(conn, ids)
            except store.StoreError as e:
                raise click.UsageError(f"{e} ({len(graded)} grades of this session were saved)") from None
        _review_summary(term, conn, ids, graded)
    return session.code


def _undo(term: _Term, conn: sqlite3.Connection, graded: list[store.Review], queue: list[str]) -> None:
    if not graded:
        term.say("Nothing to undo in this session.", "yellow", indent=2)
        return
    last = graded[-1]
    try:
        store.undo_last(conn, last.id)
    except store.StoreError as e:  # graded again meanwhile by another session: keep going
        term.say(f"Cannot undo: {e}", "yellow", indent=2)
        return
    graded.pop()
    if last.card_id in queue:
        queue.remove(last.card_id)
    queue.insert(0, last.card_id)
    term.say(f"Undid {last.rating_name} on {last.card_id}: it is back, with its earlier schedule.", "yellow",
             indent=2)


def _nothing_due(term: _Term, conn: sqlite3.Connection, ids: list[str]) -> None:
    now = datetime.now(UTC)
    upcoming = [s for s in store.schedules(conn, ids) if s.due is not None]
    if not upcoming:
        term.say("There are no cards to review.")
        return
    first = min(upcoming, key=lambda s: s.due or now)
    term.say(f"Nothing is due. Next: {first.card_id} {_when(first.due, now)}. "
             "`--cram` goes through every card now.")


def _review_summary(term: _Term, conn: sqlite3.Connection, ids: list[str],
                    graded: list[store.Review]) -> None:
    summary = store.stats(conn, ids)
    now = datetime.now(UTC)
    term.rule("Session")
    if graded:
        tally = Counter(r.rating_name for r in graded)
        term.say(f"{len(graded)} graded and saved: " + ", ".join(
            f"{tally[name]} {name}" for name in store.RATINGS.values() if tally[name]))
    else:
        term.say("Nothing graded this time.")
    next_due = f"; next due {_when(summary.next_due, now)}" if summary.next_due else ""
    term.say(f"Now {summary.due_now} due, {summary.new} new{next_due}. "
             "`nnvitals study stats` shows each card.")


# --- stats ---------------------------------------------------------------------------------------


@study.command(short_help="What is due and how the flashcards are going.")
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(db: Path | None, as_json: bool) -> None:
    """How the flashcards stand: new, learning and review counts, what is due, how grades went."""
    import json

    lesson = _lesson()
    path = _db_path(db)
    try:
        result = store.stats(path, lesson.card_ids)
    except store.StoreError as e:
        raise click.UsageError(str(e)) from None
    if as_json:
        sys.stdout.write(json.dumps({"db": str(path), **result.to_dict()}, indent=2) + "\n")
        return
    now = datetime.now(UTC)
    term = _Term()
    term.say(f"{result.cards} cards: {result.new} new, {result.learning} learning, "
             f"{result.review} in review, {result.relearning} relearning", "bold")
    nxt = f" · next due {_when(result.next_due, now)}" if result.next_due else ""
    term.say(f"Due now: {result.due_now} · within a day: {result.due_within_day}{nxt}")
    if result.reviews:
        assert result.again_share is not None
        term.say(f"Grades: {result.reviews} in all, {result.reviews_last_day} in the last 24 h, "
                 f"{100 * result.again_share:.0f}% of them Again (forgotten)")
    else:
        term.say("Grades: none yet. `nnvitals study review` starts the first session.")
    term.say()
    term.say(f"{'card':<24} {'state':<11} {'due':<13} {'reviews':>7} {'lapses':>6}  stability", "bold")
    for s in result.schedules:
        stability = f"{s.stability:.1f} days" if s.stability is not None else "-"
        due = _when(s.due, now) if s.due else "-"
        term.say(f"{s.card_id:<24} {s.state:<11} {due:<13} {s.reviews:>7} {s.lapses:>6}  {stability}")
    term.say()
    term.say(f"Database: {path}", "dim")


# --- anki and print ------------------------------------------------------------------------------


def _out(path: Path, suffix: str) -> Path:
    if path.suffix.lower() != suffix:
        raise click.UsageError(f"--out must be a file name ending in {suffix}, got {str(path)!r}")
    return path


@study.command(short_help="Export the flashcards as an Anki deck (.apkg).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.apkg",
              help=OUT_HELP)
def anki(out: Path) -> None:
    """The eight flashcards as an Anki deck.

    Import it with File > Import in Anki. Notes are identified by the cards' stable ids, so
    importing a newer export updates the notes you have instead of duplicating them.
    """
    lesson = _lesson()
    try:
        written = export.write_anki(_out(out, ".apkg"), lesson)
    except export.ExportError as e:
        raise click.UsageError(str(e)) from None
    _Term().say(f"Wrote {written}: {len(lesson.cards)} notes in the deck 'nnvitals::{lesson.title}'. "
                "Import it in Anki with File > Import.")


@study.command("print", short_help="Export the flashcards as a printable PDF.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.pdf",
              help=OUT_HELP)
@click.option("--fronts-backs", is_flag=True,
              help="Questions and answers on alternate pages (16 pages), for double-sided printing.")
def print_cards(out: Path, fronts_backs: bool) -> None:
    """The eight flashcards as a PDF, one card per page: question, then answer.

    A5 landscape pages with selectable text; print them on A4 two to a sheet, or at full size.
    """
    lesson = _lesson()
    try:
        written = export.write_pdf(_out(out, ".pdf"), lesson, fronts_backs=fronts_backs)
    except export.ExportError as e:
        raise click.UsageError(str(e)) from None
    pages = 2 * len(lesson.cards) if fronts_backs else len(lesson.cards)
    layout = "fronts and backs on alternate pages" if fronts_backs else "one card per page"
    _Term().say(f"Wrote {written}: {pages} pages, {layout}.")

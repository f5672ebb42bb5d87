"""The interactive commands driven through a real pseudo-terminal, keypress by keypress."""

import math
import re
import signal
import sqlite3
import time
from pathlib import Path

import pexpect

from nnvitals import numbers
from nnvitals.study import cli as study_cli
from nnvitals.study import material, store

REVEAL = "Enter shows the answer (u undo, q quit):"
GRADE = study_cli.GRADE_PROMPT


def _card(child: pexpect.spawn, card_id: str) -> None:
    child.expect_exact(f"· {card_id} ·")
    child.expect_exact(material.load().card(card_id).question)
    child.expect_exact(REVEAL)


def _finish(child: pexpect.spawn) -> str:
    child.expect(pexpect.EOF)
    child.close()
    assert "Traceback" not in (child.before or "")
    return child.before or ""


def test_review_reveal_grade_undo_quit_resume_and_ctrl_c(terminal, db: Path):
    child = terminal("review")
    child.expect_exact("Review: 0 due, 8 new, 8 cards in all")
    _card(child, "card-baseline")
    child.send(" ")  # reveal
    child.expect_exact(material.load().card("card-baseline").answer[:60])
    child.expect_exact(GRADE)
    child.send("3")
    child.expect_exact("Good: back in 10 min")
    _card(child, "card-huge-start")
    child.send("\r")
    child.expect_exact(GRADE)
    child.send("1")
    child.expect_exact("Again: back in 1 min")
    _card(child, "card-saturation")
    child.send("u")
    child.expect_exact("Undid Again on card-huge-start")
    _card(child, "card-huge-start")  # the undone card comes straight back
    child.send("\r")
    child.expect_exact(GRADE)
    child.send("4")
    child.expect_exact("Easy: back in")
    _card(child, "card-saturation")
    child.send("q")
    child.expect_exact("2 graded and saved: 1 Good, 1 Easy")
    _finish(child)
    assert child.exitstatus == 0

    saved = {s.card_id: s for s in store.schedules(db)}
    assert (saved["card-baseline"].state, saved["card-huge-start"].state) == ("learning", "review")
    assert (saved["card-huge-start"].reviews, saved["card-huge-start"].lapses) == (1, 0)  # the Again is gone

    resumed = terminal("review")
    resumed.expect_exact("Review: 0 due, 6 new, 8 cards in all")
    _card(resumed, "card-saturation")
    resumed.send("\r")
    resumed.expect_exact(GRADE)
    resumed.send("2")
    _card(resumed, "card-histogram")
    resumed.sendintr()  # Ctrl-C: a clean stop, the grade kept
    resumed.expect_exact("1 graded and saved: 1 Hard")
    out = _finish(resumed)
    assert resumed.exitstatus == 130
    assert "error" not in out.lower()
    assert store.stats(db).reviews == 3


def test_a_killed_review_keeps_every_grade_already_given(terminal, db: Path):
    child = terminal("review")
    for card_id, key in (("card-baseline", "3"), ("card-huge-start", "2")):
        _card(child, card_id)
        child.send("\r")
        child.expect_exact(GRADE)
        child.send(key)
    _card(child, "card-saturation")
    child.send("\r")
    child.expect_exact(GRADE)  # killed with the third card's answer on screen
    child.kill(signal.SIGKILL)
    child.close(force=True)
    assert child.signalstatus == signal.SIGKILL

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [(s.card_id, s.reviews) for s in store.schedules(db) if s.reviews] == [
        ("card-baseline", 1), ("card-huge-start", 1)]
    assert store.new_cards(db)[0] == "card-saturation"


def test_practice_attempt_reveal_and_self_rating(terminal):
    lesson = material.load()
    child = terminal("practice")
    child.expect_exact("Question 1 of 5")
    child.expect_exact(lesson.questions[0].prompt)
    child.expect_exact("Your attempt (Enter shows the answer): ")
    child.sendline("the logits are far too confident")
    child.expect_exact(lesson.questions[0].answer[:80])
    child.expect_exact("You wrote")
    child.expect_exact("How did it go?")
    child.send("2")
    child.expect_exact("Question 2 of 5")
    child.expect_exact("Your attempt")
    child.sendline("")
    child.expect_exact("How did it go?")
    child.send("1")
    child.expect_exact("Question 3 of 5")
    child.expect_exact("Your attempt")
    child.sendline("")
    child.expect_exact("How did it go?")
    child.send("q")
    child.expect_exact("2 of 5 rated: 1 knew it · 1 partly · 0 not yet")
    child.expect_exact("your attempt: the logits are far too confident")
    child.expect_exact("Worth another look: question 1")
    _finish(child)
    assert child.exitstatus == 0


def test_exercise_checks_each_figure_and_shows_the_worked_solution(terminal):
    child = terminal("exercise")
    child.expect_exact("over 27 symbols reports a loss of 13.5")
    child.expect_exact("Uniform baseline ln(27), in nats (±0.01): ")
    child.sendline("3.30")
    child.expect_exact("right: 3.2958")
    child.expect_exact("(±0.05): ")
    child.sendline("13.5")
    child.expect_exact("not within ±0.05 of 10.2042 (you gave 13.5)")
    child.expect_exact("Worked solution")
    child.expect_exact("13.5 - 3.2958 = 10.2042")
    child.expect_exact("Verdict: too-high")
    child.expect_exact("ln(50), in nats (±0.01): ")
    child.sendline("3.91")
    child.expect_exact("right: 3.9120")
    child.expect_exact("tanh(2) (±0.005): ")
    child.sendline("0.964")
    child.expect_exact("right: 0.9640")
    child.expect_exact("(±0.005): ")
    child.sendline("0.5")
    child.expect_exact("not within ±0.005 of 0.0707")
    child.expect_exact("passes back 7.1% of it")
    child.expect_exact("3 of 5 figures within tolerance.")
    _finish(child)
    assert child.exitstatus == 0


def test_a_drill_poses_fresh_cases_and_checks_them_the_same_way(terminal):
    child = terminal("exercise", "--drill", "4")
    patterns = [
        r"reports a loss of ([\d.]+) on its first batch",
        r"(?:Uniform baseline|Expected starting loss) ln\((\d+)\)[^:]*: ",
        r"Starting loss minus that baseline[^:]*: ",
        r"tanh\((-?[\d.]+)\) \(±[\d.]+\): ",
        r"Local derivative 1 - tanh\((-?[\d.]+)\)²[^:]*: ",
        r"(\d+) of (\d+) figures within tolerance",
    ]
    loss = classes = 0.0
    while True:
        which = child.expect(patterns)
        found = child.match.groups()
        if which == 0:
            loss = float(found[0])
        elif which == 1:
            classes = int(found[0])
            child.sendline(f"{numbers.baseline_loss(int(classes)):.2f}")
        elif which == 2:
            child.sendline(f"{loss - numbers.baseline_loss(int(classes)):.2f}")
        elif which == 3:
            child.sendline(f"{math.tanh(float(found[0])):.3f}")
        elif which == 4:
            child.sendline(f"{100 * numbers.tanh_gradient(float(found[0])).local_derivative:.1f}%")
        else:
            right, asked = map(int, found)
            break
    assert right == asked >= 4
    assert "not within" not in re.sub(r"\s+", " ", child.before or "")
    _finish(child)


def _interrupt_at(child, prompt):
    """Ctrl-C once the program waits at `prompt`. (Sent the instant a line is printed, it can land between
    Python's last signal check and the read() that follows; CPython then sees it only at the next key, and
    a person would press it again.)"""
    child.expect_exact(prompt)
    time.sleep(0.3)
    child.sendintr()


def test_ctrl_c_in_practice_and_exercise_sums_up_and_exits_130(terminal):
    child = terminal("practice")
    child.expect_exact("Your attempt (Enter shows the answer): ")
    child.sendline("")
    child.expect_exact("How did it go?")
    child.send("3")
    child.expect_exact("Question 2 of 5")
    _interrupt_at(child, "Your attempt (Enter shows the answer): ")
    child.expect_exact("1 of 5 rated: 0 knew it · 0 partly · 1 not yet")
    _finish(child)
    assert child.exitstatus == 130

    child = terminal("exercise")
    child.expect_exact("Uniform baseline ln(27), in nats (±0.01): ")
    child.sendline("3.30")
    child.expect_exact("right: 3.2958")
    _interrupt_at(child, "Starting loss minus that baseline")
    child.expect_exact("1 of 1 figures within tolerance.")
    _finish(child)
    assert child.exitstatus == 130

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnvitals import numbers
from nnvitals.study import exercise, material


def _problems():
    return [exercise.pose(c) for c in material.load().cases]


def test_the_three_fixed_cases_are_judged_by_the_numbers_module():
    bad_start, vocabulary, unit = _problems()
    ln27 = numbers.baseline_loss(27)
    assert [s.expected for s in bad_start.steps] == [ln27, 13.5 - ln27]
    assert bad_start.verdict.startswith("too-high")
    assert any(numbers.judge_start_loss(13.5, 27).fix in line for line in bad_start.solution)
    assert vocabulary.steps[0].expected == numbers.baseline_loss(50)
    g = numbers.tanh_gradient(2.0)
    assert [s.expected for s in unit.steps] == [g.output, g.local_derivative]
    assert "7.1%" in unit.verdict


def test_answers_as_the_lesson_rounds_them_are_right_and_others_wrong():
    bad_start, vocabulary, unit = _problems()
    assert bad_start.steps[0].check(3.30) and bad_start.steps[0].check(3.3)
    assert not bad_start.steps[0].check(3.20)
    assert bad_start.steps[1].check(10.2) and not bad_start.steps[1].check(13.5)
    assert vocabulary.steps[0].check(3.91) and not vocabulary.steps[0].check(3.3)
    assert unit.steps[0].check(0.964) and not unit.steps[0].check(0.76)
    assert unit.steps[1].check(exercise.parse_answer("7%")) and not unit.steps[1].check(0.93)


@pytest.mark.parametrize("text, value", [("3.3", 3.3), (" 3,30 ", 3.3), ("-0.5", -0.5), ("7%", 0.07),
                                         ("7.1 %", 0.071)])
def test_numbers_are_read_the_way_people_type_them(text, value):
    assert math.isclose(exercise.parse_answer(text), value)


@pytest.mark.parametrize("text", ["abc", "nan", "inf", "3..3", "%"])
def test_things_that_are_not_numbers_are_refused(text):
    with pytest.raises(ValueError, match="number"):
        exercise.parse_answer(text)


def test_a_drill_draws_fresh_cases_of_every_kind():
    stories = material.load().drill_stories
    cases = exercise.draw_cases(9, stories, random.Random(7))
    assert len(cases) == 9
    assert {c.kind for c in cases} == {"start-loss", "baseline", "tanh"}
    assert all(c.classes not in (27, 50) for c in cases if c.classes is not None)
    assert all(c.preactivation not in (0.0, 2.0) for c in cases if c.preactivation is not None)
    assert all(str(c.classes) in c.story for c in cases if c.classes is not None)
    with pytest.raises(ValueError):
        exercise.draw_cases(0, stories)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_drilled_answers_worked_to_the_lessons_precision_always_count(seed):
    """A learner who rounds ln(V) to 2 decimals and tanh to 3, then works on from there, is right."""
    (case,) = exercise.draw_cases(1, material.load().drill_stories, random.Random(seed))
    problem = exercise.pose(case)
    if case.kind == "tanh":
        assert case.preactivation is not None
        t = round(math.tanh(case.preactivation), 3)
        answers = [t, round(1 - t * t, 3)]
    else:
        assert case.classes is not None
        base = round(math.log(case.classes), 2)
        answers = [base] if case.kind == "baseline" else [base, round((case.loss or 0) - base, 2)]
    assert [s.check(a) for s, a in zip(problem.steps, answers, strict=True)] == [True] * len(answers)
    assert problem.solution and problem.verdict

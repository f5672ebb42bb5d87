import re
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from nnvitals import numbers
from nnvitals.study import material


def _raw() -> str:
    return resources.files("nnvitals.study").joinpath("lesson.toml").read_text(encoding="utf-8")


def test_the_lesson_has_five_questions_three_cases_and_eight_cards_with_stable_ids():
    lesson = material.load()
    assert len(lesson.questions) == 5
    assert len(lesson.cases) == 3
    assert len(lesson.cards) == 8
    ids = [x.id for x in (*lesson.questions, *lesson.cases, *lesson.cards)]
    assert len(set(ids)) == len(ids)
    assert "card-baseline" in lesson.card_ids


def test_every_text_is_filled_in_and_figures_come_from_the_numbers_module():
    lesson = material.load()
    texts = [lesson.practice_intro, lesson.exercise_intro, lesson.exercise_closing, lesson.drill_intro]
    for item in (*lesson.questions, *lesson.cards):
        texts += [getattr(item, f) for f in ("prompt", "question", "answer") if hasattr(item, f)]
    texts += [c.story for c in lesson.cases]
    assert not [t for t in texts if "{" in t or "}" in t]
    ln27 = f"{numbers.baseline_loss(27):.2f}"
    assert ln27 in lesson.card("card-baseline").answer
    assert ln27 in lesson.questions[0].answer
    pct = f"{100 * numbers.tanh_gradient(2).fraction_passed:.0f}%"
    assert pct in lesson.card("card-saturation").answer
    assert "5/3" in lesson.card("card-fan-in").answer  # numbers.gain("tanh") shown as a fraction


def test_the_file_types_no_figure_by_hand_and_cases_hold_inputs_only():
    raw = _raw()
    doc = tomllib.loads(raw)
    for case in doc["exercise"]["cases"]:
        assert set(case) <= {"id", "kind", "story", "classes", "loss", "preactivation"}
    for item in (*doc["practice"]["questions"], *doc["flashcards"]["cards"]):
        answer = item["answer"]
        # the lesson's computed figures must arrive through fields, never typed
        for typed in ("3.30", "3.91", "0.964", "0.07", "7%", "1.67"):
            assert typed not in answer, (item["id"], typed)


def test_a_reworded_lesson_keeps_its_ids(tmp_path: Path):
    edited = _raw().replace("What does batch normalisation do?", "In one breath: what does BatchNorm do?")
    path = tmp_path / "lesson.toml"
    path.write_text(edited, encoding="utf-8")
    lesson = material.load(path)
    assert lesson.card("card-batchnorm").question == "In one breath: what does BatchNorm do?"
    assert lesson.card_ids == material.load().card_ids


@pytest.mark.parametrize(
    "change, complaint",
    [
        (("{baseline_27}", "{baseline_twenty}"), "field"),
        (("{baseline_27}", "{speed_of_light}"), "unknown field"),
        (('id = "card-llm"', 'id = "card-baseline"'), "used twice"),
        (('kind = "tanh"\npreactivation', 'kind = "relu"\npreactivation'), "kind"),
        (("classes = 50", "classes = 1"), "at least 2"),
    ],
)
def test_a_broken_lesson_file_is_reported_clearly(tmp_path: Path, change, complaint):
    path = tmp_path / "lesson.toml"
    path.write_text(_raw().replace(*change, 1), encoding="utf-8")
    with pytest.raises(material.MaterialError, match=re.escape(complaint)):
        material.load(path)


def test_a_story_quotes_its_own_inputs():
    assert material.tell("V={classes}, loss {loss}, x={preactivation}", classes=27, loss=13.5,
                         preactivation=-2.0) == "V=27, loss 13.5, x=-2"

"""The lesson material: one TOML file in the package, read by every surface (terminal, web, PDF, Anki).

Figures in the text are fields such as ``{baseline_27}``, filled in here from nnvitals.numbers,
so the material can never disagree with the arithmetic the doctor uses.
"""

from __future__ import annotations

import functools
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from nnvitals import numbers

CaseKind = Literal["start-loss", "baseline", "tanh"]
CASE_KINDS: tuple[CaseKind, ...] = ("start-loss", "baseline", "tanh")
_ID = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


class MaterialError(Exception):
    """The lesson file is missing, malformed or refers to a field that does not exist."""


@dataclass(frozen=True)
class Question:
    id: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Case:
    """A diagnosis case: inputs only. Expected outcomes come from nnvitals.study.exercise."""

    id: str
    kind: CaseKind
    story: str
    classes: int | None = None
    loss: float | None = None
    preactivation: float | None = None


@dataclass(frozen=True)
class Flashcard:
    id: str
    question: str
    answer: str


@dataclass(frozen=True)
class Lesson:
    title: str
    practice_intro: str
    questions: tuple[Question, ...]
    exercise_intro: str
    exercise_closing: str
    drill_intro: str
    cases: tuple[Case, ...]
    drill_stories: Mapping[CaseKind, str]
    flashcards_intro: str
    cards: tuple[Flashcard, ...]

    def card(self, card_id: str) -> Flashcard:
        for c in self.cards:
            if c.id == card_id:
                return c
        raise KeyError(card_id)

    @property
    def card_ids(self) -> list[str]:
        return [c.id for c in self.cards]


class _Figures(Mapping[str, str]):
    """The values behind the fields, computed on demand: `{name_argument}` -> text.

    `inputs` are a case's own figures ({classes}, {loss}, {preactivation}) for its story.
    """

    def __init__(self, inputs: Mapping[str, str] | None = None) -> None:
        self.inputs = inputs or {}

    def __getitem__(self, key: str) -> str:
        if key in self.inputs:
            return self.inputs[key]
        name, _, arg = key.partition("_")
        try:
            if name == "baseline":
                return f"{numbers.baseline_loss(int(arg)):.2f}"
            if name in ("tanh", "dtanh", "dtanhpct"):
                g = numbers.tanh_gradient(float(arg))
                if name == "tanh":
                    return f"{g.output:.3f}"
                if name == "dtanh":
                    return f"{g.local_derivative:.3f}"
                return f"{100 * g.fraction_passed:.0f}%"
            if name == "gain":
                value = numbers.gain(arg)
                frac = Fraction(value).limit_denominator(12)
                if math.isclose(float(frac), value, rel_tol=1e-9) and frac.denominator != 1:
                    return f"{frac.numerator}/{frac.denominator}"
                return f"{value:.3g}"
            if key == "saturation_cut":
                return f"{numbers.SATURATION_CUT:g}"
        except (TypeError, ValueError) as e:
            raise MaterialError(f"field {{{key}}}: {e}") from None
        raise MaterialError(f"unknown field {{{key}}} in the lesson file")

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


def _fill(text: str, inputs: Mapping[str, str] | None = None) -> str:
    try:
        return text.format_map(_Figures(inputs))
    except (ValueError, IndexError) as e:
        raise MaterialError(f"bad field in {text[:40]!r}...: {e}") from None


def tell(story: str, classes: int | None = None, loss: float | None = None,
         preactivation: float | None = None) -> str:
    """Fill a case story's fields with the case's inputs (and any lesson figures)."""
    inputs = {k: f"{v:g}" for k, v in
              (("classes", classes), ("loss", loss), ("preactivation", preactivation)) if v is not None}
    return _fill(story, inputs)


def _raw_text(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise MaterialError(f"{where}: '{key}' must be a non-empty string")
    return " ".join(value.split())


def _text(table: Mapping[str, Any], key: str, where: str) -> str:
    return _fill(_raw_text(table, key, where))


def _id(table: Mapping[str, Any], where: str, seen: set[str]) -> str:
    value = table.get("id")
    if not isinstance(value, str) or not _ID.match(value):
        raise MaterialError(f"{where}: 'id' must be lower-case words joined by '-', got {value!r}")
    if value in seen:
        raise MaterialError(f"{where}: id {value!r} is used twice")
    seen.add(value)
    return value


def _items(doc: Mapping[str, Any], section: str, key: str) -> list[Mapping[str, Any]]:
    items = doc.get(section, {}).get(key)
    if not isinstance(items, list) or not items:
        raise MaterialError(f"the lesson file needs at least one [[{section}.{key}]]")
    return items


def _case(t: Mapping[str, Any], where: str, seen: set[str]) -> Case:
    case_id = _id(t, where, seen)
    kind = t.get("kind")
    if kind not in CASE_KINDS:
        raise MaterialError(f"{where}: 'kind' must be one of {', '.join(CASE_KINDS)}, got {kind!r}")
    story = _raw_text(t, "story", where)
    if kind == "tanh":
        x = t.get("preactivation")
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            raise MaterialError(f"{where}: 'preactivation' must be a finite number")
        return Case(case_id, kind, tell(story, preactivation=x), preactivation=float(x))
    v = t.get("classes")
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
        raise MaterialError(f"{where}: 'classes' must be a whole number of at least 2")
    if kind == "baseline":
        return Case(case_id, kind, tell(story, classes=v), classes=v)
    loss = t.get("loss")
    if isinstance(loss, bool) or not isinstance(loss, int | float) or not (0 <= loss < math.inf):
        raise MaterialError(f"{where}: 'loss' must be a finite number of at least 0")
    return Case(case_id, kind, tell(story, classes=v, loss=loss), classes=v, loss=float(loss))


def _drill_stories(doc: Mapping[str, Any]) -> dict[CaseKind, str]:
    table = doc.get("exercise", {}).get("drill", {})
    stories = {kind: _raw_text(table, kind, "[exercise.drill]") for kind in CASE_KINDS}
    for story in stories.values():
        tell(story, classes=2, loss=1.0, preactivation=1.0)  # every field must resolve
    return stories


DEFAULT_PATH = "lesson.toml"


def load(path: str | Path | None = None) -> Lesson:
    """Read and check the lesson file (the packaged one unless `path` is given), fields filled."""
    try:
        if path is None:
            raw = resources.files("nnvitals.study").joinpath(DEFAULT_PATH).read_text(encoding="utf-8")
        else:
            raw = Path(path).read_text(encoding="utf-8")
        doc = tomllib.loads(raw)
    except OSError as e:
        raise MaterialError(f"cannot read the lesson file: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise MaterialError(f"the lesson file is not valid TOML: {e}") from None

    seen: set[str] = set()
    questions = tuple(
        Question(_id(t, f"question {i}", seen), _text(t, "prompt", f"question {i}"),
                 _text(t, "answer", f"question {i}"))
        for i, t in enumerate(_items(doc, "practice", "questions"), 1)
    )
    cases = tuple(_case(t, f"case {i}", seen) for i, t in enumerate(_items(doc, "exercise", "cases"), 1))
    cards = tuple(
        Flashcard(_id(t, f"card {i}", seen), _text(t, "question", f"card {i}"),
                  _text(t, "answer", f"card {i}"))
        for i, t in enumerate(_items(doc, "flashcards", "cards"), 1)
    )
    return Lesson(
        title=_text(doc, "title", "the lesson"),
        practice_intro=_text(doc.get("practice", {}), "intro", "[practice]"),
        questions=questions,
        exercise_intro=_text(doc.get("exercise", {}), "intro", "[exercise]"),
        exercise_closing=_text(doc.get("exercise", {}), "closing", "[exercise]"),
        drill_intro=_text(doc.get("exercise", {}), "drill_intro", "[exercise]"),
        cases=cases,
        drill_stories=_drill_stories(doc),
        flashcards_intro=_text(doc.get("flashcards", {}), "intro", "[flashcards]"),
        cards=cards,
    )


@functools.cache
def packaged() -> Lesson:
    """The lesson shipped with nnvitals, read once per process."""
    return load()

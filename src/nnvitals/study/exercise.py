"""The diagnosis exercise: what to ask about a case, how close an answer must be, and the worked solution.

Expected values and verdicts are computed by nnvitals.numbers when a case is posed; the lesson file only
holds the inputs. `draw_cases` makes fresh cases so the arithmetic can be drilled past the fixed three.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from nnvitals import numbers
from nnvitals.study.material import CASE_KINDS, Case, CaseKind, tell

# Losses are quoted to two decimals in the lesson (ln 27 = 3.30), so an answer counts when it rounds the
# same way give or take one in the last place. The excess is a difference of two rounded numbers, so it
# gets a little more room. tanh values are quoted to three decimals (tanh 2 = 0.964).
LOSS_TOLERANCE = 0.01
EXCESS_TOLERANCE = 0.05
TANH_TOLERANCE = 0.005


@dataclass(frozen=True)
class Step:
    """One number the learner works out, with the tolerance it is checked against."""

    prompt: str
    expected: float
    tolerance: float
    shown: str  # the expected value as the solution prints it

    def check(self, answer: float) -> bool:
        # a hair of slack so that an answer exactly at the tolerance is not lost to float rounding
        return abs(answer - self.expected) <= self.tolerance + 1e-9


@dataclass(frozen=True)
class Problem:
    case: Case
    steps: tuple[Step, ...]
    solution: tuple[str, ...]  # the worked solution, one line per step of reasoning
    verdict: str  # the one-line conclusion


def parse_answer(text: str) -> float:
    """Read a learner's number: `3.3`, `3,30`, `-0.5`, or a percentage such as `7%` (= 0.07)."""
    s = text.strip().replace(" ", "")
    percent = s.endswith("%")
    if percent:
        s = s[:-1]
    if "," in s and "." not in s:
        s = s.replace(",", ".")
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a number; type one such as 3.30 or 7%") from None
    if not math.isfinite(value):
        raise ValueError(f"{text.strip()!r} is not a finite number")
    return value / 100 if percent else value


def pose(case: Case) -> Problem:
    """Turn a case's inputs into the steps to answer and the worked solution."""
    if case.kind == "start-loss":
        assert case.classes is not None and case.loss is not None
        return _start_loss(case, case.classes, case.loss)
    if case.kind == "baseline":
        assert case.classes is not None
        return _baseline(case, case.classes)
    assert case.preactivation is not None
    return _tanh(case, case.preactivation)


def _start_loss(case: Case, v: int, loss: float) -> Problem:
    base = numbers.baseline_loss(v)
    verdict = numbers.judge_start_loss(loss, v)
    side = "above" if verdict.excess >= 0 else "below"
    steps = (
        Step(f"Uniform baseline ln({v}), in nats (±{LOSS_TOLERANCE:g})", base, LOSS_TOLERANCE, f"{base:.4f}"),
        Step(f"Starting loss minus that baseline, in nats; negative if below (±{EXCESS_TOLERANCE:g})",
             verdict.excess, EXCESS_TOLERANCE, f"{verdict.excess:.4f}"),
    )
    solution = (
        f"A uniform guess over {v} classes costs -ln(1/{v}) = ln({v}) = {base:.4f} nats.",
        f"{loss:g} - {base:.4f} = {verdict.excess:.4f}: the start is {abs(verdict.excess):.2f} nats {side} "
        "the baseline.",
        f"The healthy band is ln(V) - {numbers.START_LOSS_LOW_MARGIN:g} to ln(V) + "
        f"{numbers.START_LOSS_HIGH_MARGIN:g} nats, here {base - numbers.START_LOSS_LOW_MARGIN:.2f} to "
        f"{base + numbers.START_LOSS_HIGH_MARGIN:.2f}.",
        verdict.message,
        f"Fix: {verdict.fix}",
    )
    return Problem(case, steps, solution, f"{verdict.status}: {loss:g} for {v} classes")


def _baseline(case: Case, v: int) -> Problem:
    base = numbers.baseline_loss(v)
    doubling = numbers.baseline_loss(2)
    low, high = base - numbers.START_LOSS_LOW_MARGIN, base + numbers.START_LOSS_HIGH_MARGIN
    steps = (Step(f"Expected starting loss ln({v}), in nats (±{LOSS_TOLERANCE:g})", base, LOSS_TOLERANCE,
                  f"{base:.4f}"),)
    solution = (
        f"An untrained model knows nothing, so it should guess uniformly: -ln(1/{v}) = ln({v}) = "
        f"{base:.4f} nats.",
        f"The baseline rises with the number of options: every doubling of the classes adds "
        f"ln 2 = {doubling:.2f} nats.",
        f"A measured start between {low:.2f} and {high:.2f} would be healthy for {v} classes.",
    )
    return Problem(case, steps, solution, f"expect a starting loss near {base:.2f} for {v} classes")


def _tanh(case: Case, x: float) -> Problem:
    g = numbers.tanh_gradient(x)
    pct = 100 * g.fraction_passed
    steps = (
        Step(f"tanh({x:g}) (±{TANH_TOLERANCE:g})", g.output, TANH_TOLERANCE, f"{g.output:.4f}"),
        Step(f"Local derivative 1 - tanh({x:g})², the share of gradient passed back, as a fraction or "
             f"with % (±{TANH_TOLERANCE:g})", g.local_derivative, TANH_TOLERANCE,
             f"{g.local_derivative:.4f}"),
    )
    t = abs(g.output)
    squared = f"({g.output:.4f})²" if g.output < 0 else f"{g.output:.4f}²"
    if t >= numbers.DEAD_CUT:
        state = (f"|tanh| is beyond {numbers.DEAD_CUT:g}, deep on the flat shoulder: a unit like this on "
                 "every example is dead")
    elif t >= numbers.SATURATION_CUT:
        state = f"|tanh| is beyond the {numbers.SATURATION_CUT:g} saturation cut: the unit is saturated"
    elif g.fraction_passed < 0.5:
        state = (f"|tanh| is still inside the {numbers.SATURATION_CUT:g} saturation cut, but the unit "
                 f"already loses {100 - pct:.0f}% of its gradient: growing numb on its way to saturation")
    else:
        state = "the unit sits in the responsive middle of tanh: most of the gradient flows through"
    solution = (
        f"tanh({x:g}) = {g.output:.4f}.",
        f"1 - tanh({x:g})² = 1 - {squared} = {g.local_derivative:.4f}.",
        f"Backprop multiplies the incoming gradient by that factor, so the unit passes back "
        f"{pct:.1f}% of it.",
        state[0].upper() + state[1:] + ".",
    )
    return Problem(case, steps, solution, f"passes back {pct:.1f}% of its gradient")


def draw_cases(count: int, stories: Mapping[CaseKind, str], rng: random.Random | None = None) -> list[Case]:
    """`count` fresh cases over all three kinds, with other class counts, losses and pre-activations.

    Class counts are drawn log-uniformly from 3 to 60000 (a handful of labels up to a GPT-2-sized
    vocabulary); starting losses land healthy, too high or too low; pre-activations span -4 to 4.
    """
    if count < 1:
        raise ValueError(f"the number of cases must be at least 1, got {count}")
    rng = rng or random.Random()
    kinds: list[CaseKind] = []
    while len(kinds) < count:
        batch = list(CASE_KINDS)
        rng.shuffle(batch)
        kinds.extend(batch)
    cases = []
    for i, kind in enumerate(kinds[:count], 1):
        case_id = f"drill-{i}"
        if kind == "tanh":
            x = 0.0
            while x in (0.0, 2.0):  # 0 is trivial, 2 is the fixed case
                x = round(rng.uniform(-4.0, 4.0), 1)
            cases.append(Case(case_id, kind, tell(stories[kind], preactivation=x), preactivation=x))
            continue
        v = 27
        while v in (27, 50):  # the fixed cases' class counts
            v = round(math.exp(rng.uniform(math.log(3), math.log(60000))))
        if kind == "baseline":
            cases.append(Case(case_id, kind, tell(stories[kind], classes=v), classes=v))
            continue
        base = numbers.baseline_loss(v)
        regime = rng.choices(["healthy", "too-high", "too-low"], weights=[2, 3, 1])[0]
        if regime == "healthy":
            loss = base + rng.uniform(-0.2, 0.45)
        elif regime == "too-high":
            loss = base + rng.uniform(1.0, 20.0)
        else:
            loss = base * rng.uniform(0.1, 0.7)
        loss = round(loss, 2)
        cases.append(Case(case_id, kind, tell(stories[kind], classes=v, loss=loss), classes=v, loss=loss))
    return cases

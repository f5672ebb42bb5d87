import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nnvitals import numbers


def test_lesson_figures():
    assert numbers.baseline_loss(27) == pytest.approx(3.2958, abs=1e-4)
    assert numbers.baseline_loss(50) == pytest.approx(3.91, abs=5e-3)
    t = numbers.tanh_gradient(2.0)
    assert t.output == pytest.approx(0.964, abs=5e-4)
    assert t.fraction_passed == pytest.approx(0.07, abs=1e-3)
    assert numbers.judge_start_loss(13.5, 27).status == "too-high"
    assert numbers.judge_start_loss(27.8817, 27).status == "too-high"
    # the lesson's fixed networks start at 3.3221 and 3.2870
    assert numbers.judge_start_loss(3.3221, 27).status == "healthy"
    assert numbers.judge_start_loss(3.2870, 27).status == "healthy"
    assert numbers.judge_start_loss(0.5, 27).status == "too-low"
    assert numbers.predicted_output_std(1000, 1.0, 1.0) == pytest.approx(31.62, abs=0.01)


@given(st.integers(min_value=2, max_value=10**9))
def test_baseline_is_log_and_grows_with_classes(v):
    b = numbers.baseline_loss(v)
    assert math.isclose(b, -math.log(1 / v), rel_tol=1e-12)
    assert numbers.baseline_loss(v + 1) > b
    assert numbers.judge_start_loss(b, v).status == "healthy"


@given(st.integers(min_value=2, max_value=100000), st.floats(min_value=0, max_value=1e6))
def test_verdict_is_consistent_with_its_band(v, loss):
    verdict = numbers.judge_start_loss(loss, v)
    assert verdict.baseline == numbers.baseline_loss(v)
    assert verdict.excess == pytest.approx(loss - verdict.baseline)
    expected = (
        "too-high" if verdict.excess > numbers.START_LOSS_HIGH_MARGIN
        else "too-low" if verdict.excess < -numbers.START_LOSS_LOW_MARGIN
        else "healthy"
    )
    assert verdict.status == expected
    assert verdict.message and verdict.fix


def test_small_logit_spread_costs_about_half_its_square():
    # Empirical check of the band's rationale: logits with std s cost about s^2/2 over ln(V).
    g = torch.Generator().manual_seed(0)
    v = 27
    for s in (0.1, 0.3, 0.6):
        logits = torch.randn(200000, v, generator=g) * s
        targets = torch.randint(0, v, (200000,), generator=g)
        excess = torch.nn.functional.cross_entropy(logits, targets).item() - numbers.baseline_loss(v)
        assert excess == pytest.approx(numbers.logit_spread_excess(s) * (1 - 1 / v), rel=0.1, abs=2e-3)


@given(st.floats(min_value=-20, max_value=20))
def test_tanh_gradient_matches_autograd(x):
    t = numbers.tanh_gradient(x)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.tanh(xt).backward()
    assert t.output == pytest.approx(math.tanh(x))
    assert t.local_derivative == pytest.approx(xt.grad.item(), abs=1e-12)
    assert 0.0 <= t.fraction_passed <= 1.0


@pytest.mark.parametrize("name", ["linear", "conv2d", "sigmoid", "tanh", "relu", "selu", "leaky_relu"])
def test_gain_agrees_with_torch(name):
    assert numbers.gain(name) == pytest.approx(torch.nn.init.calculate_gain(name))
    if name == "leaky_relu":
        assert numbers.gain(name, 0.2) == pytest.approx(torch.nn.init.calculate_gain(name, 0.2))


def test_fan_in_scale_keeps_unit_spread():
    assert numbers.fan_in_scale(30, "tanh") == pytest.approx((5 / 3) / math.sqrt(30))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 1000, generator=g) * numbers.fan_in_scale(1000, "linear")
    x = torch.randn(500, 1000, generator=g)
    assert (x @ w).std().item() == pytest.approx(1.0, abs=0.02)
    assert (x @ (w * math.sqrt(1000))).std().item() == pytest.approx(
        numbers.predicted_output_std(1000, 1.0, 1.0), rel=0.02)


@pytest.mark.parametrize("bad", [1, 0, -3])
def test_bad_class_counts(bad):
    with pytest.raises(ValueError):
        numbers.baseline_loss(bad)


def test_bad_values():
    with pytest.raises(ValueError):
        numbers.judge_start_loss(float("nan"), 27)
    with pytest.raises(ValueError):
        numbers.judge_start_loss(-1.0, 27)
    with pytest.raises(ValueError):
        numbers.tanh_gradient(float("inf"))
    with pytest.raises(ValueError):
        numbers.gain("swishy")


def test_sigmoid_cut_matches_tanh_cut():
    lo, hi = numbers.saturation_cut_for("sigmoid")
    x = math.atanh(numbers.SATURATION_CUT) * 2  # sigmoid(x) = (1 + tanh(x/2)) / 2
    assert 1 / (1 + math.exp(-x)) == pytest.approx(hi)
    assert lo == pytest.approx(1 - hi)


def test_numbers_does_not_import_torch():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(numbers))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported

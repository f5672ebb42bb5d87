"""Each finding code fires on a model built to have that problem, and never on the healthy ones."""

import pytest
import torch
from torch import nn

import nnvitals
from nnvitals.checks import CODES
from nnvitals.examples import EXAMPLES

from . import models as M


def codes(report):
    return {f.code for f in report.findings}


def serious(report):
    return [f for f in report.findings if f.severity in ("warning", "error")]


@pytest.mark.parametrize("make", [M.healthy_cnn, M.healthy_transformer, M.healthy_deep_tanh],
                         ids=["cnn-batchnorm", "transformer", "deep-tanh-kaiming-batchnorm"])
def test_healthy_models_get_no_warning(make):
    model, x, y = make()
    report = nnvitals.check(model, x, y, lr=0.1)
    assert serious(report) == [], [f.message for f in serious(report)]
    assert report.ok
    assert report.layers, "the doctor saw no layers"


def test_every_finding_has_the_documented_fields():
    model, x, y = EXAMPLES["makemore-naive"]()
    for f in nnvitals.check(model, x, y).findings:
        assert f.code in CODES
        assert f.severity in ("info", "warning", "error")
        assert f.where and f.message and f.fix and isinstance(f.evidence, dict)


def test_start_loss_high_with_a_computed_fix():
    model, x, y = EXAMPLES["makemore-naive"]()
    report = nnvitals.check(model, x, y)
    f = next(f for f in report.findings if f.code == "start-loss-high")
    assert f.severity == "error"
    assert report.loss > 15 and f.evidence["baseline"] == pytest.approx(3.2958, abs=1e-4)
    assert "multiply `W2` by 0.01 and zero `b2`" in f.fix
    # the predicted starting loss after the fix is measured, and is near the baseline
    after = float(f.fix.split("starting loss ")[1].split("-> ")[1].split(" ")[0])
    assert after == pytest.approx(3.30, abs=0.1)
    fixed, x, y = EXAMPLES["makemore-fixed"]()
    assert "start-loss-high" not in codes(nnvitals.check(fixed, x, y))


def test_start_loss_low_when_the_target_leaks():
    x, y = M.features(classes=10)
    x = torch.cat([y[:, None], torch.zeros(32, 1, dtype=torch.long)], 1)
    report = nnvitals.check(M.LeakyTarget(), x, y)
    assert "start-loss-low" in codes(report)
    # a trained model is not judged against the baseline
    assert "start-loss-low" not in codes(nnvitals.check(M.LeakyTarget(), x, y, at_init=False))


def test_saturation_named_with_the_kaiming_fix():
    model, x, y = EXAMPLES["deep-tanh-unscaled"]()
    report = nnvitals.check(model, x, y)
    sat = [f for f in report.findings if f.code == "saturated-activations"]
    assert {f.where for f in sat} == {"3", "5", "7", "9", "11"}
    second = next(f for f in sat if f.where == "5")
    assert "scale `4.weight` by" in second.fix and "5/3/sqrt(100)" in second.fix
    assert second.evidence["saturated"] > 0.5


def test_function_activations_are_layers_named_by_module_and_call_site():
    x, _ = M.features()
    y = torch.randint(0, 10, (32,))
    report = nnvitals.check(M.FunctionalTanh(w_std=3.0), x, y)
    layer = next(lay for lay in report.layers if lay.kind == "tanh")
    assert layer.name == "tanh()" and layer.op == "torch.tanh"
    assert layer.site and layer.site.startswith("models.py:")
    f = next(f for f in report.findings if f.code == "saturated-activations")
    assert "fc1.weight" in f.fix
    healthy = nnvitals.check(M.FunctionalTanh(w_std=(5 / 3) / 20 ** 0.5), x, y)
    assert "saturated-activations" not in codes(healthy)


def test_dead_units_counts_tanh_and_relu_units():
    x, y = M.features()
    report = nnvitals.check(M.DeadUnits(), x, y)
    dead = {f.where: f.evidence["dead"] for f in report.findings if f.code == "dead-units"}
    assert dead == {"act1": 5, "act2": 3}
    tanh_layer = next(lay for lay in report.layers if lay.name == "act1")
    assert tanh_layer.sat_map is not None and tanh_layer.sat_map[:, :5].all()


@pytest.mark.parametrize("std, word", [(1.0, "grows"), (0.01, "shrinks")])
def test_activation_scale_through_depth(std, word):
    model = M.mlp([100] * 6, act=nn.ReLU, weight_std=lambda fan_in: std, bias=False)
    x, y = M.features(dim=100)
    report = nnvitals.check(model, x, y)
    f = next(f for f in report.findings if f.code == "activation-scale")
    assert word in f.message and "0.weight" in f.fix and "sqrt(2)/sqrt(100)" in f.fix
    kaiming = M.mlp([100] * 6, act=nn.ReLU, weight_std=lambda fan_in: 2 ** 0.5 / fan_in ** 0.5, bias=False)
    assert "activation-scale" not in codes(nnvitals.check(kaiming, x, y))


def test_vanishing_gradients_in_a_deep_sigmoid_stack():
    model = M.mlp([64] * 12, act=nn.Sigmoid, weight_std=lambda fan_in: 1 / fan_in ** 0.5)
    x, y = M.features(dim=64)
    assert "vanishing-gradients" in codes(nnvitals.check(model, x, y))


def test_exploding_gradients_in_a_deep_unscaled_tanh_stack():
    model = M.mlp([30] + [100] * 9, act=nn.Tanh, weight_std=lambda fan_in: 1.0)
    x, y = M.features(dim=30)
    report = nnvitals.check(model, x, y)
    assert "exploding-gradients" in codes(report)
    assert "vanishing-gradients" not in codes(report)


@pytest.mark.parametrize("lr, word", [(50.0, "too large"), (1e-6, "too small")])
def test_update_ratio_with_lr(lr, word):
    model, x, y = M.healthy_deep_tanh()
    report = nnvitals.check(model, x, y, lr=lr)
    found = [f for f in report.findings if f.code == "update-ratio"]
    assert found and all(word in f.message for f in found)
    assert "update-ratio" not in codes(nnvitals.check(model, x, y, lr=0.1))


def test_bias_before_batchnorm_is_info():
    model = M.mlp([20, 50], norm=True, bias=True)
    x, y = M.features()
    report = nnvitals.check(model, x, y)
    f = next(f for f in report.findings if f.code == "bias-before-norm")
    assert f.severity == "info" and f.where == "0.bias" and "bias=False" in f.fix
    assert report.ok  # info alone is not a problem
    assert "bias-before-norm" not in codes(nnvitals.check(M.mlp([20, 50], norm=True, bias=False), x, y))


def test_batchnorm_in_eval_mode_during_training():
    model, x, y = M.healthy_deep_tanh()
    model.layers[4].eval()
    f = next(f for f in nnvitals.check(model, x, y).findings if f.code == "train-eval-mode")
    assert f.where == "layers.4" and f.evidence["modules"] == ["layers.4"]
    assert "model.train()" in f.fix


def test_batchnorm_small_batch():
    model, x, y = M.healthy_deep_tanh()
    f = next(f for f in nnvitals.check(model, x[:4], y[:4]).findings if f.code == "batchnorm-small-batch")
    assert f.evidence["batch"] == 4


def test_nonfinite_forward_names_the_module():
    x, y = M.features()
    report = nnvitals.check(M.nan_forward_model(), x, y)
    f = next(f for f in report.findings if f.code == "nonfinite")
    assert f.where == "2" and f.severity == "error" and "forward" in f.message


def test_nonfinite_backward_names_where_the_gradient_broke():
    x, y = M.features()
    report = nnvitals.check(M.ZeroThenSqrt(), x, y)
    f = next(f for f in report.findings if f.code == "nonfinite")
    assert f.where == "gate" and f.evidence["pass"] == "backward"


def test_nonfinite_input_is_blamed_on_the_input():
    model = M.mlp([20, 30])
    x, y = M.features()
    x[3, 4] = float("nan")
    f = next(f for f in nnvitals.check(model, x, y).findings if f.code == "nonfinite")
    assert f.where == "input"


def test_report_serialises_and_draws(tmp_path):
    import json

    model, x, y = EXAMPLES["makemore-naive"]()
    report = nnvitals.check(model, x, y)
    tanh = report.layers[0]
    # saturated units sit at exactly +-1.0: inside the histogram's range, in its end bins
    assert tanh.hist_outside == (0.0, 0.0) and sum(tanh.hist) == 32 * 200
    assert tanh.hist[0] + tanh.hist[-1] > 0.5 * 32 * 200
    data = json.loads(report.to_json())
    assert data["findings"][0]["code"] in CODES and data["layers"][0]["saturated"] > 0.5
    paths = report.save_plots(tmp_path)
    assert {p.name for p in paths} == {"activations.png", "gradients.png", "saturation.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    page = report._repr_html_()
    assert "start-loss-high" in page and page.count("data:image/png;base64,") == 3

"""check() leaves the model exactly as it found it, also when the model raises."""

import pytest
import torch
from torch import nn

import nnvitals
from nnvitals import probes

from . import models as M


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()})


def same(a, b):
    sd_a, g_a, mode_a = a
    sd_b, g_b, mode_b = b
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        assert (g_a[k] is None) == (g_b[k] is None) and (g_a[k] is None or torch.equal(g_a[k], g_b[k]))
    assert mode_a == mode_b


def no_hooks(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert not torch.overrides._get_current_function_mode_stack()


def test_state_grads_modes_and_rng_unchanged():
    model, x, y = M.healthy_transformer()  # BatchNorm-free but with Dropout (uses the RNG)
    cnn, cx, cy = M.healthy_cnn()  # BatchNorm running statistics
    for m, inp, tgt in ((model, x, y), (cnn, cx, cy)):
        # existing gradients from an earlier backward, and a mixed mode to restore
        nn.functional.cross_entropy(m(inp), tgt).backward()
        list(m.modules())[-1].eval()
        before = snapshot(m)
        rng = torch.get_rng_state()
        report = nnvitals.check(m, inp, tgt)
        assert report.layers
        same(before, snapshot(m))
        assert torch.equal(rng, torch.get_rng_state())
        no_hooks(m)


def test_running_statistics_untouched_but_measured():
    model, x, y = M.healthy_cnn()
    bn = model[1]
    mean = bn.running_mean.clone()
    tracked = bn.num_batches_tracked.clone()
    nnvitals.check(model, x, y)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.num_batches_tracked, tracked)


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        torch.tanh(self.fc(x))
        raise RuntimeError("boom")


def test_hooks_removed_and_state_restored_when_the_model_raises():
    model = Boom()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        nnvitals.check(model, torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    no_hooks(model)
    same(before, snapshot(model))
    # torch functions work normally afterwards (no watcher left active)
    assert torch.tanh(torch.zeros(1)).item() == 0.0


def test_hooks_removed_when_the_loss_raises():
    model = M.mlp([20, 30])
    x, y = M.features()

    def bad_loss(out, targets):
        raise ValueError("bad loss")

    with pytest.raises(ValueError):
        nnvitals.check(model, x, y, bad_loss)
    no_hooks(model)


def test_inputs_as_tuple_and_dict_and_custom_loss():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 3)
            self.b = nn.Linear(5, 3)

        def forward(self, x, z):
            return torch.relu(self.a(x)) + self.b(z)

    model = Two()
    x, z = torch.randn(16, 5), torch.randn(16, 5)
    target = torch.randn(16, 3)
    r1 = nnvitals.check(model, (x, z), target, nn.functional.mse_loss)
    r2 = nnvitals.check(model, {"x": x, "z": z}, target, nn.functional.mse_loss)
    assert r1.loss == pytest.approx(r2.loss)
    assert r1.classes is None  # a regression loss is not judged against ln(V)
    assert [lay.name for lay in r1.layers] == ["a", "relu()", "b"]


@pytest.mark.parametrize("stack_limit", [probes.STACK_LIMIT, 1], ids=["copied", "reduced-as-it-comes"])
def test_in_place_relu_after_a_convolution(stack_limit, monkeypatch):
    """torchvision-style blocks: the conv's output is overwritten by ReLU(inplace=True); its statistics are
    those of the conv output as it was (copied when small, reduced in the hook when large), and the
    training step is unchanged."""
    monkeypatch.setattr(probes, "STACK_LIMIT", stack_limit)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    report = nnvitals.check(model, x, y)
    conv = next(lay for lay in report.layers if lay.name == "0")
    with torch.no_grad():
        raw = model[0](x)
    assert conv.mean == pytest.approx(raw.mean().item(), abs=1e-5)  # before the ReLU, negative values and all
    assert conv.std == pytest.approx(raw.std().item(), rel=1e-4)
    relu = next(lay for lay in report.layers if lay.name == "1")
    assert relu.inactive == pytest.approx((raw <= 0).float().mean().item())


def test_a_model_returning_a_dict_needs_a_loss_function():
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.fc(x)}

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(TypeError, match="loss_fn"):
        nnvitals.check(Named(), x, y)
    report = nnvitals.check(Named(), x, y, lambda out, t: nn.functional.cross_entropy(out["logits"], t))
    assert report.loss > 0 and report.layers

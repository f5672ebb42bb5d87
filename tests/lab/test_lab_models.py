import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnvitals.lab import data, models
from nnvitals.numbers import baseline_loss


def start_loss(stage: str, splits: data.Splits, seed: int = 2147483647) -> float:
    g = torch.Generator().manual_seed(seed)
    model = models.build(stage, splits.vocab.size, g).train()
    ix = torch.randint(0, len(splits.train), (32,), generator=g)
    with torch.no_grad():
        return float(F.cross_entropy(model(splits.train.X[ix]), splits.train.Y[ix]))


def test_naive_starts_far_above_the_baseline_and_the_fixed_stages_near_it(words27):
    splits = data.split(words27)
    base = baseline_loss(27)
    assert start_loss("naive", splits) > base + 10
    for stage in ("fix-softmax", "fix-tanh", "kaiming", "batchnorm", "deep"):
        assert abs(start_loss(stage, splits) - base) < 0.1, stage


def test_parameter_counts_match_the_lesson():
    g = torch.Generator().manual_seed(1)
    counts = {s: models.count_parameters(models.build(s, 27, g)) for s in models.STAGE_NAMES}
    assert counts["naive"] == counts["kaiming"] == 11_897
    assert counts["batchnorm"] == 12_097
    assert counts["deep"] == 47_024


def test_every_stage_draws_the_same_tensors_and_only_scales_them():
    def build(stage):
        return models.build(stage, 27, torch.Generator().manual_seed(7))

    naive, fix_tanh, kaiming, bn = build("naive"), build("fix-tanh"), build("kaiming"), build("batchnorm")
    assert torch.equal(naive.C, kaiming.C)
    assert torch.allclose(fix_tanh.W1, naive.W1 * 0.2)
    assert torch.allclose(kaiming.W1, naive.W1 * (5 / 3) / math.sqrt(30))
    assert torch.allclose(kaiming.W2, naive.W2 * 0.01) and not kaiming.b2.any()
    # BatchNorm's b1 is drawn (so W2 comes out the same) but not used
    assert bn.b1 is None and torch.equal(bn.W2, kaiming.W2)


def test_the_weights_come_first_then_the_minibatches_from_one_generator():
    g = torch.Generator().manual_seed(3)
    models.build("kaiming", 27, g)
    after = torch.randint(0, 1000, (32,), generator=g)
    g2 = torch.Generator().manual_seed(3)
    for shape in ((27, 10), (30, 200), (200,), (200, 27), (27,)):
        torch.randn(shape, generator=g2)
    assert torch.equal(after, torch.randint(0, 1000, (32,), generator=g2))


def test_deep_net_uses_torch_batchnorm_and_a_shy_last_layer():
    model = models.build("deep", 27, torch.Generator().manual_seed(0))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 6 and sum(isinstance(m, nn.Tanh) for m in model.modules()) == 5
    assert torch.allclose(norms[-1].weight, torch.full((27,), 0.1))
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert first.bias is None and first.weight.shape == (100, 30)
    assert abs(float(first.weight.detach().std()) - 1 / math.sqrt(30)) < 0.02


@pytest.mark.parametrize("training", [True, False])
def test_handwritten_batchnorm_equals_torch_batchnorm1d(training):
    torch.manual_seed(0)
    ours = models.BatchNorm(50, momentum=0.1, eps=1e-5, unbiased=False)
    theirs = nn.BatchNorm1d(50, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        ours.bias.copy_(theirs.bias.normal_())
        ours.gain.copy_(theirs.weight.uniform_(0.5, 1.5))
    for _ in range(3):  # a few training steps move the running statistics the same way
        x = torch.randn(32, 50) * 3 + 1
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    # torch keeps the running variance, the lesson the running std: give both the same statistics
    with torch.no_grad():
        ours.running_std.copy_((theirs.running_var + 1e-5).sqrt())
    ours.train(training)
    theirs.train(training)
    x = torch.randn(32, 50, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(ours(x), theirs(x2))
    ours(x).pow(2).sum().backward()
    theirs(x2).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ours.gain.grad, theirs.weight.grad)


def test_lesson_batchnorm_divides_by_the_sample_std_and_tracks_it_slowly():
    bn = models.BatchNorm(4)
    x = torch.randn(32, 4) * 5 + 2
    y = bn(x)
    torch.testing.assert_close(y, (x - x.mean(0)) / x.std(0))
    torch.testing.assert_close(bn.running_std, 0.999 * torch.ones(4) + 0.001 * x.std(0))
    bn.eval()
    torch.testing.assert_close(bn(x), (x - bn.running_mean) / bn.running_std)


@pytest.mark.parametrize("stage", ["batchnorm", "deep"])
def test_calibration_puts_the_whole_split_statistics_in_the_buffers(stage, words27):
    splits = data.split(words27)
    model = models.build(stage, 27, torch.Generator().manual_seed(0))
    X = splits.train.X
    models.calibrate(model, X)
    assert not model.training
    first_norm = models.norms(model)[0]
    with torch.no_grad():
        if stage == "batchnorm":
            pre = model.C[X].flatten(1) @ model.W1
            torch.testing.assert_close(first_norm.running_std, pre.std(0))
        else:
            pre = model.layers[0](model.embedding(X).flatten(1))
            torch.testing.assert_close(first_norm.running_var, pre.var(0))
        torch.testing.assert_close(first_norm.running_mean, pre.mean(0))
    assert first_norm.momentum is not None  # training settings come back


@pytest.mark.parametrize(("unbiased", "eps"), [(True, 0.0), (False, 1e-5)])
def test_handwritten_batchnorm_backward_matches_the_numerical_gradient(unbiased, eps):
    bn = models.BatchNorm(5, unbiased=unbiased, eps=eps).double()
    with torch.no_grad():
        bn.gain.uniform_(0.5, 2.0)
    x = (torch.randn(8, 5, dtype=torch.float64) * 3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: bn(t), (x,))

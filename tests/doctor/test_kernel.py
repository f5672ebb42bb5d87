"""The compiled CPU kernel measures what the torch-op reductions measure (they stay the path for GPUs)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnvitals
from nnvitals import probes


def test_the_kernel_is_built():
    # `pip install -e .` compiles it (gcc is part of the test set-up); without it every sampled step on the
    # CPU would quietly cost several times more; and its C++ lender (g++ is part of the set-up too), without which
    # the forward of a sampled step costs some 40 us more on the lesson's network
    assert probes._kernel is not None
    assert probes._keep_grad is not None and probes._kernel.borrow(True)


def test_a_layout_that_does_not_fit_its_block_is_refused():
    layout = probes._Layout()
    alive = 3 + probes.HIST_BINS + 2  # after the histogram's slots
    layout.add(10, mode="tanh", o_sum=0, o_sq=1, shape=(2, 5, 1), o_flag=2, o_hist=3, o_alive=alive,
               hist_range=(-1.0, 1.0))
    layout.size = alive + 4  # the 5 alive flags would run past it
    with pytest.raises(ValueError, match="does not fit"):
        layout.run([torch.zeros(2, 5)])
    layout.size = alive + 5
    block, _ = layout.run([torch.zeros(2, 5)])
    assert block[alive:].tolist() == [1.0] * 5  # zeros: not saturated, so every unit is alive


def _passes(make_model, x, y, *, kernel: bool, monkeypatch, steps: int = 2, chained: bool = False):
    """`chained`: as Monitor(every=1) does, each collect also takes the next step's weights' copy (on the CPU in
    the kernel pass that measures the updates)."""
    monkeypatch.setattr(probes, "_kernel", probes._kernel if kernel else None)
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = probes.Recorder(model)
    found = []
    before = None
    for _ in range(steps):
        rec.attach()
        before = before if chained and before is not None else rec.snapshot_params()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        found.append(rec.collect(before=before, snapshot=chained).stats())
        before = rec.snapshot
        rec.detach()
    monkeypatch.undo()
    return found


def _same(a, b, where):
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isinf(a):
            assert a == b or (math.isnan(a) and math.isnan(b)), where
        else:  # the kernel sums in float32 blocks added in double, torch in its own order
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        if where.endswith("grad_hist"):
            # bins in units of the gradient's own std, which the two paths round differently in its last bit:
            # a value sitting on a bin edge may land one bin over
            assert sum(a) == sum(b) and max(abs(u - v) for u, v in zip(a, b, strict=True)) <= 2, where
        else:
            for k, (u, v) in enumerate(zip(a, b, strict=True)):
                _same(u, v, f"{where}[{k}]")
    else:
        assert a == b, where


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.tanh(F.relu(self.bn(self.conv(x)))).flatten(1))


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.norm, self.out = nn.Embedding(27, 16), nn.LayerNorm(16), nn.Linear(16, 27)

    def forward(self, t):
        return self.out(F.gelu(self.norm(self.emb(t)))).transpose(1, 2)


def _deep_tanh():
    layers = [m for i in range(6) for m in (nn.Linear(30 if i == 0 else 100, 100, bias=False), nn.BatchNorm1d(100),
                                            nn.Tanh())]
    return nn.Sequential(*layers, nn.Linear(100, 27))


CASES = {
    # tanh layers stacked by shape, saturation maps, BatchNorm, updates of bias-free weights
    "deep-tanh": (_deep_tanh,
                  lambda g: (torch.randn(32, 30, generator=g) * 3, torch.randint(0, 27, (32,), generator=g))),
    # sigmoid and ReLU, 300 units (more than a saturation map keeps), biases
    "sigmoid-relu": (lambda: nn.Sequential(nn.Linear(30, 300), nn.Sigmoid(), nn.Linear(300, 64), nn.ReLU(),
                                           nn.Linear(64, 27)),
                     lambda g: (torch.randn(80, 30, generator=g) * 4, torch.randint(0, 27, (80,), generator=g))),
    # channels as units (outer x units x inner layout), activations called as functions
    "conv": (_Conv, lambda g: (torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))),
    # a layer of STACK_LIMIT values and more: reduced as it comes, its gradient in backward
    "wide": (lambda: nn.Sequential(nn.Linear(30, 4096), nn.Tanh(), nn.Linear(4096, 27)),
             lambda g: (torch.randn(32, 30, generator=g), torch.randint(0, 27, (32,), generator=g))),
    # 3-D outputs, a non-contiguous model output, GELU (no histogram), an embedding
    "tokens": (_Tokens,
               lambda g: (torch.randint(0, 27, (8, 12), generator=g), torch.randint(0, 27, (8, 12), generator=g))),
}


@pytest.mark.parametrize("chained", [False, True], ids=["snapshot-each-step", "snapshot-in-collect"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_and_torch_ops_measure_the_same(case, chained, monkeypatch):
    make_model, make_data = CASES[case]
    x, y = make_data(torch.Generator().manual_seed(1))
    fast = _passes(make_model, x, y, kernel=True, monkeypatch=monkeypatch, steps=3, chained=chained)
    slow = _passes(make_model, x, y, kernel=False, monkeypatch=monkeypatch, steps=3, chained=chained)
    # every step's updates measured (momentum: each differs from -lr x gradient)
    assert all(p.update_ratio is not None for a in fast for p in a.params if len(p.shape) >= 2)
    for a, b in zip(fast, slow, strict=True):
        assert [lay.name for lay in a.layers] == [lay.name for lay in b.layers]
        for la, lb in zip(a.layers, b.layers, strict=True):
            for key, value in la.__dict__.items():
                _same(value, lb.__dict__[key], f"{case}: {la.name}.{key}")
        for pa, pb in zip(a.params, b.params, strict=True):
            for key, value in pa.__dict__.items():
                _same(value, pb.__dict__[key], f"{case}: {pa.name}.{key}")
    # the saturation maps were compared too (cell by cell), not skipped for want of one
    assert all(lay.sat_map is not None for lay in fast[-1].layers if lay.kind in ("tanh", "sigmoid"))


def test_the_kernel_sees_nan_and_infinity_as_torch_does(monkeypatch):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    x = torch.randn(16, 4)
    x[3, 1] = float("nan")
    x[5, 0] = float("inf")
    reports = {}
    for kernel in (True, False):
        monkeypatch.setattr(probes, "_kernel", probes._kernel if kernel else None)
        reports[kernel] = nnvitals.check(model(), x, torch.randint(0, 3, (16,)))
        monkeypatch.undo()
    for report in reports.values():
        assert [f.where for f in report.findings if f.code == "nonfinite"] == ["input"]
    fast, slow = (reports[k].stats.layers for k in (True, False))
    for la, lb in zip(fast, slow, strict=True):
        assert (la.nonfinite, la.hist, la.hist_outside, la.saturated, la.dead) == \
               (lb.nonfinite, lb.hist, lb.hist_outside, lb.saturated, lb.dead), la.name


def test_a_half_precision_model_is_measured_in_float32(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(torch.bfloat16)
    x = torch.randn(32, 8, dtype=torch.bfloat16)
    report = nnvitals.check(model, x, torch.randint(0, 4, (32,)))
    tanh = next(lay for lay in report.stats.layers if lay.kind == "tanh")
    expected = torch.tanh(model[0](x)).float()
    assert tanh.mean == pytest.approx(expected.mean().item(), abs=1e-3)
    assert tanh.std == pytest.approx(expected.std().item(), rel=1e-3)
    assert sum(tanh.hist) + sum(tanh.hist_outside) == expected.numel()


def test_a_snapshot_the_other_path_took_measures_no_update_and_reads_the_rest_right(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    rec = probes.Recorder(model)
    rec.attach()
    before = rec.snapshot_params()  # the kernel's block
    F.cross_entropy(model(x), y).backward()
    monkeypatch.setattr(probes, "_kernel", None)  # ...collected by the torch ops, which need per-weight copies
    stats = rec.collect(before=before).stats()
    rec.detach()
    assert [p.update_ratio for p in stats.params] == [None] * 4
    weight = model[0].weight
    assert stats.params[0].std == pytest.approx(weight.std().item(), rel=1e-5)
    assert stats.params[0].grad_std == pytest.approx(weight.grad.std().item(), rel=1e-5)

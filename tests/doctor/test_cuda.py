"""On a CUDA GPU (skipped without one): the statistics are the CPU's, and no step waits for the GPU.

The CPU path reduces with the compiled kernel (or torch ops without it); on a GPU the same slots are filled by
torch ops on the device, and the numbers come to the host in one transfer per sampled step, waited for only
when they are read.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import nnvitals

from . import models as M

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def train(model, device, steps, every=1):
    """`steps` SGD steps on the same batches on either device; the Monitor's history."""
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(7)
    with nnvitals.Monitor(model, every=every) as mon:
        for _ in range(steps):
            x, y = torch.randint(0, 27, (64, 3), generator=g), torch.randint(0, 27, (64,), generator=g)
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
    return mon


@pytest.mark.parametrize("name", ["deep-tanh-batchnorm", "makemore-naive", "deep-tanh-unscaled"])
def test_a_run_on_the_gpu_is_measured_as_on_the_cpu(name):
    from nnvitals.examples import EXAMPLES

    model, _, _ = EXAMPLES[name]()
    on_cpu, on_gpu = train(copy.deepcopy(model), "cpu", 3), train(model, "cuda", 3)
    assert len(on_cpu.history) == len(on_gpu.history) == 3
    # the first step, from the same weights (later ones drift apart by rounding, fast in an unscaled deep net)
    for cpu_row, gpu_row in zip(on_cpu.history[:1], on_gpu.history[:1], strict=True):
        assert cpu_row["layers"].keys() == gpu_row["layers"].keys()
        for layer, want in cpu_row["layers"].items():
            got = gpu_row["layers"][layer]
            assert got["mean"] == pytest.approx(want["mean"], rel=1e-3, abs=1e-4), layer
            assert got["std"] == pytest.approx(want["std"], rel=1e-3), layer
            assert got["grad_std"] == pytest.approx(want["grad_std"], rel=1e-2), layer
            if want["saturated"] is not None:  # a value on the cut may land either side: a few in 64 x units
                assert got["saturated"] == pytest.approx(want["saturated"], abs=2e-3), layer
                assert got["dead"] == want["dead"], layer
        for param, want in cpu_row["params"].items():
            got = gpu_row["params"][param]
            assert (got["update_ratio"] is None) == (want["update_ratio"] is None), param
            if want["update_ratio"] is not None:  # log10 of a ratio
                assert got["update_ratio"] == pytest.approx(want["update_ratio"], abs=0.01), param
            assert got["grad_to_weight"] == pytest.approx(want["grad_to_weight"], rel=1e-2), param
    assert [f.code for f in on_cpu.findings()] == [f.code for f in on_gpu.findings()]
    assert on_cpu.findings() or name == "deep-tanh-batchnorm"  # the two sick examples are found sick


def test_check_on_the_gpu_finds_what_it_finds_on_the_cpu():
    model, x, y = M.healthy_deep_tanh()
    on_cpu = nnvitals.check(copy.deepcopy(model), x, y)
    on_gpu = nnvitals.check(model.cuda(), x.cuda(), y.cuda())
    assert [(f.code, f.where) for f in on_cpu.findings] == [(f.code, f.where) for f in on_gpu.findings]
    for a, b in zip(on_cpu.layers, on_gpu.layers, strict=True):
        assert (a.name, a.shape) == (b.name, b.shape)
        assert b.std == pytest.approx(a.std, rel=1e-3)
        assert sum(b.hist) + sum(b.hist_outside) == sum(a.hist) + sum(a.hist_outside)
    assert next(model.parameters()).is_cuda  # check leaves the model where it was


def test_no_step_waits_for_the_gpu_and_the_numbers_arrive_when_read():
    """No host sync per layer, nor per sampled step: a sampled step's numbers are copied to the host behind the
    step's own work and waited for only when read. CUDA's sync debug mode warns at each synchronizing call."""
    from nnvitals.examples import EXAMPLES

    model = EXAMPLES["deep-tanh-batchnorm"]()[0].cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randint(0, 27, (64, 3), device="cuda"), torch.randint(0, 27, (64,), device="cuda")
    syncs = []
    with nnvitals.Monitor(model, every=3) as mon:
        for _ in range(9):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(loss)
            torch.cuda.set_sync_debug_mode("default")
            syncs.append(sum("synchronizing" in str(w.message) for w in caught))
    assert syncs[3:] == [0, 0, 0] * 2, syncs  # after the first cycle (which learns the layers)
    rows = mon.history
    assert [row["step"] for row in rows] == [0, 3, 6]
    assert all(layer["std"] > 0 for row in rows for layer in row["layers"].values())
    assert rows[-1]["loss"] < rows[0]["loss"]  # the same batch nine times: read after the copies arrived

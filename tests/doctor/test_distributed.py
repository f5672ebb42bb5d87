"""Monitor under torch.distributed: two CPU processes (gloo) measure what one process would on the
whole batch, with one collective per sampled step and none in between."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import nnvitals

WORLD, BATCH = 2, 32


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 6))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 12, generator=g) * 3, torch.randint(0, 6, (BATCH,), generator=g)


def run(model, x, y, every, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nnvitals.Monitor(model, every=every) as mon:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
    return mon


def worker(rank, init_file, out_file, every, steps):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    calls = []
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(1)
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted  # DDP's own gradient sync runs in C++ and is not counted
    model = nn.parallel.DistributedDataParallel(make_model())
    x, y = batch()
    share = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    mon = run(model, x[share], y[share], every, steps)
    plots = mon.save_plots(f"{out_file}.plots{rank}")  # pictures from rank 0 only
    layers = [lay.to_dict() for lay in mon.report().layers]
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump({"layers": layers, "calls": len(calls), "rows": len(mon.history), "plots": len(plots)}, f)
    dist.destroy_process_group()


def distributed_run(tmp_path, every, steps):
    out = tmp_path / "rank0.json"
    mp.spawn(worker, args=(str(tmp_path / "init"), str(out), every, steps), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank0.json.{r}").read_text()) for r in range(WORLD)]
    assert ranks[0]["plots"] >= 3 and ranks[1]["plots"] == 0
    assert ranks[1]["layers"] == ranks[0]["layers"]  # every rank reports the whole batch
    return ranks[0]


def test_rank0_sees_the_whole_batch(tmp_path):
    got = distributed_run(tmp_path, every=1, steps=1)
    x, y = batch()
    alone = {lay.name: lay for lay in run(make_model(), x, y, every=1, steps=1).report().layers}
    assert len(got["layers"]) == len(alone)
    for lay in got["layers"]:
        ref = alone[lay["name"].removeprefix("module.")]
        assert lay["shape"][0] == BATCH // WORLD  # each rank saw half the batch...
        assert lay["hist"] == ref.hist and lay["hist_outside"] == list(ref.hist_outside)  # ...bins add up exactly
        assert lay["saturated"] == ref.saturated and lay["inactive"] == ref.inactive and lay["dead"] == ref.dead
        assert lay["mean"] == pytest.approx(ref.mean, abs=1e-6)
        assert lay["std"] == pytest.approx(ref.std, abs=1e-6)
        assert lay["grad_std"] == pytest.approx(ref.grad_std, rel=1e-5)


def test_no_collective_on_unsampled_steps(tmp_path):
    got = distributed_run(tmp_path, every=3, steps=7)  # samples at steps 0, 3 and 6
    assert got["rows"] == 3 and got["calls"] == 3

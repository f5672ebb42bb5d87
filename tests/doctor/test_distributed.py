"""Monitor under torch.distributed: two CPU processes (gloo) measure what one process would on the
whole batch, with one collective per sampled step and none in between."""

import json
import os

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


def leave():
    """End a worker: both processes done before either tears down, and then no interpreter teardown at all.
    gloo can abort a process (SIGABRT, "terminate called without an active exception") whose peer closed the
    connection while it was still open, or whose threads are still winding down as the interpreter exits;
    the results are written by then."""
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


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
    leave()


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


# -- BatchNorm on small per-process batches ------------------------------------------------------------
# torch runs SyncBatchNorm only on GPUs: its training forward raises on a CPU tensor ("SyncBatchNorm expected
# input tensor to be on GPU") and DDP's constructor refuses it on a CPU module. On these gloo processes the
# converted layers therefore run the forward below instead (the same statistics over every process's
# examples, taken with one differentiable all_reduce) and DDP's GPU-only check is skipped. The rule under
# test looks only at which module class normalised how many examples in each process.
def cpu_sync_batchnorm(self, x):
    import torch.distributed.nn.functional as dist_fn

    cpu_sync_batchnorm.calls += 1
    dims = [0, *range(2, x.dim())]
    count = torch.full((1,), x.numel() / x.shape[1])
    total = dist_fn.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
    n = total[-1]
    mean = total[: x.shape[1]] / n
    var = total[x.shape[1]: 2 * x.shape[1]] / n - mean * mean
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps) * self.weight.view(shape) \
        + self.bias.view(shape)


cpu_sync_batchnorm.calls = 0


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40, bias=False), nn.BatchNorm1d(40), nn.Tanh(), nn.Linear(40, 6))


def bn_worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    nn.SyncBatchNorm.forward = cpu_sync_batchnorm
    nn.parallel.DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None
    x, y = batch()
    share = slice(rank * 16 // WORLD, (rank + 1) * 16 // WORLD)  # 16 examples in all, 8 per process
    got = {}
    for name, model in [("plain", bn_model()), ("sync", nn.SyncBatchNorm.convert_sync_batchnorm(bn_model()))]:
        mon = run(nn.parallel.DistributedDataParallel(model), x[share], y[share], every=1, steps=2)
        got[name] = {"findings": [f.to_dict() for f in mon.findings()],
                     "norm_ops": [lay.op for lay in mon.report().layers if lay.kind == "norm"]}
    got["sync_forwards"] = cpu_sync_batchnorm.calls
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump(got, f)
    leave()


def test_batchnorm_on_small_per_process_batches(tmp_path):
    out = tmp_path / "bn.json"
    mp.spawn(bn_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    got = json.loads((tmp_path / "bn.json.0").read_text())
    plain = [f for f in got["plain"]["findings"] if f["code"] == "batchnorm-small-batch"]
    assert len(plain) == 1 and plain[0]["where"] == "module.1"
    assert plain[0]["evidence"]["batch"] == 8  # the per-process batch, although 16 examples go through
    assert "per process" in plain[0]["message"]
    assert "torch.nn.SyncBatchNorm.convert_sync_batchnorm" in plain[0]["fix"]
    # converted, the layer is still watched, now as SyncBatchNorm, and the finding is gone
    assert got["sync"]["norm_ops"] == ["SyncBatchNorm"] and got["sync_forwards"] == 2
    assert "batchnorm-small-batch" not in [f["code"] for f in got["sync"]["findings"]]

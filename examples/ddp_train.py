"""Train the lesson's deep name model with DistributedDataParallel, watched by an nnvitals Monitor.

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py     # CPU: gloo; GPUs: nccl, one per process
    torchrun --nproc_per_node=2 examples/ddp_train.py --batch 8        # small per-process batches for BatchNorm
    torchrun --nproc_per_node=2 examples/ddp_train.py --sync-batchnorm # BatchNorm over all processes (GPUs only)

Every process trains on its own minibatches of the same data (three characters of a name predict the
next); DDP averages the gradients. The Monitor samples every `--every`-th step: on those steps each
process measures its share and one all_reduce combines them, so the findings describe the whole batch.
Only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import nnvitals
from nnvitals.doctor import _strict
from nnvitals.lab import data

EMBED, WIDTH, DEPTH = 10, 100, 6
REFUSAL_GRACE_S = 5.0  # how long the other ranks outlive rank 0 when refusing (it needs well under a second)


def deep_mlp(vocab: int, context: int) -> nn.Sequential:
    """Embedding, then Linear -> BatchNorm1d -> Tanh five times, then Linear -> BatchNorm1d (the lesson's)."""
    sizes = [EMBED * context] + [WIDTH] * (DEPTH - 1) + [vocab]
    layers: list[nn.Module] = [nn.Embedding(vocab, EMBED), nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        linear = nn.Linear(fan_in, fan_out, bias=False)  # BatchNorm's own bias takes its place
        nn.init.normal_(linear.weight, std=1 / math.sqrt(fan_in))
        layers += [linear, nn.BatchNorm1d(fan_out)]
        if i < DEPTH - 1:
            layers.append(nn.Tanh())
    with torch.no_grad():
        layers[-1].weight.mul_(0.1)  # type: ignore[operator]  # a less confident first prediction
    return nn.Sequential(*layers)


def refusal(args: argparse.Namespace, cuda: bool, local_rank: int) -> str | None:
    """Why the arguments or the environment cannot run, or None."""
    if args.steps < 1:
        return f"--steps must be at least 1, got {args.steps}"
    if args.every < 1:
        return f"--every must be at least 1, got {args.every}"
    if args.batch < 2:
        return f"--batch must be at least 2 (BatchNorm needs two examples), got {args.batch}"
    if not args.lr > 0:
        return f"--lr must be positive, got {args.lr}"
    if args.sync_batchnorm and not cuda:
        return "--sync-batchnorm needs GPUs: torch runs SyncBatchNorm only on CUDA devices"
    if "RANK" not in os.environ:
        return "run it under torchrun: torchrun --standalone --nproc_per_node=2 examples/ddp_train.py"
    if cuda and local_rank >= torch.cuda.device_count():
        return (f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                "start at most that many processes (--nproc_per_node)")
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=10, help="the Monitor samples every N-th step")
    ap.add_argument("--batch", type=int, default=32, help="examples per process and step")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--sync-batchnorm", action="store_true", help="convert BatchNorm1d to SyncBatchNorm (GPUs)")
    ap.add_argument("--json", action="store_true", help="rank 0 prints the findings as JSON")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    problem = refusal(args, cuda, local_rank)
    if problem:  # before any process group: every process stops, one says why
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{ap.prog}: error: {problem}", file=sys.stderr)
        else:
            # torchrun stops the whole group when the first process exits: the others wait a moment, so
            # that rank 0 (maybe still importing torch) is not stopped before it has said why
            time.sleep(REFUSAL_GRACE_S)
        sys.exit(2)
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)  # one process per core; a second thread per process only waits

    splits = data.split(data.resolve().words)
    X, Y = splits.train.X.to(device), splits.train.Y.to(device)
    torch.manual_seed(0)  # the same weights in every process (DDP also broadcasts rank 0's)
    model: nn.Module = deep_mlp(len(splits.vocab.symbols), X.shape[1]).to(device)
    if args.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(1000 + rank)  # each process its own minibatches

    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{world} processes ({'nccl' if cuda else 'gloo'}), {args.batch} examples each per step, "
        f"{len(X)} training examples; Monitor every {args.every} steps")
    with nnvitals.Monitor(model, every=args.every) as mon:
        for step in range(args.steps):
            ix = torch.randint(0, len(X), (args.batch,), generator=g).to(device)
            loss = F.cross_entropy(model(X[ix]), Y[ix])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mon.step(loss)
            if step % max(args.steps // 10, 1) == 0 or step == args.steps - 1:
                say(f"step {step:6d}  loss {loss.item():.4f}")

    findings = mon.findings()  # the same on every rank: the statistics were combined across them
    if args.json:
        say(json.dumps(_strict([f.to_dict() for f in findings])))  # strict JSON: NaN becomes "nan"
    elif not findings:
        say("no findings: the numbers look healthy")
    for f in findings if not args.json else []:
        say(f"{f.severity:8s} {f.code:24s} {f.where}\n         {f.message}\n         fix: {f.fix}")
    # both processes done before either tears down: gloo can abort a process (SIGABRT, "terminate
    # called without an active exception") whose peer closed the connection while it was still open
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Steps per second of the lab's training loop against the same training written the notebook's way.

Both train the same network from the same initial weights on the same data and minibatches, with the
same schedule. The notebook's way, per step: one randint and two gathers for the batch, the loss
logged with `.item()`, gradients cleared with `p.grad = None` in a Python loop, and one
`p.data += -lr * p.grad` per parameter; its BatchNorm stage writes BatchNorm out with `.std(0)` and
rebuilds its running statistics as new tensors; for the deep network it also calls `retain_grad()`
on every layer's output and computes every parameter's update ratio with `.item()` every step. It runs
with torch's default number of threads, as a notebook would; a second column runs it on one thread
like the lab, to separate the effect of threads from that of the code.

The lab's loop is `nnvitals.lab.train.train` as the lab runs it: blocks of indices drawn at once, one
fused update, no host sync between progress reports, a checkpoint at the end, and for the deep network
the doctor's Monitor sampling every 100 steps.

The three are run interleaved (A B C A B C ...), so load from other programs hits them alike; rates
are medians over the rounds, speed-ups the medians of the ratios within each round.

    python benchmarks/lab_speed.py                       # kaiming, batchnorm and deep
    python benchmarks/lab_speed.py --stages deep --steps 500 --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nnvitals.lab import data, diagnose, models, train
from nnvitals.lab.data import Split

LoopFn = Callable[[int], None]


def notebook_one_layer(stage: str, split: Split, vocab: int, seed: int) -> LoopFn:
    """The one-hidden-layer training loop written as the notebook writes it (raw tensors)."""
    X, Y = split.X, split.Y

    def loop(steps: int) -> None:
        g = torch.Generator().manual_seed(seed)
        net = models.build(stage, vocab, g)
        assert isinstance(net, models.MLP)
        C, W1, W2, b2 = (t.detach().clone() for t in (net.C, net.W1, net.W2, net.b2))
        batchnorm = net.bn is not None
        b1 = None if net.b1 is None else net.b1.detach().clone()
        gain, bias = torch.ones((1, W1.shape[1])), torch.zeros((1, W1.shape[1]))
        mean_running, std_running = torch.zeros((1, W1.shape[1])), torch.ones((1, W1.shape[1]))
        parameters = [C, W1, W2, b2] + ([gain, bias] if batchnorm else [b1])
        for p in parameters:
            assert p is not None
            p.requires_grad = True
        lossi = []
        for i in range(steps):
            ix = torch.randint(0, X.shape[0], (32,), generator=g)
            Xb, Yb = X[ix], Y[ix]
            emb = C[Xb]
            embcat = emb.view(emb.shape[0], -1)
            if batchnorm:
                hpreact = embcat @ W1
                meani = hpreact.mean(0, keepdim=True)
                stdi = hpreact.std(0, keepdim=True)
                hpreact = gain * (hpreact - meani) / stdi + bias
                with torch.no_grad():
                    mean_running = 0.999 * mean_running + 0.001 * meani
                    std_running = 0.999 * std_running + 0.001 * stdi
            else:
                hpreact = embcat @ W1 + b1
            h = torch.tanh(hpreact)
            logits = h @ W2 + b2
            loss = F.cross_entropy(logits, Yb)
            for p in parameters:
                p.grad = None
            loss.backward()
            lr = 0.1 if i < steps // 2 else 0.01
            for p in parameters:
                p.data += -lr * p.grad  # type: ignore[operator]
            lossi.append(loss.log10().item())

    return loop


def notebook_deep(split: Split, vocab: int, seed: int) -> LoopFn:
    """The deep network's loop as the notebook writes it: layer by layer, with its per-step diagnostics."""
    X, Y = split.X, split.Y

    def loop(steps: int) -> None:
        g = torch.Generator().manual_seed(seed)
        net = models.build("deep", vocab, g)
        assert isinstance(net, models.DeepMLP)
        C = net.embedding.weight
        layers = list(net.layers)
        parameters = list(net.parameters())
        lossi, ud = [], []
        for i in range(steps):
            ix = torch.randint(0, X.shape[0], (32,), generator=g)
            Xb, Yb = X[ix], Y[ix]
            emb = C[Xb]
            x = emb.view(emb.shape[0], -1)
            outs = []
            for layer in layers:
                x = layer(x)
                outs.append(x)
            loss = F.cross_entropy(x, Yb)
            for out in outs:
                out.retain_grad()
            for p in parameters:
                p.grad = None
            loss.backward()
            lr = 0.1 if i < steps * 3 // 4 else 0.01
            for p in parameters:
                p.data += -lr * p.grad  # type: ignore[operator]
            lossi.append(loss.log10().item())
            with torch.no_grad():
                ud.append([((lr * p.grad).std() / p.data.std()).log10().item() for p in parameters])  # type: ignore[operator]

    return loop


def lab_loop(stage: str, split: Split, vocab: int, seed: int, folder: Path) -> LoopFn:
    """The lab's own loop, as `nnvitals lab` runs it."""

    def loop(steps: int) -> None:
        g = torch.Generator().manual_seed(seed)
        model = models.build(stage, vocab, g)
        schedule = train.schedule_for(stage, "quick", steps)
        checkpoint = folder / f"{stage}.pt"
        checkpoint.unlink(missing_ok=True)
        watch = diagnose.Watch(model) if stage == "deep" else nullcontext(None)
        with watch as monitor:
            train.train(model, split, g, schedule, train.Progress.fresh(g), checkpoint=checkpoint,
                        on_progress=lambda step, loss: None, monitor=monitor)

    return loop


def timed(fn: LoopFn, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    fn(steps)
    return steps / (time.perf_counter() - start)


def measure(stage: str, split: Split, vocab: int, steps: int, repeats: int, seed: int) -> dict[str, Any]:
    default_threads = torch.get_num_threads()
    reference = notebook_deep(split, vocab, seed) if stage == "deep" else notebook_one_layer(stage, split, vocab, seed)
    with tempfile.TemporaryDirectory() as tmp:
        ours = lab_loop(stage, split, vocab, seed, Path(tmp))
        variants = {
            "notebook": (reference, default_threads),
            "notebook_1_thread": (reference, 1),
            "lab": (ours, train_threads()),
        }
        for fn, threads in variants.values():  # warm up (first calls allocate and load kernels)
            timed(fn, min(steps, 100), threads)
        rates: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            for name, (fn, threads) in variants.items():
                rates[name].append(timed(fn, steps, threads))
    torch.set_num_threads(default_threads)
    med = {k: statistics.median(v) for k, v in rates.items()}
    # Ratios within each round (runs seconds apart) are steadier than ratios of medians when the
    # machine's load drifts during the benchmark.
    paired = [lab / nb for lab, nb in zip(rates["lab"], rates["notebook"], strict=True)]
    paired_1 = [lab / nb for lab, nb in zip(rates["lab"], rates["notebook_1_thread"], strict=True)]
    return {
        "stage": stage, "steps": steps, "repeats": repeats, "default_threads": default_threads,
        "steps_per_second": med, "all": rates,
        "speedup": statistics.median(paired), "speedup_vs_1_thread": statistics.median(paired_1),
    }


def train_threads() -> int:
    from nnvitals.lab.experiment import TRAINING_THREADS

    return TRAINING_THREADS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="kaiming,batchnorm,deep")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed run (default 1000; deep 300)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--data", default=None, help="word list (default: as the lab chooses)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    words = data.resolve(args.data)
    splits = data.split(words.words)
    results = []
    for stage in args.stages.split(","):
        steps = args.steps or (300 if stage == "deep" else 1000)
        results.append(measure(stage, splits.train, splits.vocab.size, steps, args.repeats, models.LESSON_SEED))
    if args.json:
        print(json.dumps({"data": words.description, "results": results}, indent=2))
        return 0
    print(f"data: {words.description}, {len(splits.train):,} training examples; medians of {args.repeats} "
          f"interleaved runs; torch default threads {results[0]['default_threads']}")
    print(f"{'stage':<10} {'steps':>6} {'notebook':>10} {'nb 1 thread':>12} {'lab':>10} {'speed-up':>9} "
          f"{'vs 1 thread':>11}   (steps/s)")
    for r in results:
        s = r["steps_per_second"]
        print(f"{r['stage']:<10} {r['steps']:>6} {s['notebook']:>10,.0f} {s['notebook_1_thread']:>12,.0f} "
              f"{s['lab']:>10,.0f} {r['speedup']:>8.2f}x {r['speedup_vs_1_thread']:>10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

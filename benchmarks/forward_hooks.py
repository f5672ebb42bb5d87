"""What torch's hooks cost a forward pass of the lesson's deep network, against what nnvitals' cost.

Five forward passes in turn, the same batch, in a warm loop (each configuration every fifth pass):
plain; with a process-wide forward hook that does nothing; with a minimal one that keeps each watched
layer's output and retains its gradient (the least a hook-based monitor does); the same keeping each
gradient as autograd hands it instead (nnvitals' way: a hook appending it to a list, no copy); and with
nnvitals' Recorder attached (its forward hook, with the kernel's Replay where it is built). Each pass is
followed by its backward, timed apart. Medians of the passes after the first 300.

    .venv/bin/python benchmarks/forward_hooks.py [--passes 8000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

sys.path.insert(0, str(Path(__file__).parent))
from overhead import Trainer  # noqa: E402

from nnvitals import probes  # noqa: E402

NAMES = ("plain", "hook that does nothing", "minimal hook", "minimal, gradient hook", "nnvitals")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=8000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    trainer = Trainer()
    model, x, y = trainer.model, trainer.X[:32], trainer.Y[:32]
    recorder = probes.Recorder(model, functions=False)
    watched = {id(m) for m in model.modules() if probes.module_kind(m)}
    kept: list[object] = []

    def minimal(module: nn.Module, inputs: tuple[object, ...], out: torch.Tensor) -> None:
        if id(module) in watched:
            kept.append(out)
            out.retain_grad()

    def gradient_hook(module: nn.Module, inputs: tuple[object, ...], out: torch.Tensor) -> None:
        if id(module) in watched:
            kept.append(out)
            kept.append(probes._grad_cell(out))

    def nothing(module: nn.Module, inputs: tuple[object, ...], out: torch.Tensor) -> None:
        return None

    forward: dict[str, list[float]] = {name: [] for name in NAMES}
    backward: dict[str, list[float]] = {name: [] for name in NAMES}
    hooks = {1: nothing, 2: minimal, 3: gradient_hook}
    for i in range(args.passes):
        which = i % len(NAMES)
        name = NAMES[which]
        handle = register_module_forward_hook(hooks[which]) if which in hooks else None
        if which == 4:
            recorder.attach()
        t0 = time.perf_counter()
        out = model(x)
        t1 = time.perf_counter()
        loss = nn.functional.cross_entropy(out, y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        if handle is not None:
            handle.remove()
        if which == 4:
            recorder.detach()
            recorder.collect()
        model.zero_grad(set_to_none=True)
        kept.clear()
        forward[name].append(t1 - t0)
        backward[name].append(t3 - t2)
    print(f"{args.passes // len(NAMES)} passes each, warm, 1 thread; median µs")
    print(f"{'':24s} {'forward':>9s} {'backward':>9s}")
    base_f, base_b = (statistics.median(d["plain"][60:]) for d in (forward, backward))
    for name in NAMES:
        f, b = statistics.median(forward[name][60:]), statistics.median(backward[name][60:])
        print(f"{name:24s} {f * 1e6:9.1f} {b * 1e6:9.1f}   ({(f - base_f) * 1e6:+.0f}, {(b - base_b) * 1e6:+.0f})")


if __name__ == "__main__":
    main()

"""Where a sampled step's extra time goes, under torch.profiler: the lesson's deep network, warm, with
Monitor(every=1), against the same steps unwatched (and, on a GPU, watched with a wait for the GPU after each
step, as when a sampled step's numbers were read at once).

For each configuration: the wall time per step (after a synchronize on a GPU), the operators the step called
and, on a GPU, the kernels it launched and their summed device time; then the operators that only the
watched step calls or calls more often, most time first. On a GPU a step of this small network is mostly
kernel launches, so the launch count is the cost to cut.

    .venv/bin/python benchmarks/profile_step.py [--device cpu|cuda] [--steps 20] [--top 25]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from overhead import BATCH, data, lesson_model  # noqa: E402

import nnvitals  # noqa: E402


def make(device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = lesson_model().to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def steps(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list, mon: nnvitals.Monitor | None,
          wait: bool) -> None:
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(loss)
        if wait:
            torch.cuda.synchronize()


def profiled(device: str, watched: bool, n: int, wait: bool = False
             ) -> tuple[float, Counter, Counter, Counter, float]:
    """Seconds per step, and per step: operator calls, their self CPU microseconds, kernel launches, the kernels'
    device microseconds."""
    model, opt = make(device)
    x, y = data()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        ix = torch.randint(0, len(x), (BATCH,), generator=g)
        batches.append((x[ix].to(device), y[ix].to(device)))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    mon = nnvitals.Monitor(model, every=1) if watched else None
    if mon is not None:
        mon.__enter__()
    steps(model, opt, batches, mon, wait)  # warm: one-time costs, the Monitor's first cycle
    sync()
    t0 = time.perf_counter()
    steps(model, opt, batches, mon, wait)
    sync()
    seconds = (time.perf_counter() - t0) / n
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        steps(model, opt, batches, mon, wait)
        sync()
    if mon is not None:
        mon.__exit__(None, None, None)
    calls: Counter = Counter()
    cpu_us: Counter = Counter()
    kernels: Counter = Counter()
    gpu_us = 0.0
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.key] += e.count / n
            gpu_us += e.self_device_time_total / n
        else:
            calls[e.key] += e.count / n
            cpu_us[e.key] += e.self_cpu_time_total / n
    return seconds, calls, cpu_us, kernels, gpu_us


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU; torch.cuda.is_available() is False here", file=sys.stderr)
        return 2
    if args.steps < 1 or args.top < 1:
        print("error: --steps and --top must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    plain = profiled(args.device, False, args.steps)
    watched = profiled(args.device, True, args.steps)
    rows = [("plain", plain), ("Monitor(every=1)", watched)]
    if args.device == "cuda":
        rows.append(("  + synchronize", profiled(args.device, True, args.steps, wait=True)))
    for label, (seconds, calls, cpu_us, kernels, gpu_us) in rows:
        print(f"{label:18s} {1e3 * seconds:8.3f} ms/step  {sum(calls.values()):7.1f} operator calls "
              f"({sum(cpu_us.values()):7.1f} µs)  {sum(kernels.values()):6.1f} kernels  {gpu_us:8.1f} device µs"
              "  (per step)")
    _, p_calls, p_us, p_kernels, _ = plain
    _, w_calls, w_us, w_kernels, _ = watched
    print(f"\nOperators the watched step adds (per step; self CPU µs, most first; top {args.top}):")
    extra = {k: (w_calls[k] - p_calls[k], w_us[k] - p_us[k]) for k in w_calls if w_calls[k] > p_calls[k] + 0.01}
    for name, (count, us) in sorted(extra.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"  {count:6.1f} x {name:60.60s} {us:9.1f} µs")
    if args.device == "cuda":
        print(f"\nKernels the watched step adds (launches per step; top {args.top}):")
        added = {k: w_kernels[k] - p_kernels[k] for k in w_kernels if w_kernels[k] > p_kernels[k] + 0.01}
        for name, count in sorted(added.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {count:6.1f} x {name[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

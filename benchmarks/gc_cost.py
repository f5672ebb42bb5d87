"""What Python's cyclic garbage collector costs a training loop, plain and watched by a Monitor.

A Monitor keeps the passes it sampled (up to thousands). Whatever each of them keeps as objects of its own is
more for the garbage collector to count and go through: more frequent collections, and now and then a full one
over everything the process holds (torch alone makes it hundreds of thousands of objects), tenths of a second
each. Those land on single steps, so the typical-step figures of overhead.py (medians) do not show them; a
long run pays them all. Each configuration runs the lesson's deep network (benchmarks/overhead.py) in a process
of its own, warm, then STEPS steps with a callback timing every collection.

    .venv/bin/python benchmarks/gc_cost.py [--steps 10000] [--every 1 10]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from overhead import Trainer  # noqa: E402


def one(every: int | None, steps: int) -> dict[str, float]:
    """In this process: collections and their seconds per generation over `steps` warm steps."""
    import torch

    torch.set_num_threads(1)
    run = Trainer(every=every)
    run(200)  # warm: imports, caches, the Monitor's first cycle
    seconds: list[list[float]] = [[], [], []]
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            seconds[info["generation"]].append(time.perf_counter() - started[0])

    gc.callbacks.append(timed)
    per_step = run(steps)
    gc.callbacks.remove(timed)
    result = {"us_per_step": 1e6 * per_step, "objects": len(gc.get_objects())}
    for gen, times in enumerate(seconds):
        result[f"gen{gen}_per_1000_steps"] = 1000 * len(times) / steps
        result[f"gen{gen}_us_per_step"] = 1e6 * sum(times) / steps
        result[f"gen{gen}_ms_each"] = 1e3 * max(times, default=0.0)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # (a child process: one configuration, 0 = plain)
    args = ap.parse_args()
    if args.steps < 1000 or any(n < 1 for n in args.every):
        print("error: --steps must be at least 1000 (collections are rare) and each --every at least 1",
              file=sys.stderr)
        return 2
    if args.one is not None:
        print(json.dumps(one(args.one or None, args.steps)))
        return 0
    print(f"{args.steps} warm steps per configuration, each in its own process; per generation: collections per "
          "1000 steps, µs a step spent in them (the longest one)")
    for every in [0, *args.every]:
        done = subprocess.run([sys.executable, __file__, "--one", str(every), "--steps", str(args.steps)],
                              capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        label = f"Monitor(every={every})" if every else "plain"
        gens = "   ".join(f"gen{g} {r[f'gen{g}_per_1000_steps']:5.1f} {r[f'gen{g}_us_per_step']:6.1f} µs "
                           f"({r[f'gen{g}_ms_each']:.1f} ms)" for g in range(3))
        print(f"{label:18s} {r['us_per_step']:7.0f} µs/step   {gens}   {r['objects']} objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Instructions a training step executes, plain and watched: a figure the machine's noise cannot move.

On the shared development machine two timed runs minutes apart differ by more than most changes gain (see
BENCHMARKS.md). Instruction counts do not: under valgrind's callgrind the same program executes the same
instructions, run after run. They are not time (a cache miss costs no instruction, and the watched step's
cold caches are a large part of its cost), but they tell whether a change made the CPU do less.

Each configuration runs in its own process under callgrind twice, with WARMUP steps and then SHORT or LONG
more; the difference over LONG - SHORT is the instructions of those steps alone (imports and set-up cancel; the
garbage collector is off after the warm-up, as a collection would fall in one run's span and not the other's).
`--src` runs another checkout's package (its compiled parts built in place, e.g. with
`python setup.py build_ext --inplace` in a `git worktree`) instead of this one's, to compare revisions.

    .venv/bin/python benchmarks/instructions.py [--every 10] [--src DIR] [--short 20] [--long 120]

(one configuration takes about five minutes a run on the development machine; the runs go two at a time)
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def loop(every: int, warmup: int, steps: int) -> None:
    """The timed loop itself (run under callgrind by `main`)."""
    import torch
    from overhead import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(every=every or None)
    if trainer.rounds is not None:
        trainer.rounds.begin()
    model, opt, monitor = trainer.model, trainer.opt, trainer.monitor
    for step in range(warmup + steps):
        if step == warmup:  # (a collection falls in one run's span and not the other's: none in the span)
            gc.collect()
            gc.disable()
        ix = torch.randint(0, len(trainer.X), (32,), generator=trainer.g)
        loss = torch.nn.functional.cross_entropy(model(trainer.X[ix]), trainer.Y[ix])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(loss)


def count(every: int, warmup: int, steps: int, src: str | None) -> int:
    """Instructions of one run of `loop` under callgrind."""
    # (one thread everywhere: a BLAS library's idle worker threads spin for a number of instructions that varies)
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if src:
        env["PYTHONPATH"] = src
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", sys.executable, __file__,
             "--loop", str(every), str(warmup), str(steps)],
            env=env, capture_output=True, text=True, check=True)
    found = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--loop":
        sys.path.insert(0, str(HERE))
        loop(*map(int, sys.argv[2:]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--src", help="another checkout's src folder, to count its Monitor instead")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=120)
    args = parser.parse_args()
    if args.every < 1 or args.short < 0 or args.long <= args.short or (args.long - args.short) % args.every:
        print("error: --every must be positive and --long exceed --short by a whole number of sampling cycles",
              file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None:
        print("error: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    runs = [(every, steps) for every in (0, args.every) for steps in (args.short, args.long)]
    with ThreadPoolExecutor(2) as pool:
        counts = dict(zip(runs, pool.map(lambda r: count(r[0], args.warmup, r[1], args.src if r[0] else None), runs),
                          strict=True))
    n = args.long - args.short
    plain = (counts[0, args.long] - counts[0, args.short]) / n
    watched = (counts[args.every, args.long] - counts[args.every, args.short]) / n
    print(f"instructions a step over {n} steps: plain {plain:,.0f}; Monitor(every={args.every}) {watched:,.0f} "
          f"(+{watched - plain:,.0f}, {watched / plain:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

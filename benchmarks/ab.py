"""Same-process A/B of a Monitor's cost: this checkout's nnvitals against another git revision's.

On a shared, noisy machine two benchmark runs minutes apart differ by more than most changes gain. Here
three training runs of the lesson's deep network (benchmarks/overhead.py) go on side by side in one
process: plain, `Monitor` from REV and `Monitor` from the working tree, one step each in turn, in an order
shuffled every turn (whichever came right after the plain step was measured 40-60 us faster). With `--turn K`
each run takes K steps a turn: a sampled step then comes among the run's own steps, as in a training loop, so
what it leaves in the caches for the steps after it is counted too. REV's
package is extracted with `git archive` into a temporary folder and imported as `nnvitals_ab`. A Monitor
armed for its next sampled step is paused while the other runs take their steps (its process-wide hooks
would run on their modules too), untimed, as in overhead.py.

    .venv/bin/python benchmarks/ab.py REV [--every 1] [--steps 3000] [--turn 1]
"""

from __future__ import annotations

import argparse
import ast
import random
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from overhead import OwnRounds, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def extract(rev: str, into: Path) -> str:
    """REV's src/nnvitals as the package nnvitals_ab under `into`; says which statistics path it will use."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/nnvitals"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    package = into / "nnvitals_ab"
    (into / "src" / "nnvitals").rename(package)
    for source in package.rglob("*.py"):
        text = source.read_text()
        text = re.sub(r"\bfrom nnvitals([. ])", r"from nnvitals_ab\1", text)
        text = re.sub(r"\bimport nnvitals\b", "import nnvitals_ab as nnvitals", text)
        source.write_text(text)
    here = ROOT / "src" / "nnvitals"
    source = package / "_kernel.c"
    if not source.exists():
        return "torch ops (it has no _kernel.c)"
    if source.read_bytes() == (here / "_kernel.c").read_bytes():
        for built in here.glob("_kernel*.so"):  # the same C source: this checkout's build serves both
            shutil.copy(built, package / built.name)
        return "compiled kernel"
    # another C source: built here as the package build does it (setup.py's flags); a kernel that borrows from
    # nnvitals._autograd borrows this checkout's
    flags = re.search(r"^KERNEL_FLAGS = (\[.*?\])", (ROOT / "setup.py").read_text(), re.M)
    assert flags is not None, "setup.py names the kernel's flags in KERNEL_FLAGS"
    target = package / f"_kernel{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run([sysconfig.get_config_var("CC").split()[0], *ast.literal_eval(flags.group(1)), "-shared", "-fPIC",
                    f"-I{sysconfig.get_paths()['include']}", f"-I{package}", str(source), "-o", str(target)],
                   check=True)
    return "its own compiled kernel"


def positions_us(times: list[float], every: int, skip: int) -> list[float]:
    """Each position's median step in the sampling cycle (the sampled step first), in microseconds."""
    return [statistics.median(times[skip + j::every]) * 1e6 for j in range(every)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the git revision to compare the working tree with, e.g. HEAD~3")
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3000, help="steps of each run (the first fifth untimed)")
    ap.add_argument("--turn", type=int, default=1, help="steps each run takes in its turn")
    args = ap.parse_args()
    if args.every < 1 or args.turn < 1 or args.steps < 5 * max(args.every, args.turn):
        print(f"error: need --every >= 1, --turn >= 1 and --steps >= 5 x both, got {args.every}, {args.turn} and "
              f"{args.steps}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path_of_rev = extract(args.rev, Path(tmp))
        except subprocess.CalledProcessError as error:
            print(f"error: cannot extract {args.rev!r}: {error.stderr.decode().strip()}", file=sys.stderr)
            return 2
        sys.path.insert(0, tmp)
        import nnvitals_ab

        import nnvitals

        # The runs made in an order drawn anew each time: two runs of the same code differ by a steady few us a step
        # depending on where their memory lies, and the one made last came out ahead more often than not.
        names = ["plain", args.rev, "working tree"]
        random.shuffle(names)
        made = {name: Trainer() for name in names}
        runs = {name: made[name] for name in ("plain", args.rev, "working tree")}
        for name, package in ((args.rev, nnvitals_ab), ("working tree", nnvitals)):
            runs[name].monitor = package.Monitor(runs[name].model, every=args.every).__enter__()
            runs[name].rounds = OwnRounds(runs[name].monitor)
        order = list(runs)
        shuffle = random.Random(1).shuffle
        for _ in range(args.steps // args.turn):
            shuffle(order)
            for name in order:
                runs[name](args.turn)  # its steps' times kept in step_times
    times = {name: run.step_times for name, run in runs.items()}
    skip = args.steps // 5 // args.every * args.every  # (a whole number of cycles: position 0 is a sampled step)
    plain = statistics.mean(positions_us(times["plain"], args.every, skip))
    print(f"every={args.every}, {args.steps} steps each, {args.turn} a turn, {args.rev} with {path_of_rev}; "
          "median step per position of the cycle, averaged (and each position over plain)")
    for name in runs:
        at = positions_us(times[name], args.every, skip)
        us = statistics.mean(at)
        each = " ".join(f"{t - plain:+.0f}" for t in at) if name != "plain" and args.every > 1 else ""
        print(f"  {name:14s} {us:8.0f} us  +{us - plain:6.0f} us over plain  {each}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Step-time cost of nnvitals against the ways peers watch a run, in one interleaved run with medians.

What is compared, on each network:
  plain                  the training step alone
  nnvitals every=N       nnvitals.Monitor(model, every=N)
  TensorBoard every=N    SummaryWriter.add_histogram of every parameter and every gradient (to a temp folder)
  histc hooks every=N    what W&B's `watch(log="gradients")` does: a hook on every parameter's gradient that,
                         when due, drops NaN/Inf, reads min and max, bins 64 ways with torch.histc and moves
                         the bins to the host (W&B's own packing and upload are not counted: a lower bound)
The networks: (a) the lesson's deep MLP from benchmarks/overhead.py (BatchNorm1d and Tanh, batch 32) and
(b) a small character-level transformer language model (4 pre-norm blocks, width 128, 4 heads, context
64, 65 characters, batch 32, AdamW); and (c) DDP on 2 CPU processes (gloo) with the deep MLP, 32 examples
per process: plain DDP against DDP with a Monitor.

Configurations are interleaved round by round, in an order shuffled every round; each training run goes on
across the rounds (an untimed first round takes the one-time costs); the figure quoted is the median of
per-round ratios to the plain run of the same round. nnvitals' Monitor is paused (untimed) while the others
take their steps (its process-wide hooks would watch their modules too), TensorBoard's writer flushed (timed)
at the end of its round. On the CPU a step is timed as process CPU time on one thread (a busy neighbour
costs waiting, not measurement); under DDP as wall time (waiting for the other process is the cost), each
rank timing itself and rank 0 reporting. With --device cuda, steps are timed with CUDA events after a
synchronize (DDP then uses nccl and needs two GPUs).

    .venv/bin/python benchmarks/peers.py [--models mlp transformer ddp] [--rounds 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from overhead import BATCH, OwnRounds, data, lesson_model, typical_step  # noqa: E402

LM_VOCAB, LM_CONTEXT, LM_WIDTH, LM_LAYERS, LM_HEADS, LM_BATCH = 65, 64, 128, 4, 4, 32
HIST_BINS = 64


# -- the networks ----------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP with GELU, each added back."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.gelu = nn.GELU()
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(self.gelu(self.fc(self.ln2(x))))


class CharLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(LM_VOCAB, LM_WIDTH)
        self.pos = nn.Embedding(LM_CONTEXT, LM_WIDTH)
        self.blocks = nn.Sequential(*[Block(LM_WIDTH, LM_HEADS) for _ in range(LM_LAYERS)])
        self.ln = nn.LayerNorm(LM_WIDTH)
        self.head = nn.Linear(LM_WIDTH, LM_VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def mlp_task(device: str) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[torch.Generator], Any]]:
    torch.manual_seed(0)  # every configuration's MLP starts from the same weights
    model = lesson_model().to(device)
    x, y = (t.to(device) for t in data())

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(0, len(x), (BATCH,), generator=g).to(device)
        return x[ix], y[ix]

    return model, torch.optim.SGD(model.parameters(), lr=0.1), batch


def lm_task(device: str) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[torch.Generator], Any]]:
    torch.manual_seed(0)
    model = CharLM().to(device)
    # Random characters: the cost of a step does not depend on what the text says.
    text = torch.randint(0, LM_VOCAB, (100_000,), generator=torch.Generator().manual_seed(1))

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(text) - LM_CONTEXT - 1, (LM_BATCH, 1), generator=g)
        ix = starts + torch.arange(LM_CONTEXT + 1)
        chunk = text[ix].to(device)
        return chunk[:, :-1], chunk[:, 1:]

    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), batch


TASKS = {"mlp": mlp_task, "transformer": lm_task}


# -- the watchers ----------------------------------------------------------------------------------
class Watcher:
    """Nothing: the plain training step."""

    def __init__(self, model: nn.Module, every: int):
        self.model, self.every = model, every

    def after_backward(self, step: int) -> None: ...

    def after_step(self, step: int, loss: torch.Tensor) -> None: ...

    def between_rounds(self, paused: bool) -> None:
        """Called, untimed, as this run's round ends (True) and before its next one begins (False)."""

    def end_of_round(self) -> None:
        """Called, timed, after a round's last step: work of this watcher's still under way ends here, not in
        another run's round."""


class NNVitals(Watcher):
    def __init__(self, model: nn.Module, every: int):
        import nnvitals

        super().__init__(model, every)
        self.monitor = nnvitals.Monitor(model, every=every).__enter__()
        self.rounds = OwnRounds(self.monitor)

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        self.monitor.step(loss)

    def between_rounds(self, paused: bool) -> None:
        self.rounds.end() if paused else self.rounds.begin()


class TensorBoardHistograms(Watcher):
    def __init__(self, model: nn.Module, every: int):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(model, every)
        self.folder = tempfile.TemporaryDirectory(prefix="peers-tb-")
        self.writer = SummaryWriter(self.folder.name)

    def end_of_round(self) -> None:
        self.writer.flush()  # (its thread writes the events to the file)

    def after_backward(self, step: int) -> None:
        if step % self.every:
            return
        for name, p in self.model.named_parameters():
            self.writer.add_histogram(name, p, step)
            if p.grad is not None:
                self.writer.add_histogram(f"{name}/grad", p.grad, step)


class HistcHooks(Watcher):
    """A hook on every parameter's gradient, counting its own calls and binning when due (as W&B's does)."""

    def __init__(self, model: nn.Module, every: int):
        super().__init__(model, every)
        self.kept: dict[str, tuple[list[float], float, float]] = {}
        self.handles = [p.register_hook(self._hook(name)) for name, p in model.named_parameters()]

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        calls = [0]

        def hook(grad: torch.Tensor) -> None:
            calls[0] += 1
            if (calls[0] - 1) % self.every:
                return
            flat = grad.detach().reshape(-1)
            flat = flat[~torch.isnan(flat)]
            flat = flat[~torch.isinf(flat)]
            lo, hi = flat.min().item(), flat.max().item()
            counts = torch.histc(flat, bins=HIST_BINS, min=lo, max=hi).cpu()
            self.kept[name] = (counts.tolist(), lo, hi)

        return hook


WATCHERS: dict[str, type[Watcher]] = {
    "plain": Watcher, "nnvitals": NNVitals, "TensorBoard add_histogram": TensorBoardHistograms,
    "histc hooks (W&B watch)": HistcHooks,
}


# -- timing ----------------------------------------------------------------------------------------
class Clock:
    """Process CPU time on the CPU, wall time under DDP, CUDA events on a GPU."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, run: Callable[[], None]) -> float:
        if self.kind == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        now = time.perf_counter if self.kind == "wall" else time.process_time
        t0 = now()
        run()
        return now() - t0


class Run:
    """One training run that goes on across rounds, watched by one watcher."""

    def __init__(self, task: str, watcher: str, every: int, device: str, clock: Clock, ddp: bool = False):
        model, self.opt, self.batch = TASKS[task](device)
        self.model: nn.Module = nn.parallel.DistributedDataParallel(model) if ddp else model
        self.watcher = WATCHERS[watcher](self.model, every)
        self.g = torch.Generator().manual_seed(2)
        self.clock = clock
        self.every = every
        self.step = 0
        # every step's seconds (not on a GPU, where timing one step would mean a synchronize after each)
        self.step_times: list[float] = []

    def __call__(self, steps: int) -> float:
        per_step = self.clock.kind != "cuda"
        now = time.perf_counter if self.clock.kind == "wall" else time.process_time

        def run() -> None:
            for _ in range(steps):
                t0 = now() if per_step else 0.0
                x, y = self.batch(self.g)
                out = self.model(x)
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.watcher.after_backward(self.step)
                self.opt.step()
                self.watcher.after_step(self.step, loss)
                self.step += 1
                if per_step:
                    self.step_times.append(now() - t0)
            self.watcher.end_of_round()

        self.watcher.between_rounds(False)
        seconds = self.clock(run)
        self.watcher.between_rounds(True)
        return seconds / steps


def configurations(with_peers: bool, everies: list[int]) -> list[tuple[str, str, int]]:
    """(label, watcher, every) in the order they run within a round; plain first."""
    rows = [("plain", "plain", 1)] + [(f"nnvitals every={n}", "nnvitals", n) for n in everies]
    if with_peers:
        rows += [(f"{w} every={n}", w, n) for w in ("TensorBoard add_histogram", "histc hooks (W&B watch)")
                 for n in everies if n <= 10]
    return rows


def interleaved(runs: dict[str, Run], steps: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Each configuration's median ratio of per-round times to the plain run's and, where steps were timed
    one by one, its typical step (overhead.typical_step) over the plain run's."""
    for run in runs.values():  # untimed: imports, caches, the first sampled step
        run(steps)
        run.step_times.clear()
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs.items())
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)  # (a run's first steps go on caches the one before left: no run always after the same one)
        for name, run in order:
            times[name].append(run(steps))
    plain = times["plain"]
    result: dict[str, dict[str, Any]] = {
        name: {"ms_per_step": 1000 * statistics.median(t),
               "ratio": statistics.median(a / b for a, b in zip(t, plain, strict=True)),
               "ratios": [round(a / b, 3) for a, b in zip(t, plain, strict=True)]}
        for name, t in times.items()}
    if runs["plain"].step_times:
        typical_plain = typical_step(runs["plain"].step_times, 1)
        for name, run in runs.items():
            typical = typical_step(run.step_times, run.every)
            result[name] |= {"typical_ms": 1000 * typical, "typical_ratio": typical / typical_plain}
    return result


def ddp_worker(rank: int, init_file: str, out: str, device: str, steps: int, rounds: int) -> None:
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    where = f"cuda:{rank}" if device == "cuda" else "cpu"
    clock = Clock("cuda" if device == "cuda" else "wall")
    runs = {label: Run("mlp", watcher, every, where, clock, ddp=True)
            for label, watcher, every in configurations(False, [1, 10])}
    result = interleaved(runs, steps, rounds)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    # both processes done before either tears down: gloo can abort a process (SIGABRT, "terminate
    # called without an active exception") whose peer closed the connection while it was still open
    dist.barrier()
    dist.destroy_process_group()


def ddp(device: str, steps: int, rounds: int) -> dict[str, dict[str, Any]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(ddp_worker, args=(os.path.join(tmp, "init"), out, device, steps, rounds), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


def refusal(args: argparse.Namespace) -> str | None:
    """Why these arguments cannot give a fair comparison, or None."""
    if args.rounds < 1:
        return f"--rounds must be at least 1, got {args.rounds}"
    # each configuration must sample the same number of steps in every round: steps a multiple of the largest every
    # (on a GPU the transformer runs --mlp-steps with every up to 100; on the CPU --lm-steps, every up to 10)
    mlp_used = {"mlp", "ddp"} & set(args.models) or (args.device == "cuda" and "transformer" in args.models)
    if mlp_used and (args.mlp_steps < 100 or args.mlp_steps % 100):
        return f"--mlp-steps must be a positive multiple of 100 (the largest every), got {args.mlp_steps}"
    if args.device == "cpu" and "transformer" in args.models and (args.lm_steps < 10 or args.lm_steps % 10):
        return f"--lm-steps must be a positive multiple of 10 (the largest every), got {args.lm_steps}"
    if args.device == "cuda" and "ddp" in args.models and torch.cuda.device_count() < 2:
        return (f"--models ddp on --device cuda needs two GPUs, this machine has {torch.cuda.device_count()}; "
                "leave ddp out or run it on the CPU")
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=["mlp", "transformer", "ddp"],
                    default=["mlp", "transformer", "ddp"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mlp-steps", type=int, default=300, help="steps per round, MLP and DDP (a multiple of 100)")
    ap.add_argument("--lm-steps", type=int, default=20, help="steps per round, transformer (a multiple of 10)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU, and torch.cuda.is_available() is False on this machine; "
              "run without --device (the CPU) or on a machine with a GPU", file=sys.stderr)
        return 2
    if problem := refusal(args):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    clock = Clock("cuda" if args.device == "cuda" else "cpu")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for model in args.models:
        if model == "ddp":
            results["ddp (2 processes, deep MLP)"] = ddp(args.device, args.mlp_steps, args.rounds)
            continue
        # every=100 needs rounds of 100+ steps; a transformer round that long takes minutes on a CPU
        everies = [1, 10, 100] if model == "mlp" or args.device == "cuda" else [1, 10]
        steps = args.mlp_steps if model == "mlp" or args.device == "cuda" else args.lm_steps
        runs = {label: Run(model, watcher, every, args.device, clock)
                for label, watcher, every in configurations(True, everies)}
        results[model] = interleaved(runs, steps, args.rounds)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for model, rows in results.items():
        print(f"\n{model} ({args.device}, median of {args.rounds} interleaved rounds)")
        print(f"{'configuration':40s} {'ms/step':>9s} {'x plain':>8s} {'typical ms':>11s} {'x plain':>8s}  per round")
        for name, r in rows.items():
            typical = (f"{r['typical_ms']:11.3f} {r['typical_ratio']:8.2f}" if "typical_ms" in r
                       else f"{'-':>11s} {'-':>8s}")
            print(f"{name:40s} {r['ms_per_step']:9.3f} {r['ratio']:8.2f} {typical}  {r['ratios']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

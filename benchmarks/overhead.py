"""Training-step cost of watching a run: plain vs nnvitals.Monitor (every step, every 10th step).

The network is the lesson's deep one: embedding 10, six bias-free Linear layers of width 100 with
BatchNorm1d and Tanh, batch 32, plain SGD. Configurations are interleaved round by round (so a noisy
neighbour hits them all alike). Two figures per configuration, each against the plain loop:
  rounds   each round's mean step time over the plain loop's in the same round, the median of those
  typical  every step timed on its own; the median step at each position of the sampling cycle (the
           sampled step, the one before it, ...), averaged over the cycle: what a step costs when no
           neighbour interferes, since a burst of a neighbour moves a median far less than a mean
Times are the process's CPU time (time.process_time), so a busy neighbour on a shared machine costs
waiting, not measurement.

    .venv/bin/python benchmarks/overhead.py [--rounds 7] [--steps 300] [--threads 1]

With `--cycle`, it only shows where `Monitor(every=10)`'s time goes in a warm loop: a plain run and a watched
one, rounds in turn, each step's forward, backward, optimizer step and `mon.step()` timed; per position of the
sampling cycle the median of each part over the plain run's.

With `--foreign-hooks`, it only times a plain step alone and with three other runs' Monitors armed: the
cost their process-wide hooks put on a model they do not watch (why each run's Monitor is paused, untimed,
while the others take their steps).

With `--torch-ops`, Monitor rows with nnvitals' compiled CPU kernel switched off are added: the statistics
computed with torch ops, as on a GPU or an install without a C compiler.

With `--cockpit`, run under a Python that has `cockpit-for-pytorch` (see BENCHMARKS.md), it times
Cockpit's "economy" configuration instead, on the same network without BatchNorm (BackPACK cannot
extend BatchNorm in training mode), against nnvitals on that same network.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

VOCAB, CONTEXT, EMBED, WIDTH, DEPTH, BATCH = 27, 3, 10, 100, 6, 32


def deep_net(batchnorm: bool) -> nn.Sequential:
    torch.manual_seed(0)
    sizes = [EMBED * CONTEXT] + [WIDTH] * (DEPTH - 1) + [VOCAB]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b, bias=False))
        if batchnorm:
            layers.append(nn.BatchNorm1d(b))
        if i < DEPTH - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def lesson_model(batchnorm: bool = True) -> nn.Sequential:
    """The lesson's network whole: the character embedding, flattened, then deep_net."""
    return nn.Sequential(nn.Embedding(VOCAB, EMBED), nn.Flatten(), deep_net(batchnorm))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (4096, CONTEXT), generator=g), torch.randint(0, VOCAB, (4096,), generator=g)


class OwnRounds:
    """A Monitor that takes its steps only in its own rounds. Some of its hooks are process-wide (its forward hook
    until a sample has shown that the model's layers are called only inside the model's call, and the optimizer
    pre-hook that copies the weights): armed for its next sampled step, they would also run on the runs timed in
    between (three armed Monitors, one of them still learning, cost a plain step 7-9%: `--foreign-hooks`). Paused
    between its rounds (untimed, and only when armed), they do not; `pause()` keeps the weights' copy for the next
    update."""

    def __init__(self, monitor: Any):
        self.monitor, self.paused = monitor, False
        self.end()  # (armed for its first step already)

    def begin(self) -> None:
        if self.paused:
            self.monitor.resume()
            self.paused = False

    def end(self) -> None:
        if self.monitor._recorder.attached:
            self.monitor.pause()
            self.paused = True


class Trainer:
    """One training run that goes on across rounds, so one-time costs (first sampled step, caches) fall
    into the warm-up round and each timed round is the steady state."""

    def __init__(self, batchnorm: bool = True, every: int | None = None, kernel: bool = True):
        import nnvitals
        from nnvitals import probes

        self.probes, self.kernel = probes, probes._kernel if kernel else None

        self.model = lesson_model(batchnorm)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.X, self.Y = data()
        self.g = torch.Generator().manual_seed(2)
        self.monitor = nnvitals.Monitor(self.model, every=every).__enter__() if every else None
        self.every = every or 1
        self.rounds = OwnRounds(self.monitor) if self.monitor is not None else None
        self.step_times: list[float] = []  # every step's seconds, from the first step on
        self.phases: list[tuple[float, float, float, float]] | None = None  # (--cycle) forward, backward, opt, mon

    def __call__(self, steps: int) -> float:
        self.probes._kernel = self.kernel  # this configuration's way of reducing (restored by the next one)
        if self.rounds is not None:
            self.rounds.begin()
        start = time.process_time()
        clock, phases = time.process_time, self.phases
        for _ in range(steps):
            t0 = clock()
            ix = torch.randint(0, len(self.X), (BATCH,), generator=self.g)
            loss = nn.functional.cross_entropy(self.model(self.X[ix]), self.Y[ix])
            t1 = clock() if phases is not None else 0.0
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = clock() if phases is not None else 0.0
            self.opt.step()
            t3 = clock() if phases is not None else 0.0
            if self.monitor is not None:
                self.monitor.step(loss)
            t4 = clock()
            self.step_times.append(t4 - t0)
            if phases is not None:
                phases.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
        seconds = time.process_time() - start
        if self.rounds is not None:
            self.rounds.end()
        return seconds / steps


class CockpitTrainer:
    """The same network without BatchNorm (BackPACK cannot extend it in training mode) under Cockpit's
    "economy" configuration, tracking every `every` steps."""

    def __init__(self, every: int):
        from backpack import extend
        from cockpit import Cockpit
        from cockpit.utils import schedules
        from cockpit.utils.configuration import configuration

        # BackPACK extends the Linear/Tanh stack; the embedding lookup happens outside it.
        self.emb = nn.Embedding(VOCAB, EMBED)
        self.net = extend(deep_net(batchnorm=False))
        self.loss_fn = extend(nn.CrossEntropyLoss())
        self.per_example = nn.CrossEntropyLoss(reduction="none")
        self.opt = torch.optim.SGD([*self.emb.parameters(), *self.net.parameters()], lr=0.1)
        self.cockpit = Cockpit(list(self.net.parameters()),
                               quantities=configuration("economy", track_schedule=schedules.linear(every)))
        self.X, self.Y = data()
        self.g = torch.Generator().manual_seed(2)
        self.step = 0
        self.every = every
        self.step_times: list[float] = []

    def __call__(self, steps: int) -> float:
        start = time.process_time()
        for _ in range(steps):
            t0 = time.process_time()
            ix = torch.randint(0, len(self.X), (BATCH,), generator=self.g)
            out = self.net(self.emb(self.X[ix]).flatten(1))
            loss = self.loss_fn(out, self.Y[ix])
            losses = self.per_example(out, self.Y[ix])
            self.opt.zero_grad(set_to_none=True)
            info = {"batch_size": BATCH, "individual_losses": losses, "loss": loss, "optimizer": self.opt}
            with self.cockpit(self.step, info=info):
                loss.backward(create_graph=self.cockpit.create_graph(self.step))
            self.opt.step()
            self.step += 1
            self.step_times.append(time.process_time() - t0)
        return (time.process_time() - start) / steps


def typical_step(step_times: Sequence[float], every: int) -> float:
    """Seconds a step typically costs when one step in `every` is sampled: the median of the steps at each
    position of the cycle, averaged over the positions (which position is the sampled one does not
    matter: each is counted once)."""
    positions: list[list[float]] = [[] for _ in range(every)]
    for i, t in enumerate(step_times):
        positions[i % every].append(t)
    return statistics.mean(statistics.median(p) for p in positions if p)


def measure(configs: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, dict[str, float]]:
    """Round by round, each configuration in turn, in an order shuffled every round (a configuration's first
    steps run on caches the previous one left); per configuration the median of its per-round ratios to the
    first (plain) configuration's time in the same round."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    order = list(configs.items())
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name, fn in order:
            times[name].append(fn())
    base = next(iter(configs))
    result = {}
    for name in configs:
        ratios = [t / b for t, b in zip(times[name], times[base], strict=True)]
        result[name] = {"ms_per_step": 1000 * statistics.median(times[name]), "ratio": statistics.median(ratios)}
    return result


def foreign_hooks(steps: int) -> tuple[float, float]:
    """A plain step's median time alone and with three other runs' Monitors (every step, every 10th, every 100th)
    armed for their next sampled step: what their process-wide hooks cost a model they do not watch. Each step
    picks one of the two at random; the Monitors are paused or resumed in between, untimed."""
    plain, others = Trainer(), [Trainer(every=k) for k in (1, 10, 100)]
    for other in others:
        other(100)  # (the step before a sampled one for each: armed, then paused)
    held = [other.rounds for other in others if other.rounds is not None]
    pick = random.Random(0).choice
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(steps):
        armed = pick((False, True))
        for rounds in held:
            rounds.begin() if armed else rounds.end()
        plain(1)
        times[armed].append(plain.step_times[-1])
    skip = len(plain.step_times) // 10
    alone, under = (statistics.median(times[armed][skip // 2:]) for armed in (False, True))
    return alone, under


def cycle(rounds: int, steps: int, every: int = 10) -> tuple[float, list[list[float]]]:
    """Where a Monitor's time goes in a warm training loop: a plain run and a Monitor(every) run, rounds of
    `steps` in turn (order shuffled), each step's forward, backward, optimizer step and `mon.step()` timed; per
    position of the sampling cycle (0: the sampled step), the median of each part minus the plain run's, µs; and
    the plain run's median step, µs."""
    plain, watched = Trainer(), Trainer(every=every)
    for run in (plain, watched):
        run(steps)  # untimed: the one-time costs
        run.phases = []
    order = [plain, watched]
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for run in order:
            run(steps)
    assert plain.phases is not None and watched.phases is not None
    base = [statistics.median(p[i] for p in plain.phases) for i in range(4)]
    return 1e6 * statistics.median(plain.step_times[steps:]), [
        [1e6 * (statistics.median(p[i] for p in watched.phases[k::every]) - base[i]) for i in range(4)]
        for k in range(every)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=500, help="steps per round (a multiple of 100)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cockpit", action="store_true", help="time Cockpit economy (needs cockpit-for-pytorch)")
    ap.add_argument("--torch-ops", action="store_true", help="add Monitor rows without the compiled CPU kernel")
    ap.add_argument("--cycle", action="store_true",
                    help="only show where Monitor(every=10)'s time goes in the loop, position by position")
    ap.add_argument("--foreign-hooks", action="store_true",
                    help="only time a plain step alone and with three other runs' Monitors armed")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cycle:
        plain, parts = cycle(args.rounds, args.steps)
        print(f"Monitor(every=10) over a plain step, {args.rounds} rounds of {args.steps} steps each, medians in µs")
        print(f"{'position':28s} {'forward':>8s} {'backward':>9s} {'optimizer':>10s} {'mon.step':>9s} {'all':>7s}")
        for k, (f, b, o, m) in enumerate(parts):
            label = {0: "0 (the sampled step)", 1: "1 (the step after)", 9: "9 (the step before)"}.get(k, str(k))
            print(f"{label:28s} {f:+8.0f} {b:+9.0f} {o:+10.0f} {m:+9.0f} {f + b + o + m:+7.0f}")
        steps = [sum(part) for part in parts]
        total = sum(steps)
        print(f"{'the cycle':28s} {'':8s} {'':9s} {'':10s} {'':9s} {total:+7.0f}")
        # Two runs of the same loop differ by a steady few percent here (where their memory happens to lie): the
        # watched run's middle positions, where mon.step() only counts, are its own level for a plain step.
        own = statistics.median(steps[3:-2])
        print(f"plain step {plain:.0f} µs: the cycle adds {total / 10 / plain * 100:.1f}% a step; over the watched "
              f"run's own middle steps ({own:+.0f} µs) {(total - 10 * own) / 10 / plain * 100:.1f}%")
        return
    if args.foreign_hooks:
        alone, under = foreign_hooks(max(args.steps, 1000))
        print(f"plain step {alone * 1e6:.0f} us alone, {under * 1e6:.0f} us with three Monitors of other runs armed: "
              f"+{(under - alone) * 1e6:.0f} us ({(under / alone - 1) * 100:.1f}%)")
        return
    n = args.steps
    if args.cockpit:
        trainers: dict[str, Trainer | CockpitTrainer] = {
            "plain (no BatchNorm)": Trainer(batchnorm=False),
            "nnvitals every=1 (no BatchNorm)": Trainer(batchnorm=False, every=1),
            "nnvitals every=10 (no BatchNorm)": Trainer(batchnorm=False, every=10),
            "Cockpit economy every=1 (no BatchNorm)": CockpitTrainer(every=1),
            "Cockpit economy every=10 (no BatchNorm)": CockpitTrainer(every=10),
        }
    else:
        trainers = {
            "plain": Trainer(),
            # the same plain loop again: how far two identical runs differ here (the noise floor of this run)
            "plain again (noise floor)": Trainer(),
            "nnvitals Monitor(every=1)": Trainer(every=1),
            "nnvitals Monitor(every=10)": Trainer(every=10),
            "nnvitals Monitor(every=100)": Trainer(every=100),
        }
        if args.torch_ops:
            trainers |= {f"nnvitals Monitor(every={k}), torch ops": Trainer(every=k, kernel=False) for k in (1, 10)}
    for trainer in trainers.values():  # warm-up round, not timed: imports, caches, first sampled step
        trainer(n)
        trainer.step_times.clear()
    configs = {name: (lambda t=trainer: t(n)) for name, trainer in trainers.items()}
    result = measure(configs, args.rounds)
    plain = typical_step(next(iter(trainers.values())).step_times, 1)
    for name, trainer in trainers.items():
        typical = typical_step(trainer.step_times, trainer.every)
        result[name] |= {"typical_ms": 1000 * typical, "typical_ratio": typical / plain}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.rounds} interleaved rounds of {n} steps, {args.threads} thread; rounds: median of per-round "
          "ratios; typical: median step per position of the sampling cycle")
    print(f"{'configuration':42s} {'ms/step':>9s} {'x plain':>8s} {'typical ms':>11s} {'x plain':>8s}")
    for name, r in result.items():
        print(f"{name:42s} {r['ms_per_step']:9.3f} {r['ratio']:8.2f} {r['typical_ms']:11.3f} "
              f"{r['typical_ratio']:8.2f}")


if __name__ == "__main__":
    main()

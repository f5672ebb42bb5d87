"""benchmarks/peers.py and ab.py refuse arguments that cannot give a fair comparison (an error line and status 2);
ab.py compares two revisions in one process; the typical-step figure the benchmarks quote."""

import argparse
import importlib.machinery
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.modules import module as torch_module

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "peers.py"


def benchmark_module(name: str = "peers"):
    """A script under benchmarks/ (peers.py by default) imported as a module."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("args", "says"), [
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--models", "mlp", "--mlp-steps", "150"], "--mlp-steps must be a positive multiple of 100"),
    (["--models", "ddp", "--mlp-steps", "0"], "--mlp-steps must be a positive multiple of 100"),
    (["--models", "transformer", "--lm-steps", "15"], "--lm-steps must be a positive multiple of 10"),
])
def test_arguments_refused(args, says, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["peers.py", *args])
    assert benchmark_module().main() == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {says}") and out == ""


def test_refused_from_the_command_line():
    done = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr == "error: --rounds must be at least 1, got 0\n"


def test_ddp_on_cuda_needs_two_gpus(monkeypatch):
    peers = benchmark_module()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = argparse.Namespace(rounds=1, models=["ddp"], mlp_steps=300, lm_steps=20, device="cuda")
    assert "needs two GPUs, this machine has 1" in peers.refusal(args)
    args.models = ["mlp"]
    assert peers.refusal(args) is None


def test_mlp_starts_from_the_same_weights_every_time():
    peers = benchmark_module()
    first, _, _ = peers.mlp_task("cpu")
    torch.randn(100)  # whatever ran in between
    second, _, _ = peers.mlp_task("cpu")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                   strict=True))


def test_typical_step_spreads_the_sampled_step_over_the_cycle_and_ignores_a_burst():
    """The typical-step figure: one sampled step of 12 ms in each cycle of ten 2 ms steps costs 1 ms a step
    on top; a neighbour's 40 ms burst on one step moves the mean of the steps but not the typical figure."""
    typical_step = benchmark_module().typical_step
    times = [0.012 if i % 10 == 0 else 0.002 for i in range(100)]
    assert typical_step(times, 10) == pytest.approx(0.003)
    assert typical_step(times, 1) == pytest.approx(0.002)  # the plain figure: the median step
    burst = list(times)
    burst[37] = 0.040
    assert typical_step(burst, 10) == pytest.approx(0.003)
    assert sum(burst) / len(burst) > 0.0033


AB = Path(__file__).parents[1] / "benchmarks" / "ab.py"


def test_ab_compares_the_working_tree_with_a_revision_in_one_process():
    done = subprocess.run([sys.executable, str(AB), "HEAD", "--steps", "50"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("every=1, 50 steps each, 1 a turn, HEAD with ")
    assert [line.split()[0] for line in lines[1:]] == ["plain", "HEAD", "working"]
    assert all(line.endswith("us over plain") for line in lines[1:])


def test_ab_in_turns_shows_each_position_of_the_cycle():
    """With --turn each run takes its steps in a row; each Monitor's line ends with one figure per position of the
    sampling cycle, the sampled step's first and dearest."""
    done = subprocess.run([sys.executable, str(AB), "HEAD", "--every", "5", "--turn", "50", "--steps", "250"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("every=5, 250 steps each, 50 a turn, HEAD with ")
    assert lines[1].endswith("us over plain")
    for line in lines[2:]:
        positions = [float(x) for x in line.split("us over plain")[1].split()]
        assert len(positions) == 5 and positions[0] == max(positions)


@pytest.mark.parametrize(("args", "says"), [
    (["no-such-revision"], "error: cannot extract 'no-such-revision': "),
    (["HEAD", "--every", "0"], "error: need --every >= 1, --turn >= 1 and --steps >= 5 x both, got 0, 1 and 3000"),
    (["HEAD", "--turn", "700"], "error: need --every >= 1, --turn >= 1 and --steps >= 5 x both, got 1, 700 and 3000"),
])
def test_ab_refuses_what_it_cannot_compare(args, says):
    done = subprocess.run([sys.executable, str(AB), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith(says) and done.stderr.count("\n") == 1


def test_ab_builds_the_kernel_of_a_revision_whose_c_source_differs(tmp_path):
    """A/B across a kernel change measures each side with its own compiled kernel, not REV with torch ops."""
    root = AB.parents[1]
    last = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%H", "--", "src/nnvitals/_kernel.c"],
                          capture_output=True, text=True).stdout.strip()
    if not last:
        pytest.skip("no history of the kernel here (a shallow clone)")
    spec = importlib.util.spec_from_file_location("ab", AB)
    assert spec is not None and spec.loader is not None
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    assert ab.extract(f"{last}^", tmp_path) == "its own compiled kernel"
    source = (tmp_path / "nnvitals_ab" / "_kernel.c").read_text()
    assert source != (root / "src" / "nnvitals" / "_kernel.c").read_text()
    built = next((tmp_path / "nnvitals_ab").glob("_kernel*.so"))
    loader = importlib.machinery.ExtensionFileLoader("nnvitals_ab._kernel", str(built))
    kernel = importlib.util.module_from_spec(importlib.util.spec_from_loader("nnvitals_ab._kernel", loader))
    loader.exec_module(kernel)
    assert f"#define KERNEL_VERSION {kernel.VERSION}\n" in source


def test_forward_hooks_times_the_five_ways_a_forward_pass_can_be_watched():
    script = Path(AB).parent / "forward_hooks.py"
    done = subprocess.run([sys.executable, str(script), "--passes", "500"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("100 passes each, warm")
    rows = {line[:24].strip(): line[24:].split() for line in lines[2:]}
    assert list(rows) == ["plain", "hook that does nothing", "minimal hook", "minimal, gradient hook", "nnvitals"]
    assert rows["plain"][2:] == ["(+0,", "+0)"]
    assert all(float(cells[0]) > 0 and float(cells[1]) > 0 for cells in rows.values())


def test_overhead_rounds_leave_no_monitor_hooks_on_the_other_configurations():
    """An armed Monitor's hooks are process-wide: overhead.py pauses it between its rounds, so the other
    configurations' steps run without them, and it still samples every 10th step with its updates measured."""
    overhead = benchmark_module("overhead")
    plain, every_step, every_10th = overhead.Trainer(), overhead.Trainer(every=1), overhead.Trainer(every=10)
    for _ in range(3):
        for trainer in (every_step, every_10th, plain):
            trainer(19)  # (ends on a step before a sampled one: armed, then paused)
            assert not torch_module._global_forward_hooks
    history = every_10th.monitor.history
    assert [row["step"] for row in history] == [0, 10, 20, 30, 40, 50]
    assert all(math.isfinite(ratio) for row in history[1:] for ratio in
               (p["update_ratio"] for p in row["params"].values() if p["update_ratio"] is not None))
    assert len(every_step.monitor.history) == 57


def test_peers_rounds_leave_no_monitor_hooks_on_the_other_watchers():
    peers = benchmark_module()
    clock = peers.Clock("cpu")
    runs = [peers.Run("mlp", watcher, every, "cpu", clock) for _, watcher, every in peers.configurations(True, [1, 10])]
    for _ in range(2):
        for run in runs:
            run(19)
            assert not torch_module._global_forward_hooks
    assert [row["step"] for row in runs[2].watcher.monitor.history] == [0, 10, 20, 30]


@pytest.mark.parametrize("args", [["--long", "25"], ["--every", "0"], ["--short", "50", "--long", "40"]])
def test_instructions_refuses_a_span_that_is_not_whole_cycles(args):
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "instructions.py"), *args], capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: --every must be positive") and len(done.stderr.splitlines()) == 1


def test_instructions_runs_the_watched_loop_it_counts():
    """The loop counted under valgrind, run as is: a few watched steps, with a sampled one, and exit 0."""
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "instructions.py"), "--loop", "10", "3", "10"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_gc_cost_refuses_runs_too_short_to_see_a_collection():
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "gc_cost.py"), "--steps", "50"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: --steps must be at least 1000")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_profile_step_refuses_a_gpu_that_is_not_there():
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "profile_step.py"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: --device cuda needs a CUDA GPU")


def test_profile_step_shows_what_a_watched_step_adds():
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "profile_step.py"), "--steps", "3", "--top", "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("plain", "Monitor(every=1)"))]
    assert [row[0] for row in rows] == ["plain", "Monitor(every=1)"]
    assert all(float(row[1]) > 0 for row in rows)  # ms a step
    assert "Operators the watched step adds" in done.stdout

"""examples/ddp_train.py under torchrun: two CPU processes (gloo), findings printed once, by rank 0."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "examples" / "ddp_train.py"


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env)


def strict(constant: str) -> None:
    raise AssertionError(f"not strict JSON: {constant}")


def test_two_processes_report_small_batchnorm_batches_once():
    done = torchrun("--steps", "30", "--every", "10", "--batch", "8", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("2 processes (gloo), 8 examples each per step")
    assert sum(line.startswith("step ") for line in lines) == 11  # one process prints the progress
    reports = [json.loads(line, parse_constant=strict) for line in lines if line.startswith("[")]
    assert len(reports) == 1  # rank 0's findings only
    small = [f for f in reports[0] if f["code"] == "batchnorm-small-batch"]
    assert len(small) == 6 and {f["evidence"]["batch"] for f in small} == {8}  # the six BatchNorm1d layers
    assert all("convert_sync_batchnorm" in f["fix"] for f in small)


@pytest.mark.skipif(torch.cuda.is_available(), reason="SyncBatchNorm runs on GPUs")
def test_sync_batchnorm_refused_without_gpus():
    # refused before any process group is set up, so a plain python run shows it
    done = subprocess.run([sys.executable, str(SCRIPT), "--sync-batchnorm"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "--sync-batchnorm needs GPUs" in done.stderr



def test_bad_value_under_torchrun_refused_once_without_a_traceback():
    done = torchrun("--steps", "0")
    assert done.returncode == 1  # torchrun's own status when a child fails; the child's is in its report
    assert re.search(r"exitcode\s*: 2 ", done.stderr), done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error: --steps must be at least 1, got 0" in line]
    assert len(errors) == 1, done.stderr[-2000:]  # rank 0 only
    assert 'ddp_train.py", line' not in done.stderr  # torchrun prints its own traceback, the script none


@pytest.mark.parametrize(("flag", "value", "says"), [("--steps", "-3", "--steps must be at least 1"),
                                                     ("--every", "0", "--every must be at least 1"),
                                                     ("--batch", "1", "--batch must be at least 2"),
                                                     ("--lr", "0", "--lr must be positive"),
                                                     ("--lr", "nan", "--lr must be positive")])
def test_bad_values_refused_before_the_process_group(flag, value, says):
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), flag, value], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 2 and f"error: {says}" in done.stderr and "Traceback" not in done.stderr


def test_only_rank_zero_says_why():
    env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--every", "0"], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 2 and done.stderr == ""


def test_refused_outside_torchrun():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--steps", "5"], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 2 and "error: run it under torchrun" in done.stderr
    assert "Traceback" not in done.stderr

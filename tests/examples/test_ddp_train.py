"""examples/ddp_train.py under torchrun: two CPU processes (gloo), findings printed once, by rank 0."""

import json
import os
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


def test_two_processes_report_small_batchnorm_batches_once():
    done = torchrun("--steps", "30", "--every", "10", "--batch", "8", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("2 processes (gloo), 8 examples each per step")
    assert sum(line.startswith("step ") for line in lines) == 11  # one process prints the progress
    reports = [json.loads(line) for line in lines if line.startswith("[")]
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

import os

import pytest
import torch

# Tiny models run faster on one thread on these machines; tests are not about speed.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def run_cli(capsys):
    """Run the nnvitals command in-process; returns (exit code, stdout, stderr)."""
    from nnvitals.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run

import json
import subprocess
import sys

import pytest


def test_baseline_json(run_cli):
    code, out, err = run_cli("baseline", "27", "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["classes"] == 27
    assert data["baseline"] == pytest.approx(3.2958, abs=1e-4)


def test_baseline_text_carries_meaning(run_cli):
    code, out, _ = run_cli("baseline", "27")
    assert code == 0
    assert "3.2958" in out and "27 classes" in out


def test_verdict_json_and_exit_codes(run_cli):
    code, out, _ = run_cli("verdict", "--classes", "27", "--loss", "27.88", "--json")
    data = json.loads(out)
    assert code == 1
    assert set(data) == {"classes", "loss", "baseline", "status", "message", "fix"}
    assert data["status"] == "too-high" and "bias" in data["fix"]
    code, out, _ = run_cli("verdict", "--classes", "27", "--loss", "3.31", "--json")
    assert code == 0 and json.loads(out)["status"] == "healthy"
    code, out, _ = run_cli("verdict", "--classes", "27", "--loss", "0.4", "--json")
    assert code == 1 and json.loads(out)["status"] == "too-low"


def test_tanh_json_negative_argument(run_cli):
    code, out, _ = run_cli("tanh", "-2", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"preactivation", "output", "local_derivative", "fraction_passed"}
    assert data["output"] == pytest.approx(-0.964, abs=1e-3)
    assert data["fraction_passed"] == pytest.approx(0.0707, abs=1e-4)


@pytest.mark.parametrize(
    "args, words",
    [
        (["baseline", "1"], "at least 2"),
        (["baseline", "x"], "whole number"),
        (["baseline", "2.5"], "whole number"),
        (["verdict", "--classes", "27", "--loss", "nan"], "finite"),
        (["verdict", "--classes", "27", "--loss", "inf"], "finite"),
        (["verdict", "--classes", "27", "--loss", "-0.5"], "negative"),
        (["verdict", "--classes", "27", "--loss", "abc"], "number"),
        (["verdict", "--classes", "27"], "--loss"),
        (["tanh", "nan"], "finite"),
        (["tanh", "-inf"], "finite"),
        (["tanh", "two"], "number"),
        (["nonsense"], "No such command"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(run_cli, args, words):
    code, out, err = run_cli(*args)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert words in lines[0]


def test_console_script_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "nnvitals.cli", "baseline", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr

import json
import textwrap

import pytest


def test_example_naive_has_findings_and_json(run_cli):
    code, out, _ = run_cli("check", "--example", "makemore-naive", "--json")
    assert code == 1
    data = json.loads(out)
    assert "start-loss-high" in [f["code"] for f in data["findings"]]
    assert data["baseline"] == pytest.approx(3.2958, abs=1e-4)


def test_example_healthy_exits_0_and_prints_table(run_cli):
    code, out, _ = run_cli("check", "--example", "deep-tanh-batchnorm")
    assert code == 0
    assert "No findings" in out and "BatchNorm1d" in out and "uniform baseline 3.30 for 27 classes" in out


def test_file_function_with_plots(run_cli, tmp_path):
    target = tmp_path / "net.py"
    target.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(10, 40), nn.Tanh(), nn.Linear(40, 5))
            nn.init.normal_(model[0].weight, std=3.0)
            return model, torch.randn(64, 10), torch.randint(0, 5, (64,))
    """))
    plots = tmp_path / "pics"
    code, out, err = run_cli("check", f"{target}:make", "--plots", str(plots))
    assert code == 1, err
    assert "saturated-activations" in out and "scale `0.weight` by" in out.replace("\n", " ")
    assert sorted(p.name for p in plots.iterdir()) == ["activations.png", "gradients.png", "saturation.png"]


@pytest.mark.parametrize("body, words", [
    (None, "no such file"),
    ("def other():\n    pass\n", "has no function 'make'"),
    ("def make():\n    return 1, 2\n", "must return (model, inputs, targets)"),
    ("def make():\n    return 'model', 1, 2\n", "torch.nn.Module"),
    ("import torch\ndef make():\n    m = torch.nn.Linear(3, 2)\n"
     "    return m, torch.randn(4, 5), torch.zeros(4).long()\n", "raised RuntimeError during the check"),
    ("raise ImportError('nope')\n", "failed to import"),
])
def test_bad_targets_exit_2_with_one_line(run_cli, tmp_path, body, words):
    target = tmp_path / "t.py"
    if body is not None:
        target.write_text(body)
    code, out, err = run_cli("check", f"{target}:make")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert words in err


@pytest.mark.parametrize("args", [["check"], ["check", "--example", "nope"], ["check", "x.py"],
                                  ["check", "--example", "makemore-naive", "--lr", "-1"]])
def test_bad_arguments_exit_2(run_cli, args):
    code, _, err = run_cli(*args)
    assert code == 2 and err.startswith("error: ")


def test_every_example_is_offered_by_the_command():
    from nnvitals.cli import EXAMPLE_NAMES  # kept in the CLI so that --help does not load torch
    from nnvitals.examples import EXAMPLES

    assert tuple(EXAMPLES) == EXAMPLE_NAMES

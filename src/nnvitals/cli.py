"""The `nnvitals` command: parses, calls the library, prints. Exit 0 ok, 1 findings, 2 bad input."""

from __future__ import annotations

import importlib
import json
import math
import sys
from typing import Any

import click
from rich.console import Console

from nnvitals import numbers


class _Commands(click.Group):
    """The command groups that live in their own modules are imported when used, not at start-up
    (the lab's imports torch, which takes seconds to load; the lesson's commands should start at once)."""

    elsewhere = {"lab": "nnvitals.lab.cli", "data": "nnvitals.lab.cli", "study": "nnvitals.study.cli",
                 "serve": "nnvitals.web.cli"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.elsewhere})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.elsewhere:
            command = getattr(importlib.import_module(self.elsewhere[name]), name)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, name)


@click.group(cls=_Commands, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nnvitals")
def app() -> None:
    """Diagnose a network's training health from the numbers that matter, and learn why."""


out = Console(highlight=False)
# Negative numbers ("nnvitals tanh -2") are values, not options.
NUMERIC_ARGS = {"ignore_unknown_options": True}


EXAMPLE_NAMES = ("makemore-naive", "makemore-fixed", "deep-tanh-unscaled", "deep-tanh-batchnorm")


class BadInput(Exception):
    """Raised by commands for input they cannot accept; main() prints it as one line, exit 2."""


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadInput(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise BadInput(f"{what} must be a finite number, got {text!r}")
    return value


def _classes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadInput(f"the number of classes must be a whole number of at least 2, got {text!r}") from None
    if value < 2:
        raise BadInput(f"the number of classes must be at least 2, got {value}")
    return value


AS_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@app.command(context_settings=NUMERIC_ARGS)
@click.argument("classes", metavar="V")
@AS_JSON
def baseline(classes: str, as_json: bool) -> None:
    """The loss of a uniform guess over V classes, -ln(1/V): where an untrained model should start."""
    v = _classes(classes)
    value = numbers.baseline_loss(v)
    if as_json:
        _emit_json({"classes": v, "baseline": value})
    else:
        out.print(f"{value:.4f}  (uniform baseline -ln(1/{v}) for {v} classes, in nats)")


@app.command(context_settings=NUMERIC_ARGS)
@click.option("--classes", required=True, metavar="V", help="Number of classes V (at least 2).")
@click.option("--loss", required=True, metavar="L", help="Loss measured before training.")
@AS_JSON
def verdict(classes: str, loss: str, as_json: bool) -> int:
    """Judge a starting loss against the uniform baseline: healthy, too-high or too-low.

    Exits 0 when healthy and 1 otherwise, like a linter.
    """
    v = _classes(classes)
    value = _number(loss, "the loss")
    if value < 0:
        raise BadInput(f"a cross-entropy loss cannot be negative, got {value:g}")
    result = numbers.judge_start_loss(value, v)
    if as_json:
        d = result.to_dict()
        _emit_json({k: d[k] for k in ("classes", "loss", "baseline", "status", "message", "fix")})
    else:
        colour = {"healthy": "green", "too-high": "red", "too-low": "yellow"}[result.status]
        out.print(f"[bold {colour}]{result.status}[/]  {result.message}", soft_wrap=True)
        out.print(f"fix: {result.fix}", soft_wrap=True)
    return 0 if result.status == "healthy" else 1


@app.command(context_settings=NUMERIC_ARGS)
@click.argument("x", metavar="X")
@AS_JSON
def tanh(x: str, as_json: bool) -> None:
    """What a tanh unit passes back: output tanh(x) and local derivative 1 - tanh(x)^2."""
    result = numbers.tanh_gradient(_number(x, "the pre-activation"))
    if as_json:
        _emit_json(result.to_dict())
        return
    out.print(f"tanh({result.preactivation:g}) = {result.output:.4f}")
    out.print(
        f"local derivative 1 - tanh^2 = {result.local_derivative:.4f}: the unit passes back "
        f"{100 * result.fraction_passed:.1f}% of the gradient it receives"
    )


SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _load_target(target: str) -> tuple[Any, ...]:
    """Import FILE.py and call FUNC() for `nnvitals check FILE.py:FUNC`."""
    import importlib.util
    from pathlib import Path

    path_text, sep, func_name = target.rpartition(":")
    if not sep or not path_text or not func_name:
        raise BadInput(f"expected FILE.py:FUNC, got {target!r}")
    path = Path(path_text)
    if not path.is_file():
        raise BadInput(f"no such file: {path_text}")
    spec = importlib.util.spec_from_file_location(f"nnvitals_target_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise BadInput(f"{path_text} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise BadInput(f"{path_text} failed to import: {type(e).__name__}: {e}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise BadInput(f"{path_text} has no function {func_name!r}")
    try:
        result = func()
    except Exception as e:
        raise BadInput(f"{func_name}() raised {type(e).__name__}: {e}") from None
    if not isinstance(result, tuple) or len(result) not in (3, 4):
        got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise BadInput(f"{func_name}() must return (model, inputs, targets) or (model, inputs, targets, loss_fn), "
                       f"got {got}")
    return result


@app.command()
@click.argument("target", required=False, metavar="FILE.py:FUNC")
@click.option("--example", type=click.Choice(list(EXAMPLE_NAMES)), help="Run a built-in example instead.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), help="Write the pictures (PNG) here.")
@click.option("--lr", "lr_text", metavar="LR", help="Learning rate, to judge the update-to-data ratio (plain SGD).")
@click.option("--trained", is_flag=True, help="The model is already trained: do not judge the starting loss.")
@AS_JSON
def check(target: str | None, example: str | None, plots_dir: str | None, lr_text: str | None, trained: bool,
          as_json: bool) -> int:
    """Diagnose a model from one batch: FUNC() returns (model, inputs, targets[, loss_fn]).

    Exits 0 when there is no warning or error, 1 when there is, 2 for bad input.
    """
    import torch

    import nnvitals
    from nnvitals.examples import EXAMPLES

    if (target is None) == (example is None):
        raise BadInput("give either FILE.py:FUNC or --example NAME "
                       f"(examples: {', '.join(EXAMPLE_NAMES)})")
    lr = None
    if lr_text is not None:
        lr = _number(lr_text, "the learning rate")
        if lr <= 0:
            raise BadInput(f"the learning rate must be positive, got {lr_text}")
    parts = EXAMPLES[example]() if example else _load_target(target or "")
    model, inputs, targets = parts[:3]
    loss_fn = parts[3] if len(parts) == 4 else None
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"the first value returned must be a torch.nn.Module, got {type(model).__name__}")
    try:
        report = nnvitals.check(model, inputs, targets, loss_fn, lr=lr, at_init=not trained)
    except Exception as e:
        raise BadInput(f"the model or its loss raised {type(e).__name__} during the check: {e}") from None
    plots = report.save_plots(plots_dir) if plots_dir else []
    if as_json:
        data = json.loads(report.to_json())
        data["plots"] = [str(p) for p in plots]
        _emit_json(data)
    else:
        _print_report(report, example or target or "")
        for p in plots:
            out.print(f"picture: {p}")
    return 0 if report.ok else 1


def _print_report(report: Any, title: str) -> None:
    from rich.table import Table

    table = Table(title=f"nnvitals check: {title}", title_justify="left")
    for col in ("layer", "op", "mean", "std", "saturated", "dead", "grad std"):
        table.add_column(col, justify="left" if col in ("layer", "op") else "right")
    for lay in report.layers:
        table.add_row(
            lay.name, lay.op, f"{lay.mean:+.3f}", f"{lay.std:.3f}",
            "" if lay.saturated is None else f"{100 * lay.saturated:.1f}%",
            "" if lay.dead is None else f"{lay.dead}/{lay.units}",
            "" if lay.grad_std is None else f"{lay.grad_std:.2e}")
    out.print(table)
    if report.loss is not None:
        base = f" (uniform baseline {report.baseline:.2f} for {report.classes} classes)" if report.baseline else ""
        out.print(f"loss {report.loss:.4f}{base}")
    if not report.findings:
        out.print("[green]No findings: the numbers look healthy.[/]")
    for f in report.findings:
        style = SEVERITY_STYLE[f.severity]
        out.print(f"[{style}]{f.severity}[/] [bold]{f.code}[/] at {f.where}")
        out.print(f"  {f.message}", markup=False, soft_wrap=True)
        out.print(f"  fix: {f.fix}", markup=False, soft_wrap=True)




def main(argv: list[str] | None = None) -> int:
    """Console entry point: turns bad input into one `error:` line and exit code 2."""
    try:
        result = app.main(args=argv, prog_name="nnvitals", standalone_mode=False)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help())
        return 0
    except click.UsageError as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return 2
    except click.exceptions.Abort:
        print("error: interrupted", file=sys.stderr)
        return 130
    except click.exceptions.Exit as e:
        return e.exit_code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

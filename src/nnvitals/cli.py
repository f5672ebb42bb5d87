"""The `nnvitals` command: parses, calls the library, prints. Exit 0 ok, 1 findings, 2 bad input."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import click
from rich.console import Console

from nnvitals import numbers


@click.group(no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nnvitals")
def app() -> None:
    """Diagnose a network's training health from the numbers that matter, and learn why."""

out = Console(highlight=False)
# Negative numbers ("nnvitals tanh -2") are values, not options.
NUMERIC_ARGS = {"ignore_unknown_options": True}


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
        out.print(f"[bold {colour}]{result.status}[/]  {result.message}")
        out.print(f"fix: {result.fix}")
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

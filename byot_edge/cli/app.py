"""The typer app and the one place a `ByotError` becomes a clean non-zero exit."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from byot_edge.errors import ByotError
from byot_edge.extras import error_for_missing


def _console(stderr: bool = False) -> Console:
    # Off a terminal (CI logs, `| tee`) rich lays tables out in 80 columns and cuts values
    # ("onnxrunt…"); give them room there. A terminal, or COLUMNS, keeps its own width.
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=200 if wide else None)


console = _console()
err_console = _console(stderr=True)


class _Group(TyperGroup):
    """Turns a ByotError raised by any command, or an optional library that is not
    installed, into one red line on stderr and exit code 2."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ByotError as e:
            _fail(e)
        except ModuleNotFoundError as e:
            command = f"by `byot-edge {ctx.invoked_subcommand}`" if ctx.invoked_subcommand else ""
            missing = error_for_missing(e, command)
            if missing is None:
                raise
            _fail(missing)


def _fail(error: ByotError) -> None:
    # escape: messages hold install hints like byot-edge[tensorrt], not rich markup
    err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False,
                      soft_wrap=True)
    raise typer.Exit(2) from None


app = typer.Typer(
    name="byot-edge",
    cls=_Group,
    help=(
        "Train self-distilled multi-exit CNNs (Be Your Own Teacher), export every exit to "
        "ONNX/TensorRT, and serve them as anytime models.\n\n"
        "Example: byot-edge train --dataset fashion-mnist --data-dir "
        "/usr/share/datasets/fashion-mnist --recipe quick --out runs/fmnist"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def main() -> None:
    app()

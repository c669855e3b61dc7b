"""The typer app and the one place a `ByotError` becomes a clean non-zero exit."""

from __future__ import annotations

from typing import Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from byot_edge.errors import ByotError

console = Console()
err_console = Console(stderr=True)


class _Group(TyperGroup):
    """Turns a ByotError raised by any command into one red line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ByotError as e:
            # escape: messages hold install hints like byot-edge[tensorrt], not rich markup
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False,
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

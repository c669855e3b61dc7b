"""The typer app and the one place a `ByotError` becomes a clean non-zero exit."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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


def output_file(path: Path | None, option: str) -> Path | None:
    """A file a command will write: refused up front if it cannot be one, so a long command
    does not fail at its very end."""
    if path is not None and path.is_dir():
        raise ByotError(f"{option} {path} is a folder; pass the name of a file to write "
                        "(in it or elsewhere)")
    if path is not None:
        _writable(path.parent, option, path)
    return path


def output_folder(path: Path, option: str) -> Path:
    """A folder a command will write into: refused up front where a file is in the way."""
    if path.exists() and not path.is_dir():
        raise ByotError(f"{option} {path} is a file; pass a folder to write into")
    _writable(path, option, path)
    return path


def _writable(folder: Path, option: str, path: Path) -> None:
    """`folder` can be written (made where missing), else a ByotError naming `option`."""
    from byot_edge.fileio import unwritable

    problem = unwritable(folder)
    if problem:
        raise ByotError(f"{option} {path}: {problem}; pass a path in a folder you can write")


def torch_device(name: str, option: str = "--device") -> str:
    """`name` if torch parses it as a device, else a ByotError naming the option."""
    import torch

    try:
        torch.device(name)
    except RuntimeError:
        raise ByotError(f"{option} {name!r} is not a device; use cpu, cuda or cuda:N") from None
    return name


N = TypeVar("N", int, float)


def csv_values(text: str, convert: Callable[[str], N], option: str, expect: str, *,
               minimum: N | None = None, count: int | None = None,
               empty_ok: bool = False) -> list[N]:
    """An option's comma-separated values ("1,8,32"; empty items skipped), else a ByotError
    naming the option and what it takes: `expect`, e.g. "positive integers like 1,8,32".
    `empty_ok`: an empty text means no values (not a mistake)."""
    if empty_ok and not text.strip():
        return []
    try:
        values = [convert(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if (not values or (count is not None and len(values) != count)
            or (minimum is not None and min(values) < minimum)):
        raise ByotError(f"{option} takes {expect}, got {text!r}")
    return values


def at_least(value: float | None, low: float, option: str) -> None:
    if value is not None and not value >= low:  # `not >=`: NaN fails too
        raise ByotError(f"{option} must be >= {low:g}, got {value}")


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

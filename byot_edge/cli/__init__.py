"""`byot-edge`: thin typer commands; each parses, calls one library function, prints.

Each area's commands live in their own module and register on the shared `app`.
"""

from byot_edge.cli import (  # noqa: F401  (importing registers the commands)
    bench,
    evaluate,
    export,
    runtime,
    serve,
    train,
    triton,
)
from byot_edge.cli.app import app, main

__all__ = ["app", "main"]

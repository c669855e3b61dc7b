"""Files written under temp names and renamed together once every check has passed.

An export writes several files and checks each before the command succeeds; a failed check
(or a crash) must leave no new file under a final name, so nothing is renamed until all are
written and checked, and every temp file is removed on failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from byot_edge.fileio import write_temp


class Staging:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._staged: dict[str, Path] = {}  # final name -> temp path

    def write(self, name: str, write: Callable[[BinaryIO], None]) -> Path:
        """Write `name` to a temp file beside its final place; returns the temp path."""
        tmp = write_temp(self.out_dir / name, write)
        self._staged[name] = tmp
        return tmp

    def write_bytes(self, name: str, data: bytes) -> Path:
        return self.write(name, lambda f: f.write(data))

    def path(self, name: str) -> Path:
        return self._staged[name]

    def drop(self, name: str) -> None:
        """Forget a staged file (checked, but not to be written: an int8 export's fp32 cuts)."""
        self._staged.pop(name).unlink(missing_ok=True)

    def commit(self) -> list[Path]:
        done = []
        for name, tmp in self._staged.items():
            final = self.out_dir / name
            os.replace(tmp, final)
            done.append(final)
        self._staged.clear()
        return done

    def discard(self) -> None:
        for tmp in self._staged.values():
            tmp.unlink(missing_ok=True)
        self._staged.clear()


@contextmanager
def staging(out_dir: Path) -> Iterator[Staging]:
    """A Staging that discards whatever was not committed when the block exits."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Staging(out_dir)
    try:
        yield stage
    finally:
        stage.discard()

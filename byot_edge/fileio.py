"""Atomic writes and hashes: a crash never leaves half a file under its real name."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO


def write_temp(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(f)` on a new temp file beside `path` and fsync it; returns the temp path
    (removed again if `write` fails). Renaming it into place is the caller's step."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        # mkstemp makes 0600 files; exported artifacts must be readable by a server that runs
        # as another user, as any file written with open() would be.
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


# write_temp's names: "." + the final name + "." + mkstemp's 8 random characters + ".tmp"
_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temps(folder: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temp files that `write_temp` left in `folder` when its process was killed
    mid-write (SIGKILL, OOM, power loss): they are never renamed, so they pile up. Only
    those of `names` (default: any). Call it only where nothing else writes into `folder`
    at the same time, e.g. as a run or an export starts."""
    folder, wanted = Path(folder), None if names is None else set(names)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = _TEMP.match(path.name)
        if m and (wanted is None or m["name"] in wanted) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write `path` through a temp file and a rename: never half a file under its name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def unwritable(folder: str | Path) -> str | None:
    """Why files cannot be written into `folder` (which `atomic_write` creates when it is
    missing), or None where they can: asked before a long command's work, so its output
    does not fail at the very end. Leaves nothing behind."""
    chain = (Path(folder).absolute(), *Path(folder).absolute().parents)
    missing = list(itertools.takewhile(lambda p: not p.exists(), chain))
    existing = chain[len(missing)]  # "/" always exists
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not missing:
        # os.access, not a probe file: nothing in the folder changes, not even its mtime
        return None if os.access(existing, os.W_OK | os.X_OK) else f"{existing} is not writable"
    # The first folder to create, created and removed: what mkdir will meet (as root,
    # os.access says yes where the kernel then refuses, as under /proc).
    try:
        missing[-1].mkdir()
        missing[-1].rmdir()
    except OSError as e:
        return f"cannot create {missing[-1]} ({e.strerror or e})"
    return None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

"""The backend interface: load named artifacts, run them on arrays (Polygraphy-runner style).

An artifact is named `exit{k}` (the network truncated at exit k: image -> logits),
`segment{k}` (section k-1's output -> section k's output and exit k's logits; the image
for k = 1, logits only for k = K) or `span{i}-{j}` (segments i..j as one: section i-1's
output -> section j's output and exit j's logits, without the branches of exits i..j-1; what
a cascade runs across exits that are switched off). Backends that can join segments at load
time (ONNX Runtime, PyTorch) have every span; engine-based ones only the segments, and the
cascade then chains those. Inputs and outputs are numpy arrays keyed by the tensor names
the manifest records for the file, so the anytime model never hard-codes a name.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.manifest import FileEntry, Manifest, files_precision

EXIT = "exit"
SEGMENT = "segment"
SPAN = "span"
_ARTIFACT = re.compile(r"^(exit|segment)([1-9][0-9]*)$")
_SPAN = re.compile(r"^span([1-9][0-9]*)-([1-9][0-9]*)$")


def artifact_name(kind: str, k: int) -> str:
    return f"{kind}{k}"


def span_name(first: int, last: int) -> str:
    """Segments first..last as one artifact; a span of one segment is that segment."""
    return artifact_name(SEGMENT, last) if first == last else f"{SPAN}{first}-{last}"


def parse_span(name: str) -> tuple[int, int] | None:
    """(first, last) of a span name with first < last, else None."""
    m = _SPAN.match(name)
    return (int(m.group(1)), int(m.group(2))) if m and int(m.group(1)) < int(m.group(2)) else None


def parse_artifact(name: str) -> tuple[str, int]:
    """(kind, exit): a span is reported as (SPAN, its last exit)."""
    span = parse_span(name)
    if span:
        return SPAN, span[1]
    m = _ARTIFACT.match(name)
    if not m:
        raise ByotError(f"unknown artifact {name!r}; artifacts are named exit1..exitK, "
                        "segment1..segmentK and span{i}-{j} (i < j)")
    return m.group(1), int(m.group(2))


@dataclass(frozen=True)
class ArtifactIO:
    """Tensor names of one artifact: its input, its logits and (not for the last segment
    nor a truncated exit) the section output that feeds the next segment."""

    input: str
    logits: str
    section: str | None = None


def default_io(kind: str, k: int, num_exits: int) -> ArtifactIO:
    """The exporter's names; used only where no file records them (the torch backend)."""
    inp = "image" if kind == EXIT or k == 1 else f"section{k - 1}"
    section = f"section{k}" if kind == SEGMENT and k < num_exits else None
    return ArtifactIO(inp, "logits", section)


def io_from_entry(entry: FileEntry, where: str) -> ArtifactIO:
    """Which recorded output is the logits ([batch, classes]) and which the section map."""
    if len(entry.inputs) != 1 or not 1 <= len(entry.outputs) <= 2:
        raise ByotError(f"{where} should have one input and one or two outputs, the manifest "
                        f"lists {len(entry.inputs)} and {len(entry.outputs)}; re-export it with "
                        "`byot-edge export`")
    outs = entry.outputs
    logits = [t for t in outs if len(t.shape) == 2] or [t for t in outs if t.name == "logits"]
    if len(logits) != 1:
        raise ByotError(f"cannot tell which output of {where} holds the logits (expected one "
                        f"[batch, classes] output, got {[t.shape for t in outs]}); re-export it "
                        "with `byot-edge export`")
    section = [t.name for t in outs if t is not logits[0]]
    return ArtifactIO(entry.inputs[0].name, logits[0].name, section[0] if section else None)


class Backend(ABC):
    """One inference engine serving a manifest's artifacts."""

    name: ClassVar[str]
    # The manifest file kinds this backend reads for exits and segments (None: no files).
    file_kinds: ClassVar[dict[str, str] | None] = None
    # Whether `_load` can build span{i}-{j} from segments i..j (see the module docstring).
    joins_segments: ClassVar[bool] = False
    # Whether two threads may call `run` at once (the server's audit runs beside requests).
    concurrent_runs: ClassVar[bool] = True

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._io: dict[str, ArtifactIO] = {}
        self._has: dict[str, bool] = {}

    @property
    @abstractmethod
    def device(self) -> str:
        """Where it runs, e.g. 'cpu (AMD EPYC)' or 'cuda:0 (NVIDIA H100)'; latency profiles
        are keyed by it."""

    @abstractmethod
    def _load(self, artifact: str) -> ArtifactIO:
        """Prepare `artifact` to run (verify, deserialise, allocate) and return its names."""

    @abstractmethod
    def _run(self, artifact: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...

    def has(self, artifact: str) -> bool:
        """Whether the manifest provides `artifact` for this backend (without loading it)."""
        if artifact not in self._has:  # asked on every request: remember the answer
            self._has[artifact] = self._provides(artifact)
        return self._has[artifact]

    def _provides(self, artifact: str) -> bool:
        kind, k = parse_artifact(artifact)
        if not 1 <= k <= self.manifest.num_exits:
            return False
        if kind == SPAN:
            first, last = parse_span(artifact)  # type: ignore[misc]
            return self.joins_segments and all(self.has(artifact_name(SEGMENT, j))
                                               for j in range(first, last + 1))
        if self.file_kinds is None:
            return True
        return self.file_kinds[kind] in self.manifest.exit(k).files

    def load(self, artifact: str) -> ArtifactIO:
        """Idempotent; raises ByotError when the artifact is missing or does not match."""
        if artifact not in self._io:
            kind, k = parse_artifact(artifact)
            self.manifest.exit(k)
            if kind == SPAN and not self.joins_segments:
                raise ByotError(f"the {self.name} backend cannot join segments into {artifact}; "
                                "run its segments one by one (the onnxruntime and torch "
                                "backends join them)")
            self._io[artifact] = self._load(artifact)
        return self._io[artifact]

    def run(self, artifact: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        io = self.load(artifact)
        if len(inputs) != 1 or io.input not in inputs:
            raise ByotError(f"{artifact} takes one input named {io.input!r}, got "
                            f"{sorted(inputs)}")
        return self._run(artifact, inputs)

    def file_entry(self, artifact: str) -> tuple[FileEntry, Path]:
        """The manifest's record of the artifact's file and its sha256-verified path."""
        assert self.file_kinds is not None
        kind, k = parse_artifact(artifact)
        file_kind = self.file_kinds[kind]
        path = self.manifest.file_path(k, file_kind)
        return self.manifest.exit(k).files[file_kind], path

    def files_precision(self) -> str:
        """What the files this backend runs compute in: "fp32", "fp16" or "int8" ("mixed"
        when the manifest lists several). A backend without files (torch) runs the fp32
        weights."""
        return files_precision(self.manifest,
                               None if self.file_kinds is None else self.file_kinds.values())

    def verify_files(self) -> None:
        """Check every file this backend would read against the manifest's sha256 now, so a
        server refuses a corrupt folder at start-up instead of failing its warm-up."""
        for kind in (self.file_kinds or {}).values():
            for entry in self.manifest.exits:
                if kind in entry.files:
                    self.manifest.file_path(entry.index, kind)

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release sessions, engines and buffers."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

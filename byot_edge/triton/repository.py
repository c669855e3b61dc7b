"""Write a Triton model repository from an exported deploy folder (`byot-edge triton-repo`).

    model_repository/
      byot/                 the cascade (Python backend): BLS over the models below, or
        config.pbtxt        AnytimeModel in-process (mode "inprocess")
        1/model.py
        1/repository.json   every file of the repository with its sha256, and what is where
        1/deploy/           the manifest (and, in-process, the files its backend reads)
      byot_segment1/ ...    one model per cascade segment, each with its dynamic batcher
      byot_span2_4/ ...     the spans the runtime would join for the calibrated plan

Every copied file is checked against the manifest's sha256 as it is copied; the cascade
model checks every file against repository.json when Triton loads it, and refuses to load
where one does not match.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

from byot_edge import __version__
from byot_edge.errors import ByotError, missing_dependency
from byot_edge.fileio import atomic_write, atomic_write_json, sha256_file
from byot_edge.manifest import (
    MANIFEST_NAME,
    SEGMENT_ONNX,
    SEGMENT_TRT,
    TRUNCATED_ONNX,
    TRUNCATED_TRT,
    FileEntry,
    Manifest,
    inside_folder,
    load_manifest,
)
from byot_edge.runtime.backends.base import SEGMENT, artifact_name, span_name
from byot_edge.triton import config as pbtxt
from byot_edge.triton.protocol import INPUT, OUTPUTS

SEGMENT_KINDS = ("python", "onnxruntime", "tensorrt")
MODES = ("bls", "inprocess")
RECORD = "repository.json"
RECORD_FORMAT = 1
DEPLOY = "deploy"


PYTHON_ENVIRONMENT = (
    "The Python-backend models import byot-edge {version}, numpy and onnxruntime: pip install "
    "'byot-edge[onnxruntime]=={version}' into the Python that Triton's Python-backend stub "
    "runs, or pack such an environment for the EXECUTION_ENV_PATH parameter, or name its "
    "site-packages in the server's PYTHONPATH (the models add it to their path)")
ENVIRONMENT = f"""# The byot-edge cascade (written by `byot-edge triton-repo`)

{PYTHON_ENVIRONMENT}.

1/repository.json lists every file of this repository with its sha256; the cascade refuses
to load where one differs. Write the repository again instead of editing it.
"""


@dataclass(frozen=True)
class RepoOptions:
    name: str = "byot"
    mode: str = "bls"  # or "inprocess"
    segments: str = "python"  # how the segment models run: python, onnxruntime, tensorrt
    max_batch: int = 32
    instances: int = 1  # per segment model (and the in-process model)
    cascade_instances: int = 2  # BLS cascade instances: requests that run concurrently
    max_queue_delay_us: int = 100
    threads: int = 0  # ONNX Runtime intra-op threads in Python-backend models; 0: its default

    def check(self) -> None:
        if self.segments not in SEGMENT_KINDS:
            raise ByotError(f"--segments must be one of {', '.join(SEGMENT_KINDS)}, got "
                            f"{self.segments!r}")
        if self.mode not in MODES:
            raise ByotError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ByotError(f"--name {self.name!r}: use letters, digits, _ and - only (it "
                            "names the model and its folder)")
        for option, value, low in (("--max-batch", self.max_batch, 1),
                                   ("--instances", self.instances, 1),
                                   ("--cascade-instances", self.cascade_instances, 1),
                                   ("--max-queue-delay-us", self.max_queue_delay_us, 0),
                                   ("--threads", self.threads, 0)):
            if value < low:
                raise ByotError(f"{option} must be >= {low}, got {value}")

    @property
    def backend(self) -> str:
        """The runtime backend whose latency profile describes the segment models."""
        return "tensorrt" if self.segments == "tensorrt" else "onnxruntime"


def model_name(name: str, artifact: str) -> str:
    return f"{name}_{artifact.replace('-', '_')}"


def model_source(kind: str) -> str:
    """The model.py this package ships for `kind` ("cascade" or "segment")."""
    return resources.files("byot_edge.triton").joinpath(f"model_py/{kind}.py").read_text()


def plan_spans(manifest: Manifest, options: RepoOptions) -> list[tuple[int, int]]:
    """(first, last) of the spans the calibrated plan runs, where the runtime joins segments
    (ONNX files; engines are chained segment by segment, as the TensorRT backend does)."""
    th = manifest.thresholds
    if th is None or options.segments == "tensorrt":
        return []
    plan = [k for k, v in enumerate(th.values, start=1) if v <= 1] + [manifest.num_exits]
    spans, prev = [], 0
    for k in plan:
        if k - prev > 1:
            spans.append((prev + 1, k))
        prev = k
    return spans


def _stream(src: Path, f: BinaryIO) -> None:
    with src.open("rb") as r:
        shutil.copyfileobj(r, f, 1 << 20)


class _Writer:
    """Collects every file written, with its hash, for repository.json."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, str] = {}

    def _inside(self, dest: Path) -> None:
        """Nothing is written outside the repository, whatever a path read from elsewhere
        (a manifest's file names) holds."""
        if not dest.resolve().is_relative_to(self.root.resolve()):
            raise ByotError(f"refusing to write {dest}: it lies outside the repository "
                            f"{self.root}; check the manifest's file paths")

    def copy(self, src: Path, dest: Path, sha256: str) -> None:
        self._inside(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, lambda f: _stream(src, f))
        if sha256_file(dest) != sha256:  # what was read is what the manifest hashed
            raise ByotError(f"{src} changed while it was copied; run the command again")
        self.files[dest.relative_to(self.root).as_posix()] = sha256

    def text(self, dest: Path, text: str) -> None:
        self._inside(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, lambda f: f.write(text.encode()))
        self.files[dest.relative_to(self.root).as_posix()] = sha256_file(dest)

    def data(self, dest: Path, data: bytes) -> None:
        self._inside(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, lambda f: f.write(data))
        self.files[dest.relative_to(self.root).as_posix()] = sha256_file(dest)


def _segment_kind(options: RepoOptions) -> str:
    return SEGMENT_TRT if options.segments == "tensorrt" else SEGMENT_ONNX


def _segment_config(model: str, entry: FileEntry, options: RepoOptions,
                    sha256: str) -> pbtxt.ModelConfig:
    gpu = options.segments == "tensorrt"
    batching = pbtxt.Batching(options.max_batch, options.instances, options.max_queue_delay_us,
                              "KIND_GPU" if gpu else "KIND_CPU")
    inputs = [pbtxt.tensor_from_spec(t) for t in entry.inputs]
    outputs = [pbtxt.tensor_from_spec(t) for t in entry.outputs]
    if options.segments == "python":
        return pbtxt.ModelConfig(model, inputs, outputs, batching, backend="python",
                                 parameters={"threads": str(options.threads),
                                             "sha256": sha256})
    platform = "tensorrt_plan" if gpu else "onnxruntime_onnx"
    return pbtxt.ModelConfig(model, inputs, outputs, batching, platform=platform)


def _write_model(w: _Writer, model: str, entry: FileEntry, options: RepoOptions,
                 src: Path | bytes) -> str:
    """One segment or span model; returns the path of its file in the repository."""
    folder = w.root / model
    dest = folder / "1" / ("model.plan" if options.segments == "tensorrt" else "model.onnx")
    if isinstance(src, Path):
        w.copy(src, dest, entry.sha256)
    else:
        w.data(dest, src)
    if options.segments == "python":
        w.text(folder / "1" / "model.py", model_source("segment"))
    rel = dest.relative_to(w.root).as_posix()
    config = _segment_config(model, entry, options, w.files[rel])
    w.text(folder / "config.pbtxt", pbtxt.render(config))
    return rel


def _joined(manifest: Manifest, first: int, last: int) -> tuple[FileEntry, bytes]:
    """Segments first..last as one ONNX graph, as the ONNX Runtime backend joins them."""
    try:
        import onnx
    except ImportError:
        raise missing_dependency("onnx", extra="onnxruntime",
                                 purpose="to join segments into spans") from None
    from byot_edge.runtime.backends.onnx_join import join_segments

    protos = [onnx.load(str(manifest.file_path(k, SEGMENT_ONNX))) for k in range(first, last + 1)]
    data = join_segments(protos).SerializeToString()
    a, b = manifest.exit(first).files[SEGMENT_ONNX], manifest.exit(last).files[SEGMENT_ONNX]
    return FileEntry(f"span{first}-{last}", "", a.inputs, b.outputs), data


def _write_segments(w: _Writer, manifest: Manifest, options: RepoOptions) -> dict[str, dict]:
    models: dict[str, dict] = {}
    kind = _segment_kind(options)
    for k in range(1, manifest.num_exits + 1):
        artifact = artifact_name(SEGMENT, k)
        src = manifest.file_path(k, kind)  # raises, with the re-export hint, where missing
        entry = manifest.exit(k).files[kind]
        model = model_name(options.name, artifact)
        models[artifact] = {"model": model, "file": _write_model(w, model, entry, options, src),
                            "manifest_sha256": entry.sha256}
    for first, last in plan_spans(manifest, options):
        artifact = span_name(first, last)
        entry, data = _joined(manifest, first, last)
        model = model_name(options.name, artifact)
        models[artifact] = {"model": model, "file": _write_model(w, model, entry, options, data)}
    return models


def _deploy_files(manifest: Manifest, options: RepoOptions) -> Iterator[tuple[str, FileEntry]]:
    """(kind, entry) of every file the in-process backend reads."""
    kinds = ((TRUNCATED_TRT, SEGMENT_TRT) if options.backend == "tensorrt"
             else (TRUNCATED_ONNX, SEGMENT_ONNX))
    for e in manifest.exits:
        for kind in kinds:
            if kind in e.files:
                yield kind, e.files[kind]


def _cascade_config(manifest: Manifest, options: RepoOptions) -> pbtxt.ModelConfig:
    gpu = options.segments == "tensorrt" and options.mode == "inprocess"
    count = options.cascade_instances if options.mode == "bls" else options.instances
    batching = pbtxt.Batching(options.max_batch, count, options.max_queue_delay_us,
                              "KIND_GPU" if gpu else "KIND_CPU")
    spec = manifest.input
    inputs = [pbtxt.Tensor(INPUT, pbtxt.datatype(spec.dtype), list(spec.shape))]
    outputs = [pbtxt.Tensor(name, f"TYPE_{wire}", dims) for name, wire, _, dims in OUTPUTS]
    return pbtxt.ModelConfig(options.name, inputs, outputs, batching, backend="python")


def write_repository(manifest_path: str | Path, out: str | Path,
                     options: RepoOptions | None = None) -> dict[str, Any]:
    """Write the repository into `out` (new or empty); returns what repository.json holds."""
    options = options or RepoOptions()
    options.check()
    manifest = load_manifest(manifest_path)
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise ByotError(f"{root} is not empty; pass a new folder to --out (or remove it)")
    root.mkdir(parents=True, exist_ok=True)
    w = _Writer(root)
    cascade = root / options.name / "1"
    manifest_src = manifest.root / MANIFEST_NAME
    w.copy(manifest_src, cascade / DEPLOY / MANIFEST_NAME, sha256_file(manifest_src))
    models: dict[str, dict] = {}
    if options.mode == "bls":
        models = _write_segments(w, manifest, options)
    else:
        for _, entry in _deploy_files(manifest, options):
            rel = inside_folder(entry.path, manifest.root)  # load_manifest refused others
            w.copy(manifest.root / rel, cascade / DEPLOY / rel, entry.sha256)
    w.text(cascade / "model.py", model_source("cascade"))
    w.text(root / options.name / "README.md", ENVIRONMENT.format(version=__version__))
    w.text(root / options.name / "config.pbtxt", pbtxt.render(_cascade_config(manifest, options)))
    record = {
        "format": RECORD_FORMAT, "byot_edge": __version__, "name": options.name,
        "mode": options.mode, "segments": options.segments, "backend": options.backend,
        "max_batch": options.max_batch, "threads": options.threads,
        "manifest": f"{options.name}/1/{DEPLOY}/{MANIFEST_NAME}",
        "python_environment": PYTHON_ENVIRONMENT.format(version=__version__),
        "models": models, "files": dict(sorted(w.files.items())),
    }
    atomic_write_json(cascade / RECORD, record)
    return record


def read_record(model_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """(repository root, repository.json) for the cascade model's folder."""
    model_dir = Path(model_dir).resolve()
    path = model_dir / "1" / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ByotError(f"cannot read {path} ({e}); write the repository again with "
                        "`byot-edge triton-repo`") from None
    if record.get("format") != RECORD_FORMAT:
        raise ByotError(f"{path} has format {record.get('format')}, this byot-edge reads "
                        f"{RECORD_FORMAT}; write the repository again with `byot-edge triton-repo`")
    return model_dir.parent, record


def verify_repository(root: Path, record: dict[str, Any]) -> None:
    """Every file repository.json lists, against its sha256; a ByotError names the first
    that is missing or differs."""
    for rel, sha in record["files"].items():
        path = root / rel
        if not path.is_file():
            raise ByotError(f"{path} is missing from the model repository; write it again "
                            "with `byot-edge triton-repo`")
        if sha256_file(path) != sha:
            raise ByotError(f"{path} does not match the sha256 in {record['name']}/1/{RECORD}: "
                            "the repository was changed after it was written; write it again "
                            "with `byot-edge triton-repo`")
    for artifact, model in record["models"].items():
        expected = model.get("manifest_sha256")
        if expected is not None and record["files"][model["file"]] != expected:
            raise ByotError(f"{artifact}'s file {model['file']} is not the one the manifest "
                            "lists; write the repository again with `byot-edge triton-repo`")


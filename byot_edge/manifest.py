"""The manifest: the one file the runtime needs to serve an exported model.

`manifest.json` sits beside the exported files; paths in it are relative to its folder.
It is validated against `manifest.schema.json` on load and on save, and every file is
checked against its sha256 before a backend loads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from byot_edge.errors import ByotError
from byot_edge.fileio import atomic_write_json, sha256_file
from byot_edge.profiles import LatencyProfile  # typed records; importable from here too

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Keys of `ExitEntry.files`. A truncated file maps the input image to exit k's logits; a
# segment file maps section k-1's output to (section k's output, exit k's logits).
TRUNCATED_ONNX = "onnx"
SEGMENT_ONNX = "segment_onnx"
TRUNCATED_TRT = "trt"
SEGMENT_TRT = "segment_trt"
FILE_KINDS = (TRUNCATED_ONNX, SEGMENT_ONNX, TRUNCATED_TRT, SEGMENT_TRT)
# What every exported file calls its logits output; a segment's other output is its section.
LOGITS = "logits"
# The files each backend runs, by its name (torch runs the fp32 weights): what a latency
# profile of that backend timed, so the precision its figures hold for.
BACKEND_FILES = {"onnxruntime": (TRUNCATED_ONNX, SEGMENT_ONNX),
                 "tensorrt": (TRUNCATED_TRT, SEGMENT_TRT)}


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]  # a str is a dynamic axis, e.g. "batch"
    dtype: str = "float32"


@dataclass
class FileEntry:
    path: str  # relative to the manifest's folder
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # Engines only: tensorrt version, gpu name, compute capability, precision, batch range...
    engine: dict[str, Any] | None = None
    # What the file computes in: "fp32" | "fp16" | "int8" (manifests older than int8 exports
    # have no such field: their files are fp32 ONNX, or engines whose record says).
    precision: str = "fp32"
    # int8 only: the images it was calibrated on (dataset, split, count, seed, sha256) and
    # the quantization scheme; see byot_edge/export/calibration_set.py and quantize.py.
    calibration: dict[str, Any] | None = None


@dataclass
class ExitEntry:
    index: int  # 1..K, K the deepest
    stage: str
    channels: int
    stride: int
    flops: int
    params: int
    val_accuracy: float | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)
    # At batch 1, counted by export: segment k without its branch (the stem too for k = 1),
    # and exit k's branch. A cascade's cost is their sums; None in manifests of older exports.
    section_flops: int | None = None
    branch_flops: int | None = None


@dataclass
class InputSpec:
    shape: list[int]  # [C, H, W]
    dtype: str = "float32"
    layout: str = "NCHW"
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class Thresholds:
    """Per-exit confidence thresholds for exits 1..K-1 (exit K always answers)."""

    criterion: str  # "max_softmax" | "entropy" | "margin"
    values: list[float]
    temperatures: list[float] | None = None
    source: str = ""  # what they were calibrated on
    expected: dict[str, float] = field(default_factory=dict)  # accuracy, cost... at calibration
    # Whose logits they were fitted on: a backend name and the precision of the files it ran.
    # Before calibration on the deployed engine existed, thresholds came only from `byot-edge
    # eval` logits, i.e. PyTorch in fp32: what manifests without these fields load as.
    backend: str = "torch"
    precision: str = "fp32"
    # criterion "gate": per exit 1..K-1, {"weights": [...], "bias": b} (runtime/gates.py)
    gates: list[dict[str, Any]] | None = None
    # What risk control promised (calibrate/risk.py, `Guarantee.as_dict`); None: the
    # thresholds are a point estimate on the calibration samples.
    guarantee: dict[str, Any] | None = None


@dataclass
class ValidationSplit:
    """The images training held out for validation (`train_val_split` of the training split
    with this fraction and seed): what `calibrate --data-dir` runs the deployed files on."""

    dataset: str
    fraction: float  # of the training split; 0: training held nothing out
    seed: int


@dataclass
class Manifest:
    model: dict[str, Any]  # ModelConfig as a dict: arch, num_classes, in_chans, ...
    class_names: list[str]
    input: InputSpec
    exits: list[ExitEntry]
    dataset: str = ""
    # The network's weights (state dict + model config), for the PyTorch backend.
    weights: FileEntry | None = None
    thresholds: Thresholds | None = None
    latency_profiles: list[LatencyProfile] = field(default_factory=list)
    # None in manifests exported before it was recorded.
    validation: ValidationSplit | None = None
    version: int = MANIFEST_VERSION
    root: Path = field(default=Path("."), repr=False, compare=False)  # not serialised

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def exit(self, k: int) -> ExitEntry:
        if not 1 <= k <= self.num_exits:
            raise ByotError(f"exit {k} does not exist: this model has exits 1..{self.num_exits}")
        return self.exits[k - 1]

    def file_path(self, k: int, kind: str, verify: bool = True) -> Path:
        """Absolute path of exit k's file of `kind`, checked against its sha256."""
        entry = self.exit(k).files.get(kind)
        if entry is None:
            raise ByotError(self._missing_file(k, kind))
        path = self.root / inside_folder(entry.path, self.root)
        if verify:
            verify_file(path, entry.sha256, k)
        return path

    def _missing_file(self, k: int, kind: str) -> str:
        segment, engine = kind.startswith("segment"), kind.endswith("trt")
        what = ("cascade segment" if segment else "file") + (" engine" if engine else " (ONNX)")
        flags = (" --segments" if segment else "") + (" --format trt" if engine else "")
        msg = (f"the manifest in {self.root} has no {what} for exit {k}; re-export with "
               f"`byot-edge export CHECKPOINT --out {self.root}{flags}`")
        alone = TRUNCATED_TRT if engine else TRUNCATED_ONNX
        have = [e.index for e in self.exits if alone in e.files]
        if have:
            msg += (", or ask for what this folder has: "
                    + " or ".join(f"--exit {i}" for i in have))
        return msg

    def weights_path(self, verify: bool = True) -> Path:
        if self.weights is None:
            raise ByotError(f"the manifest in {self.root} has no weights file for the torch "
                            "backend; re-export with `byot-edge export CHECKPOINT --out "
                            f"{self.root}`, or use --backend onnxruntime")
        path = self.root / inside_folder(self.weights.path, self.root)
        if verify:
            verify_file(path, self.weights.sha256)
        return path

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, latency_profiles=[]))  # profiles: their own JSON form
        d["latency_profiles"] = [p.to_dict() for p in self.latency_profiles]
        d.pop("root")
        return {"version": d.pop("version"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: Path = Path(".")) -> Manifest:
        def file_entry(f: dict[str, Any]) -> FileEntry:
            engine = f.get("engine")
            return FileEntry(f["path"], f["sha256"], [TensorSpec(**t) for t in f["inputs"]],
                             [TensorSpec(**t) for t in f["outputs"]], engine,
                             f.get("precision") or (engine or {}).get("precision", "fp32"),
                             f.get("calibration"))

        exits = [ExitEntry(**{**e, "files": {k: file_entry(v) for k, v in e["files"].items()}})
                 for e in d["exits"]]
        th = d.get("thresholds")
        weights = d.get("weights")
        val = d.get("validation")
        return cls(
            model=d["model"], class_names=d["class_names"], input=InputSpec(**d["input"]),
            exits=exits, dataset=d.get("dataset", ""),
            weights=file_entry(weights) if weights else None,
            thresholds=Thresholds(**th) if th else None,
            latency_profiles=[LatencyProfile.from_dict(p) for p in d.get("latency_profiles", [])],
            validation=ValidationSplit(**val) if val else None,
            version=d["version"], root=root,
        )

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path else self.root / MANIFEST_NAME
        d = self.to_dict()
        validate_manifest_dict(d, path)
        return atomic_write_json(path, d)


def files_precision(manifest: Manifest, kinds: Iterable[str] | None) -> str:
    """What the manifest's files of `kinds` compute in: "fp32", "fp16" or "int8" ("mixed"
    when they differ; "fp32" without files: the weights)."""
    found = {e.files[kind].precision for kind in (kinds or ()) for e in manifest.exits
             if kind in e.files}
    return found.pop() if len(found) == 1 else "mixed" if found else "fp32"


def backend_precision(manifest: Manifest, backend: str) -> str:
    """The precision of the files backend `backend` (by name) runs from this manifest."""
    return files_precision(manifest, BACKEND_FILES.get(backend))


def schema() -> dict[str, Any]:
    text = resources.files("byot_edge").joinpath("manifest.schema.json").read_text()
    return json.loads(text)


def validate_manifest_dict(d: dict[str, Any], where: str | Path = "manifest") -> None:
    import jsonschema

    try:
        jsonschema.validate(d, schema())
    except jsonschema.ValidationError as e:
        at = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ByotError(f"{where} is not a valid byot-edge manifest: at {at}: {e.message}; "
                        "re-export it with `byot-edge export`") from None


def load_manifest(path: str | Path) -> Manifest:
    """Load and validate `manifest.json` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ByotError(f"no manifest at {path}; export a model first with "
                        "`byot-edge export CHECKPOINT --out DIR` and pass DIR/manifest.json")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ByotError(f"{path} is not valid JSON ({e}); re-export with `byot-edge export`"
                        ) from None
    version = d.get("version") if isinstance(d, dict) else None
    if isinstance(version, int) and version > MANIFEST_VERSION:
        raise ByotError(f"{path} has manifest version {d['version']}, newer than this byot-edge "
                        f"reads ({MANIFEST_VERSION}); upgrade byot-edge")
    validate_manifest_dict(d, path)
    manifest = Manifest.from_dict(d, root=path.parent)
    check_consistency(manifest, path)
    check_paths(manifest)
    return manifest


def inside_folder(rel: str, root: Path) -> str:
    """`rel` where it names a file inside the manifest's folder, else a ByotError: an
    absolute path or a '..' would have every backend (and triton-repo, which copies the
    files) read or write outside the folder the manifest describes."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise ByotError(f"{root / MANIFEST_NAME} lists the file {rel!r} outside its folder: "
                        "a manifest's paths are relative to its folder and stay inside it "
                        "(no absolute path, no '..', '/' between folders); re-export it with "
                        "`byot-edge export`")
    return rel


def check_paths(manifest: Manifest) -> None:
    """Every file the manifest lists lies inside its folder (see `inside_folder`)."""
    entries = [f for e in manifest.exits for f in e.files.values()]
    for entry in entries + ([manifest.weights] if manifest.weights else []):
        inside_folder(entry.path, manifest.root)


# Scores lie in 0..1; a threshold above 1 (written as 2) switches an exit off.
THRESHOLD_OFF = 2.0


def check_consistency(manifest: Manifest, where: str | Path) -> None:
    """What the schema cannot say: lengths and ranges that depend on the model."""
    k, classes = manifest.num_exits, manifest.model.get("num_classes")
    fix = "re-export it with `byot-edge export` (or re-run `byot-edge calibrate`)"
    if classes is not None and len(manifest.class_names) != classes:
        raise ByotError(f"{where} lists {len(manifest.class_names)} class names for a "
                        f"{classes}-class model; {fix}")
    for profile in manifest.latency_profiles:
        profile.check(k)
    th = manifest.thresholds
    if th is None:
        return
    if len(th.values) != k - 1:
        raise ByotError(f"{where} has {len(th.values)} thresholds; a {k}-exit model needs "
                        f"{k - 1} (exits 1..{k - 1}; exit {k} always answers); {fix}")
    bad = [v for v in th.values if not (0 <= v <= 1 or v == THRESHOLD_OFF)]
    if bad:
        raise ByotError(f"{where} has thresholds {bad} outside [0, 1] (or "
                        f"{THRESHOLD_OFF:g} for an exit that is off); {fix}")
    if (th.criterion == "gate") != (th.gates is not None):
        raise ByotError(f"{where} has criterion {th.criterion!r} with"
                        f"{'' if th.gates is not None else 'out'} gates; gates go with "
                        f"criterion 'gate' only; {fix}")
    if th.gates is not None and len(th.gates) != k - 1:
        raise ByotError(f"{where} has {len(th.gates)} gates; a {k}-exit model needs {k - 1} "
                        f"(one per exit 1..{k - 1}); {fix}")
    if th.temperatures is not None and (len(th.temperatures) != k
                                        or any(t <= 0 for t in th.temperatures)):
        raise ByotError(f"{where} has temperatures {th.temperatures}; a {k}-exit model needs "
                        f"{k} positive ones; {fix}")


def verify_file(path: Path, sha256: str, k: int | None = None) -> None:
    which = f" (exit {k})" if k else ""
    if not path.is_file():
        raise ByotError(f"{path}{which} is listed in the manifest but missing; re-export it with "
                        "`byot-edge export`")
    actual = sha256_file(path)
    if actual != sha256:
        raise ByotError(f"{path}{which} does not match the manifest's sha256 (it was changed or "
                        "replaced after export); re-export it with `byot-edge export`")

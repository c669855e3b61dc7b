"""Datasets as in-memory uint8 arrays (numpy only: the runtime's bench reads them too).

Every supported dataset (CIFAR-10/100 python layout, MNIST/Fashion-MNIST idx files, an
ImageFolder tree, synthetic) becomes `uint8 [N, C, H, W]` + `int64 [N]` once, so training
never waits on a Python data pipeline (`byot_edge.data.Batches` augments them on the device).
"""

from __future__ import annotations

import codecs
import gzip
import importlib
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from byot_edge.errors import ByotError

# numpy 2 moved numpy.core to numpy._core (numpy 1.26 has only a stub of it, 1.24 none): the
# pickles' helpers come from whichever this numpy really has.
_NP_CORE = "numpy._core" if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else "numpy.core"
_multiarray = importlib.import_module(f"{_NP_CORE}.multiarray")
_numeric = importlib.import_module(f"{_NP_CORE}.numeric")

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # horizontal flips keep the label (not for digits)
    crop_pad: int


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           True, 4),
    "cifar100": DatasetInfo("cifar100", 3, 32, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), True, 4),
    "mnist": DatasetInfo("mnist", 1, 28, (0.1307,), (0.3081,), False, 2),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, (0.2860,), (0.3530,), True, 2),
    # ImageFolder: ImageNet statistics; the size is chosen with --image-size.
    "imagefolder": DatasetInfo("imagefolder", 3, 64, (0.485, 0.456, 0.406),
                               (0.229, 0.224, 0.225), True, 4),
    "synthetic": DatasetInfo("synthetic", 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True, 2),
}
SPLITS = ("train", "test")


@dataclass
class Arrays:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]

    def subset(self, index: np.ndarray) -> Arrays:
        return Arrays(self.images[index], self.labels[index], self.class_names)


def dataset_info(name: str, image_size: int | None = None) -> DatasetInfo:
    if name not in DATASETS:
        raise ByotError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    info = DATASETS[name]
    if image_size and name == "imagefolder":
        info = replace(info, input_size=image_size)
    return info


def load_arrays(dataset: str, data_dir: str | Path | None, split: str,
                image_size: int | None = None, download: bool = False) -> Arrays:
    """One split ("train" or "test") of a dataset as uint8 arrays."""
    dataset_info(dataset)
    if split not in SPLITS:
        raise ByotError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if dataset == "synthetic":
        train = split == "train"
        return synthetic_arrays(2000 if train else 500, seed=0 if train else 1)
    if data_dir is None:
        raise ByotError(f"--data-dir is required for {dataset}; " + _where_to_get(dataset))
    root = Path(data_dir).expanduser()
    if download:
        _download(dataset, root)
    if not root.is_dir():
        raise ByotError(f"data directory {root} does not exist; " + _where_to_get(dataset))
    if dataset in ("cifar10", "cifar100"):
        return _load_cifar(dataset, root, split)
    if dataset in ("mnist", "fashion-mnist"):
        return _load_idx(dataset, root, split)
    return _load_imagefolder(root, split, dataset_info("imagefolder", image_size).input_size)


def _where_to_get(dataset: str) -> str:
    return {
        "cifar10": "point it at a folder holding cifar-10-batches-py (the python version), "
                   "or add --download on a machine with internet",
        "cifar100": "point it at a folder holding cifar-100-python, or add --download on a "
                    "machine with internet",
        "mnist": "point it at a folder with the idx files (train-images-idx3-ubyte[.gz], ...), "
                 "or add --download on a machine with internet",
        "fashion-mnist": "on Debian/Ubuntu `sudo apt-get install dataset-fashion-mnist` puts it "
                         "in /usr/share/datasets/fashion-mnist; or add --download on a machine "
                         "with internet",
        "imagefolder": "point it at a folder with train/<class>/*.png and test/<class>/*.png",
    }[dataset]


def _download(dataset: str, root: Path) -> None:
    from torchvision import datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
           "fashion-mnist": tvd.FashionMNIST}.get(dataset)
    if cls is None:
        raise ByotError(f"--download is not available for {dataset}")
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types
        raise ByotError(f"downloading {dataset} failed ({e}); {_where_to_get(dataset)}") from None


def _find(root: Path, name: str) -> Path | None:
    """`name` in root or anywhere below it (torchvision nests raw files in <Name>/raw)."""
    if (root / name).exists():
        return root / name
    return next(iter(sorted(root.rglob(name))), None)


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dtypes and scalars and nothing else.

    pickle.load runs whatever callable a file names, so a doctored data_batch_1 could run
    code as whoever trains; CIFAR batches only ever name these numpy internals."""

    ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 2 era files say numpy.core, numpy 2 writes numpy._core
        **{(mod, "_reconstruct"): _multiarray._reconstruct
           for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(mod, "scalar"): _multiarray.scalar
           for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(mod, "_frombuffer"): _numeric._frombuffer
           for mod in ("numpy.core.numeric", "numpy._core.numeric")},
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol 2 pickles from Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch "
                                         "never holds (refused: unpickling it could run "
                                         "code)") from None


def read_cifar_batch(path: Path) -> dict:
    """One CIFAR python-layout file (a pickled dict) with str keys, unpickled safely."""
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as e:
        # Truncated or crafted bytes make the unpickler fail in many ways; all mean "bad".
        raise ByotError(f"{path} is not a readable CIFAR batch ({e}); re-extract the "
                        "dataset from the official archive") from None
    if not isinstance(d, dict):
        raise ByotError(f"{path} is not a CIFAR batch (a pickled dict); re-extract the dataset")
    # The official files unpickle to str keys; files re-written by Python 3 have bytes keys.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _load_cifar(dataset: str, root: Path, split: str) -> Arrays:
    folder = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"
    base = root if (root / ("batches.meta" if dataset == "cifar10" else "meta")).exists() \
        else _find(root, folder)
    if base is None:
        raise ByotError(f"no {folder} folder in {root}; " + _where_to_get(dataset))
    if dataset == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta = base / "batches.meta"
        names = _field(meta, read_cifar_batch(meta), "label_names")
        key = "labels"
    else:
        files = ["train" if split == "train" else "test"]
        names = _field(base / "meta", read_cifar_batch(base / "meta"), "fine_label_names")
        key = "fine_labels"
    missing = [f for f in files if not (base / f).is_file()]
    if missing:
        raise ByotError(f"{base} lacks {', '.join(missing)}; re-extract the dataset")
    images, labels = [], []
    for f in files:
        batch = read_cifar_batch(base / f)
        try:
            x = np.asarray(_field(base / f, batch, "data"), np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(_field(base / f, batch, key), np.int64).reshape(-1)
        except (ValueError, TypeError):
            x, y = np.zeros(0), np.zeros(1)
        if len(x) != len(y):
            raise ByotError(f"{base / f} does not hold 32x32 RGB images with one label each; "
                            "re-extract the dataset")
        images.append(x)
        labels.append(y)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return Arrays(np.concatenate(images), np.concatenate(labels), names)


def _field(path: Path, batch: dict, key: str) -> Any:
    if key not in batch:
        raise ByotError(f"{path} has no {key!r} entry, so it is not a {path.parent.name} "
                        "batch; re-extract the dataset")
    return batch[key]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ByotError(f"{path} could not be read ({e}); re-download the dataset") from None
    ndim = data[3] if len(data) > 4 else 0
    if len(data) < 4 + 4 * ndim or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ByotError(f"{path} is not an idx file of unsigned bytes; re-download the dataset")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ByotError(f"{path} is truncated ({body.size} of {int(np.prod(shape))} bytes); "
                        "re-download the dataset")
    return body.reshape(shape)


def _load_idx(dataset: str, root: Path, split: str) -> Arrays:
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        path = _find(root, f"{prefix}-{kind}") or _find(root, f"{prefix}-{kind}.gz")
        if path is None:
            raise ByotError(f"no {prefix}-{kind}[.gz] in {root}; " + _where_to_get(dataset))
        arrays.append(_read_idx(path))
    images, labels = arrays
    names = FASHION_CLASSES if dataset == "fashion-mnist" else [str(i) for i in range(10)]
    return Arrays(images[:, None].copy(), labels.astype(np.int64), names)


def _load_imagefolder(root: Path, split: str, size: int) -> Arrays:
    from PIL import Image, UnidentifiedImageError

    folder = next((root / s for s in ((split,) if split == "train" else ("test", "val"))
                   if (root / s).is_dir()), None)
    if folder is None:
        raise ByotError(f"{root} has no {split}/ folder; an ImageFolder dataset needs "
                        "train/<class>/*.jpg and test/<class>/*.jpg (or val/)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise ByotError(f"{folder} has no class folders; expected {folder}/<class>/*.jpg")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            try:
                with Image.open(path) as im:
                    rgb = im.convert("RGB").resize((size, size), Image.BILINEAR)
            except (UnidentifiedImageError, OSError):
                continue  # stray non-image files (README, .DS_Store) are skipped
            images.append(np.asarray(rgb).transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise ByotError(f"no readable images under {folder}")
    return Arrays(np.stack(images), np.asarray(labels, np.int64), classes)


def synthetic_arrays(n: int, *, num_classes: int = 10, size: int = 32, seed: int = 0) -> Arrays:
    """Learnable toy images for smoke tests: class c is a noisy bar at a class-given angle."""
    g = np.random.default_rng(seed)
    labels = g.integers(0, num_classes, n)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    angles = labels * np.pi / num_classes
    dist = np.abs(np.cos(angles)[:, None, None] * yy - np.sin(angles)[:, None, None] * xx)
    bar = (dist < 0.12).astype(np.float32)
    colour = g.uniform(0.5, 1.0, (n, 3, 1, 1))
    images = 255 * np.clip(bar[:, None] * colour + g.normal(0, 0.15, (n, 3, size, size)), 0, 1)
    return Arrays(images.astype(np.uint8), labels.astype(np.int64),
                  [f"angle{i}" for i in range(num_classes)])


def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a held-out validation split, the same for the same (n, fraction, seed)."""
    if not 0 <= val_fraction < 1:
        raise ByotError(f"--val-split must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    return np.sort(order[n_val:]), np.sort(order[:n_val])

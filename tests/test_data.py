"""Datasets (numpy only: these run in the compatibility job too, on numpy 1.x without torch)
and the training batches (torch)."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from byot_edge.datasets import dataset_info, load_arrays, synthetic_arrays, train_val_split
from byot_edge.errors import ByotError


def _write_idx(path, array, compress=True):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_idx_files_gzipped_or_not(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (6, 28, 28))
    labels = np.arange(6) % 10
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress=False)
    a = load_arrays("mnist", tmp_path, "train")
    assert a.images.shape == (6, 1, 28, 28) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images[:, 0], images)
    np.testing.assert_array_equal(a.labels, labels)


def test_truncated_idx_file_is_reported(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28)), compress=False)
    raw = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:-100])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4), compress=False)
    with pytest.raises(ByotError, match="truncated"):
        load_arrays("fashion-mnist", tmp_path, "test")


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(ByotError, match=r"does not exist.*apt-get install dataset-fashion-mnist"):
        load_arrays("fashion-mnist", tmp_path / "nope", "train")
    with pytest.raises(ByotError, match="no cifar-10-batches-py"):
        load_arrays("cifar10", tmp_path, "train")
    with pytest.raises(ByotError, match="--data-dir is required"):
        load_arrays("cifar10", None, "train")
    with pytest.raises(ByotError, match="unknown dataset 'svhn'"):
        load_arrays("svhn", tmp_path, "train")


def test_cifar_slice_loads(cifar_slice):
    train = load_arrays("cifar10", cifar_slice, "train")
    test = load_arrays("cifar10", cifar_slice, "test")
    assert train.images.shape == (5000, 3, 32, 32) and test.images.shape == (1000, 3, 32, 32)
    assert train.class_names[0] == "airplane" and set(np.unique(train.labels)) == set(range(10))


def test_corrupt_cifar_batch(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    (base / "batches.meta").write_bytes(b"not a pickle")
    with pytest.raises(ByotError, match="not a readable CIFAR batch"):
        load_arrays("cifar10", tmp_path, "test")


def test_imagefolder_skips_stray_files(tmp_path):
    for split in ("train", "test"):
        for c, colour in (("cat", 0), ("dog", 255)):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), (colour, 0, 0)).save(tmp_path / split / c / f"{i}.png")
        (tmp_path / split / "cat" / "README.txt").write_text("not an image")
    a = load_arrays("imagefolder", tmp_path, "train", image_size=16)
    assert a.images.shape == (6, 3, 16, 16) and a.class_names == ["cat", "dog"]
    assert a.images[a.labels == 1, 0].min() == 255


def test_val_split_is_disjoint_and_reproducible():
    tr, va = train_val_split(1000, 0.1, seed=3)
    assert len(va) == 100 and len(tr) == 900 and not set(tr) & set(va)
    _, va2 = train_val_split(1000, 0.1, seed=3)
    np.testing.assert_array_equal(va, va2)
    with pytest.raises(ByotError):
        train_val_split(10, 1.0, 0)


def test_random_crop_shifts_each_image_by_its_own_offset():
    torch = pytest.importorskip("torch")
    from byot_edge.data import _random_crop

    x = torch.arange(1, 33, dtype=torch.uint8).view(2, 1, 4, 4)
    out = _random_crop(x, 1, torch.tensor([1, 0]), torch.tensor([1, 2]))
    torch.testing.assert_close(out[0], x[0])  # offset (1, 1) is the identity
    # offset (0, 2): one zero row on top, shifted left by one with a zero column on the right
    expected = torch.zeros(4, 4, dtype=torch.uint8)
    expected[1:, :3] = x[1, 0, :3, 1:]
    torch.testing.assert_close(out[1, 0], expected)


def test_batches_train_and_eval():
    torch = pytest.importorskip("torch")
    from byot_edge.data import Batches

    a = synthetic_arrays(100)
    info = dataset_info("synthetic")
    imgs, labels = torch.from_numpy(a.images), torch.from_numpy(a.labels)
    train = Batches(imgs, labels, info, batch_size=32, train=True,
                    generator=torch.Generator().manual_seed(0), cutout=8)
    batches = list(train)
    assert len(batches) == len(train) == 3  # the ragged last batch is dropped in training
    assert batches[0][0].dtype == torch.float32 and batches[0][0].shape == (32, 3, 32, 32)
    evaluation = list(Batches(imgs, labels, info, batch_size=32, train=False))
    assert sum(len(y) for _, y in evaluation) == 100
    torch.testing.assert_close(torch.cat([y for _, y in evaluation]), labels)


def _cifar_folder(tmp_path, test_batch: bytes, protocol: int = 2):
    """A cifar-10-batches-py folder with a good batches.meta and the given test_batch bytes."""
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    meta = {"label_names": [f"c{i}" for i in range(10)]}
    (base / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    (base / "test_batch").write_bytes(test_batch)
    return tmp_path


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_load(tmp_path, protocol):
    data = np.random.default_rng(0).integers(0, 255, (3, 3072), dtype=np.uint8)
    batch = {b"data": data, b"labels": [1, 2, 3], b"filenames": [b"a.png"] * 3}
    a = load_arrays("cifar10", _cifar_folder(tmp_path, pickle.dumps(batch, protocol=protocol),
                                             protocol), "test")
    np.testing.assert_array_equal(a.images.reshape(3, -1), data)
    assert a.labels.tolist() == [1, 2, 3] and a.class_names[0] == "c0"


@pytest.mark.parametrize("core", ["numpy.core", "numpy._core"])
def test_cifar_batches_written_by_numpy_1_or_2_load_on_this_numpy(tmp_path, core):
    # The official batches name numpy.core (numpy 1), numpy 2 writes numpy._core; both load
    # on numpy 1.x and 2.x alike (on numpy 1.x this module once failed at import).
    data = np.random.default_rng(0).integers(0, 255, (2, 3072), dtype=np.uint8)
    raw = pickle.dumps({b"data": data, b"labels": [4, 5]}, protocol=2)
    # protocol 2 names globals as plain "module\nname\n" lines: rename the module in place
    raw = raw.replace(b"numpy._core.", b"numpy.core.").replace(b"numpy.core.", f"{core}.".encode())
    assert f"{core}.multiarray".encode() in raw
    a = load_arrays("cifar10", _cifar_folder(tmp_path, raw), "test")
    np.testing.assert_array_equal(a.images.reshape(2, -1), data)
    assert a.labels.tolist() == [4, 5]


class _Payload:
    """Unpickling this calls open(marker, "w"): code run by merely loading a 'dataset'."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": _Payload(marker), "labels": [0]}, protocol=2)
    folder = _cifar_folder(tmp_path, evil)
    with pytest.raises(ByotError, match=r"test_batch is not a readable CIFAR .*io.open.*run code"):
        load_arrays("cifar10", folder, "test")
    assert not marker.exists()


def test_cifar_batch_without_its_fields_is_reported(tmp_path):
    folder = _cifar_folder(tmp_path, pickle.dumps({"labels": [0]}))
    with pytest.raises(ByotError, match="no 'data' entry"):
        load_arrays("cifar10", folder, "test")
    (folder / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}))
    with pytest.raises(ByotError, match="one label each"):
        load_arrays("cifar10", folder, "test")

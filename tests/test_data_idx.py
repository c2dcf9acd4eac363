"""MNIST-style IDX folders: written here byte by byte, read back through load_data, and every defect one line."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from onnxconet import idx
from onnxconet.data import load_data
from onnxconet.errors import DataError


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array, written from the format's definition."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, size: int = 6) -> dict:
    """Four IDX files of images whose pixel (0, 0) encodes the sample index and whose label is index % 10."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, 100)):
        images = np.zeros((n, size, size), np.uint8)
        images[:, 0, 0] = np.arange(n) + offset
        images[:, 1:, :] = np.arange(n)[:, None, None] % 10 * 25
        labels = (np.arange(n) % 10).astype(np.uint8)
        arrays[prefix] = (images, labels)
        for kind, arr, nd in (("images", images, 3), ("labels", labels, 1)):
            name = f"{prefix}-{kind}-idx{nd}-ubyte"
            data = idx_bytes(arr)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_splits_official_test_and_stratified_val(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_folder(tmp_path / "f", gz=gz)
    s = load_data(f"fashion-mnist:{tmp_path / 'f'}", (1, 1, 6, 6), seed=3)
    assert (len(s.train), len(s.val), len(s.test)) == (50, 10, 20)  # 10 % of 6 per class rounds up to 1
    assert s.num_classes == 10 and s.input_shape == (1, 6, 6)
    # the test split is the t10k file in order: pixel (0, 0) carries 100 + index, labels index % 10
    for i in (0, 7, 19):
        x, y = s.test[i]
        raw = x * s.std[0] + s.mean[0]
        assert round(float(raw[0, 0, 0]) * 255) == 100 + i and int(y) == i % 10
    # validation: one image of each class, none of them in train
    val_ids = {round(float((s.val[i][0] * s.std[0] + s.mean[0])[0, 0, 0]) * 255) for i in range(len(s.val))}
    train_ids = {
        round(float((s.train[i][0] * s.std[0] + s.mean[0])[0, 0, 0]) * 255) for i in range(len(s.train))
    }
    assert sorted(i % 10 for i in val_ids) == list(range(10))
    assert not val_ids & train_ids and len(val_ids | train_ids) == 60
    assert np.array_equal(arrays["t10k"][1], np.array([int(s.test[i][1]) for i in range(20)]))


def test_mnist_prefix_dotted_names_and_resize(tmp_path: Path) -> None:
    root = tmp_path / "m"
    write_idx_folder(root, gz=False)
    for f in root.iterdir():
        f.rename(root / f.name.replace("-idx", ".idx"))  # train-images.idx3-ubyte, as some archives name them
    s = load_data(f"mnist:{root}", (1, 3, 12, 12), seed=0)
    assert s.test[0][0].shape == (3, 12, 12) and s.name.startswith("mnist:")


def test_train_samples_subset_is_stratified_and_seeded(tmp_path: Path) -> None:
    write_idx_folder(tmp_path / "f", n_train=200)
    spec = f"fashion-mnist:{tmp_path / 'f'}"
    a = load_data(spec, (1, 1, 6, 6), seed=1, train_samples=90)
    b = load_data(spec, (1, 1, 6, 6), seed=1, train_samples=90)
    full = load_data(spec, (1, 1, 6, 6), seed=1)
    assert len(a.train) == 90 and len(full.train) == 180 and len(a.val) == len(full.val) == 20
    labels = [int(a.train[i][1]) for i in range(90)]
    assert np.bincount(labels, minlength=10).tolist() == [9] * 10
    assert [float(a.train[i][0].sum()) for i in range(90)] == [float(b.train[i][0].sum()) for i in range(90)]
    assert len(load_data(spec, (1, 1, 6, 6), seed=1, train_samples=10**6).train) == 180
    with pytest.raises(DataError, match="--train-samples must be >= 1"):
        load_data(spec, (1, 1, 6, 6), seed=1, train_samples=0)


def _corrupt(root: Path, name: str, data: bytes) -> Path:
    path = root / name
    path.write_bytes(gzip.compress(data))
    return path


@pytest.mark.parametrize(
    "name,mutate,message",
    [
        (
            "train-images-idx3-ubyte.gz",
            lambda b: b"\x00\x00\x08\x01" + b[4:],
            "not a 3-dimensional unsigned-byte",
        ),
        (
            "train-labels-idx1-ubyte.gz",
            lambda b: b"\x00\x00\x0d\x01" + b[4:],
            "not a 1-dimensional unsigned-byte",
        ),
        ("train-images-idx3-ubyte.gz", lambda b: b[:-5], "truncated"),
        ("train-images-idx3-ubyte.gz", lambda b: b + b"\x00", "longer than its header says"),
        ("t10k-images-idx3-ubyte.gz", lambda b: b[:10], "truncated IDX header"),
        ("t10k-labels-idx1-ubyte.gz", lambda b: b[:8] + b[8:-1], "truncated"),
        ("train-images-idx3-ubyte.gz", lambda b: b[:4] + struct.pack(">i", 1 << 30) + b[8:], "over 4 GiB"),
    ],
)
def test_bad_idx_file_is_one_line_naming_it(tmp_path: Path, name: str, mutate, message: str) -> None:
    root = tmp_path / "f"
    write_idx_folder(root)
    good = gzip.decompress((root / name).read_bytes())
    path = _corrupt(root, name, mutate(good))
    with pytest.raises(DataError, match=message) as e:
        load_data(f"fashion-mnist:{root}", (1, 1, 6, 6))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_counts_that_disagree_and_missing_files(tmp_path: Path) -> None:
    root = tmp_path / "f"
    write_idx_folder(root)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(59, np.uint8))))
    with pytest.raises(DataError, match="59 labels for 60 images"):
        load_data(f"fashion-mnist:{root}", (1, 1, 6, 6))
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(60, np.uint8))))
    with pytest.raises(DataError, match=r"lacks t10k-images-idx3-ubyte\[\.gz\]"):
        load_data(f"fashion-mnist:{root}", (1, 1, 6, 6))
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"mnist:{tmp_path / 'nowhere'}", (1, 1, 6, 6))


def test_not_gzip_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "f"
    write_idx_folder(root)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read it") as e:
        load_data(f"fashion-mnist:{root}", (1, 1, 6, 6))
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value)


def test_debian_package_missing_says_how_to_get_it(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(idx, "DEBIAN_FOLDER", tmp_path / "absent")
    monkeypatch.setattr(idx.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*fashion-mnist:DIR"):
        load_data("fashion-mnist", (1, 1, 28, 28))


def test_debian_package_found_via_its_folder(monkeypatch, tmp_path: Path) -> None:
    write_idx_folder(tmp_path / "pkg")
    monkeypatch.setattr(idx, "DEBIAN_FOLDER", tmp_path / "pkg")
    s = load_data("fashion-mnist", (1, 1, 6, 6))
    assert len(s.test) == 20 and s.name == f"fashion-mnist:{tmp_path / 'pkg'}"

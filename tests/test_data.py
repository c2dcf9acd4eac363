"""Datasets: built-in digits, ImageFolder trees, CIFAR batches (safely unpickled), npz arrays."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from onnxconet.data import Splits, load_data, make_loaders, stratified_split
from onnxconet.errors import DataError

GRAY32 = (1, 1, 32, 32)
RGB16 = (1, 3, 16, 16)


def labels_of(ds: torch.utils.data.Dataset) -> np.ndarray:
    return np.array([int(ds[i][1]) for i in range(len(ds))])


# --- digits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_data("digits", GRAY32, seed=0)


def test_digits_shapes_and_sizes(digits: Splits) -> None:
    assert (digits.num_classes, digits.input_shape, digits.name) == (10, (1, 32, 32), "digits")
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert abs(len(digits.val) - 0.15 * 1797) < 15 and abs(len(digits.test) - 0.15 * 1797) < 15
    x, y = digits.train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and 0 <= int(y) < 10
    train_x = digits.train.tensors[0]
    assert abs(float(train_x.mean())) < 1e-3 and abs(float(train_x.std()) - 1) < 1e-2  # normalized


def test_digits_split_depends_only_on_seed_and_is_stratified(digits: Splits) -> None:
    again = load_data("digits", GRAY32, seed=0)
    other = load_data("digits", GRAY32, seed=1)
    assert torch.equal(digits.val.tensors[0], again.val.tensors[0])
    assert not torch.equal(digits.val.tensors[0], other.val.tensors[0])
    per_class = np.bincount(load_digits().target)  # 174..183 images per digit
    for part, share in ((digits.train, 0.70), (digits.val, 0.15), (digits.test, 0.15)):
        counts = np.bincount(part.tensors[1].numpy(), minlength=10)
        assert np.all(np.abs(counts - share * per_class) <= 1), counts


def test_stratified_split_has_no_overlap_and_covers_everything() -> None:
    labels = np.repeat(np.arange(5), [40, 3, 7, 1, 20])
    parts = stratified_split(labels, (0.7, 0.15, 0.15), seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert all(set(labels[p]) >= {0, 1, 2, 4} for p in parts)  # every class with >= 3 samples
    assert [p.tolist() for p in parts] == [p.tolist() for p in stratified_split(labels, (0.7, 0.15, 0.15), 3)]


def test_digits_to_rgb_other_size() -> None:
    splits = load_data("digits", (1, 3, 20, 24), seed=0, num_classes=10)
    x, _ = splits.val[0]
    assert x.shape == (3, 20, 24) and torch.equal(x[0], x[1])


def test_make_loaders_seeded_shuffle(digits: Splits) -> None:
    first = [next(iter(make_loaders(digits, 32, seed=5)[0]))[1] for _ in range(2)]
    other = next(iter(make_loaders(digits, 32, seed=6)[0]))[1]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], other)
    train, val, test = make_loaders(digits, 64, seed=0)
    xb, yb = next(iter(val))
    assert xb.shape == (64, 1, 32, 32) and yb.dtype == torch.long and test is not None


def test_class_count_mismatch() -> None:
    with pytest.raises(DataError, match=r"'digits'.*10 classes.*outputs 1000"):
        load_data("digits", GRAY32, num_classes=1000)


def test_unknown_spec_lists_forms() -> None:
    with pytest.raises(DataError, match="imagenet:/x.*accepted forms.*npz:FILE"):
        load_data("imagenet:/x", GRAY32)


# --- ImageFolder ---------------------------------------------------------------------------------


def write_images(
    root: Path, classes: dict[str, int], size: tuple[int, int] = (10, 12), mode: str = "RGB"
) -> None:
    rng = np.random.default_rng(0)
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_single_split(tmp_path: Path) -> None:
    write_images(tmp_path, {"cat": 5, "dog": 10})
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    splits = load_data(str(tmp_path), RGB16, seed=0, num_classes=2)
    assert (len(splits.train), len(splits.val), splits.test) == (12, 3, None)
    assert sorted(labels_of(splits.val)) == [0, 1, 1]
    x, _ = splits.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert labels_of(load_data(str(tmp_path), RGB16, seed=0).val).tolist() == labels_of(splits.val).tolist()


def test_image_folder_train_val_test_tree_to_gray(tmp_path: Path) -> None:
    write_images(tmp_path / "train", {"a": 2, "b": 2, "c": 1})
    write_images(tmp_path / "val", {"a": 1, "c": 1}, mode="L")  # class b absent from val
    write_images(tmp_path / "test", {"b": 1})
    splits = load_data(str(tmp_path), GRAY32, seed=0)
    assert splits.num_classes == 3 and len(splits.train) == 5
    assert labels_of(splits.val).tolist() == [0, 2]  # indices follow train's classes
    assert labels_of(splits.test).tolist() == [1]
    assert splits.val[0][0].shape == (1, 32, 32)


def test_image_folder_val_with_unknown_class(tmp_path: Path) -> None:
    write_images(tmp_path / "train", {"a": 1})
    write_images(tmp_path / "val", {"zebra": 1})
    with pytest.raises(DataError, match=r"val.*zebra"):
        load_data(str(tmp_path), RGB16)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        load_data(str(tmp_path / "nope"), RGB16)
    with pytest.raises(DataError, match=f"{tmp_path}.*no class subfolders"):
        load_data(str(tmp_path), RGB16)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=f"{tmp_path}.*no images"):
        load_data(str(tmp_path), RGB16)
    (tmp_path / "a" / "broken.png").write_bytes(b"this is no png")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        load_data(str(tmp_path), RGB16)


def test_truncated_image_fails_when_loaded_with_its_name(tmp_path: Path) -> None:
    write_images(tmp_path, {"a": 3, "b": 3}, size=(64, 64))
    path = tmp_path / "a" / "0.png"
    path.write_bytes(path.read_bytes()[:200])  # the header survives, the pixels do not
    splits = load_data(str(tmp_path), RGB16)
    with pytest.raises(DataError, match=r"cannot read image .*0\.png"):
        for ds in (splits.train, splits.val):
            for i in range(len(ds)):
                ds[i]


# --- CIFAR ---------------------------------------------------------------------------------------


def write_cifar(
    root: Path, kind: str = "cifar10", n: int = 20, protocol: int = pickle.HIGHEST_PROTOCOL
) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    names, key, classes = (
        ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10)
        if kind == "cifar10"
        else (["train", "test"], b"fine_labels", 100)
    )
    for name in names:
        batch = {
            b"batch_label": b"fake",
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            key: [i % classes for i in range(n)],
            b"filenames": [b"x.png"] * n,
        }
        if protocol == "numpy1":
            data = pickle.dumps(batch, protocol=2).replace(
                b"numpy._core.multiarray", b"numpy.core.multiarray"
            )
        else:
            data = pickle.dumps(batch, protocol=protocol)
        (root / name).write_bytes(data)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL, "numpy1"])
def test_cifar10_batches(tmp_path: Path, protocol: int | str) -> None:
    write_cifar(tmp_path, protocol=protocol)
    splits = load_data(f"cifar10:{tmp_path}", (1, 3, 32, 32), seed=0, num_classes=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    assert sorted(labels_of(splits.val)) == list(range(10))  # stratified 10%
    x, y = splits.test[3]
    assert x.shape == (3, 32, 32) and int(y) == 3
    assert len(splits.mean) == 3


def test_cifar100_resized_to_gray(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-100-python", "cifar100", n=200)  # the archive's folder is found
    splits = load_data(f"cifar100:{tmp_path}", (1, 1, 24, 24), seed=0, num_classes=100)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (100, 100, 200, 100)
    assert splits.train[0][0].shape == (1, 24, 24)


class _Exploit:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch PWNED",))


def test_cifar_malicious_pickle_is_rejected_without_running(tmp_path: Path, monkeypatch) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "PWNED"
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": []}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data_batch_3.*refusing to unpickle .*system"):
        load_data(f"cifar10:{tmp_path}", (1, 3, 32, 32))
    assert not marker.exists()


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'none'} does not exist"):
        load_data(f"cifar10:{tmp_path / 'none'}", (1, 3, 32, 32))
    write_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataError, match=f"{tmp_path} lacks test_batch"):
        load_data(f"cifar10:{tmp_path}", (1, 3, 32, 32))
    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"test_batch: not a readable CIFAR batch"):
        load_data(f"cifar10:{tmp_path}", (1, 3, 32, 32))
    with pytest.raises(DataError, match=f"cifar100:{tmp_path}.*100 classes.*outputs 10"):
        write_cifar(tmp_path, "cifar100")
        load_data(f"cifar100:{tmp_path}", (1, 3, 32, 32), num_classes=10)


# --- npz -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype"), [((60, 3, 16, 16), np.uint8), ((60, 16, 16), np.float32), ((60, 16, 16, 3), np.uint8)]
)
def test_npz_layouts(tmp_path: Path, shape: tuple[int, ...], dtype: type) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, shape).astype(dtype)
    y = np.arange(60) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    splits = load_data(f"npz:{tmp_path / 'd.npz'}", RGB16, seed=0, num_classes=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (42, 9, 9)
    assert sorted(labels_of(splits.test)) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    xs = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    assert xs.shape == (42, 3, 16, 16)
    assert abs(float(xs.mean())) < 1e-3 and abs(float(xs.std()) - 1) < 1e-2  # normalized by train stats


def test_npz_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    with pytest.raises(DataError, match=f"{path} does not exist"):
        load_data(f"npz:{path}", RGB16)
    np.savez(path, images=np.zeros((4, 8, 8)), y=np.zeros(4, int))
    with pytest.raises(DataError, match=f"{path} must hold arrays 'x' and 'y'"):
        load_data(f"npz:{path}", RGB16)
    np.savez(path, x=np.zeros((4, 8, 8)), y=np.zeros(5, int))
    with pytest.raises(DataError, match=f"{path}: y must be"):
        load_data(f"npz:{path}", RGB16)
    np.savez(path, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, int))
    with pytest.raises(DataError, match=f"{path}: not a readable"):
        load_data(f"npz:{path}", RGB16)
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=f"{path}: not a readable"):
        load_data(f"npz:{path}", RGB16)

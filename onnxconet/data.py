"""Datasets for training and evaluating candidates. Never downloads anything.

Specs accepted by :func:`load_data`:

- ``"digits"``: scikit-learn's bundled 8x8 digits (1797 images), upsampled to the model's size.
- ``"PATH"``: an ImageFolder tree, either with ``train/`` and ``val/`` (and optional ``test/``)
  subfolders, or a single folder of class subfolders split 80/20 by seed.
- ``"cifar10:PATH"`` / ``"cifar100:PATH"``: the CIFAR "python version" batches folder.
- ``"npz:FILE"``: arrays ``x`` (images) and ``y`` (integer labels).
- ``"fashion-mnist"``: Debian's ``dataset-fashion-mnist`` package; ``"fashion-mnist:DIR"`` and
  ``"mnist:DIR"``: any folder with the four standard IDX files (``.gz`` or not). The official
  10,000 test images are the test split; a stratified, seeded 10 % of train is validation.

Every sample is a float tensor of the model's (C, H, W): images are resized, grayscale is repeated
to 3 channels, RGB is turned to luminance for 1 channel, and values are normalized with the
dataset's mean and std (ImageNet's for ImageFolder trees, which mostly feed pretrained models).
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from onnxconet import idx
from onnxconet.errors import DataError

log = logging.getLogger(__name__)

SPEC_FORMS = (
    '"digits", a folder PATH (ImageFolder), "cifar10:PATH", "cifar100:PATH", "npz:FILE", '
    '"fashion-mnist", "fashion-mnist:DIR" or "mnist:DIR"'
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
_MAX_HEADER_CHECKS = 20000  # ImageFolder: open every image header up front below this many files


@dataclass
class Splits:
    """Train / validation / test datasets yielding ``(image (C, H, W) float tensor, label)``.

    Attributes:
        train: training samples.
        val: validation samples (used to score candidates during the search).
        test: held-out samples, or None when the source has none.
        num_classes: number of classes (labels are 0 .. num_classes - 1).
        input_shape: (C, H, W) of every sample.
        name: a short description of the source, for logs and reports.
        mean: per-channel mean subtracted from the [0, 1] images.
        std: per-channel std the images were divided by.
    """

    train: Dataset
    val: Dataset
    test: Dataset | None
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


def load_data(
    spec: str,
    input_shape: tuple[int, int, int, int],
    seed: int = 0,
    num_classes: int | None = None,
    train_samples: int | None = None,
) -> Splits:
    """Load a dataset and shape its samples for a model.

    Args:
        spec: one of :data:`SPEC_FORMS`.
        input_shape: the model's input shape (1, C, H, W); samples come out as (C, H, W).
        seed: fixes every split, independently of anything else.
        num_classes: the model's output size; when given it must equal the dataset's class count.
        train_samples: keep a stratified, seeded subset of this many training samples (validation
            and test are untouched); None keeps them all.

    Returns:
        The splits.

    Raises:
        DataError: the spec cannot be read or does not fit the model; the message says what to do.
    """
    spec = str(spec)
    if len(input_shape) != 4 or any(int(d) <= 0 for d in input_shape):
        raise DataError(
            f"input shape {tuple(input_shape)} for data {spec!r} must be (1, C, H, W) with C, H, W > 0"
        )
    shape = (int(input_shape[1]), int(input_shape[2]), int(input_shape[3]))
    if shape[0] not in (1, 3):
        raise DataError(
            f"data {spec!r}: the model takes {shape[0]} input channels; only 1 (grayscale) or 3 (RGB) "
            "images can be produced"
        )
    prefix, _, rest = spec.partition(":")
    if spec == "digits":
        splits = _load_digits(shape, seed)
    elif prefix in ("cifar10", "cifar100") and rest:
        splits = _load_cifar(prefix, Path(rest).expanduser(), shape, seed)
    elif prefix == "npz" and rest:
        splits = _load_npz(Path(rest).expanduser(), shape, seed)
    elif spec == "fashion-mnist" or (prefix in ("fashion-mnist", "mnist") and rest):
        root = Path(rest).expanduser() if rest else idx.debian_folder()
        splits = _load_idx(prefix, root, shape, seed)
    elif ":" in spec and not Path(spec).expanduser().exists():
        raise DataError(f"unknown data spec {spec!r}; accepted forms: {SPEC_FORMS}")
    else:
        splits = _load_folder(Path(spec).expanduser(), shape, seed)
    if num_classes is not None and num_classes != splits.num_classes:
        raise DataError(
            f"data {spec!r} has {splits.num_classes} classes but the model outputs {num_classes}; "
            "pick the matching dataset or build the model with that many classes"
        )
    if train_samples is not None:
        splits.train = _train_subset(splits.train, train_samples, seed, spec)
    log.info(
        "data %s: %d train / %d val / %s test samples, %d classes, samples %s",
        splits.name,
        len(splits.train),
        len(splits.val),
        len(splits.test) if splits.test is not None else "no",
        splits.num_classes,
        splits.input_shape,
    )
    return splits


def make_loaders(
    splits: Splits, batch_size: int, seed: int, num_workers: int = 0
) -> tuple[DataLoader, DataLoader, DataLoader | None]:
    """DataLoaders over the splits; only the training one shuffles, with a generator seeded by ``seed``.

    Args:
        splits: the datasets.
        batch_size: samples per batch.
        seed: seeds the training shuffle order.
        num_workers: loader worker processes (0 loads in the main process).

    Returns:
        (train_loader, val_loader, test_loader or None).
    """
    generator = torch.Generator().manual_seed(seed)
    common: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers}
    train = DataLoader(splits.train, shuffle=True, generator=generator, **common)
    val = DataLoader(splits.val, shuffle=False, **common)
    test = DataLoader(splits.test, shuffle=False, **common) if splits.test is not None else None
    return train, val, test


# --- splitting and image conversion ----------------------------------------------------------


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split indices class by class so each part keeps the class proportions.

    Args:
        labels: (N,) integer labels.
        fractions: the share of each part; the first part (train) takes what the others leave.
        seed: the only source of randomness.

    Returns:
        One sorted index array per fraction.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n = len(idx)
        # Every part gets at least one sample of a class that has enough for all parts, and
        # train keeps at least one.
        sizes = [max(1, int(n * f + 0.5)) if n >= len(fractions) else 0 for f in fractions[1:]]
        while sizes and sum(sizes) > n - 1 and max(sizes) > 1:
            sizes[sizes.index(max(sizes))] -= 1
        start = n - sum(sizes)
        parts[0].append(idx[:start])
        for k, size in enumerate(sizes, start=1):
            parts[k].append(idx[start : start + size])
            start += size
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def convert_images(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Convert a batch of [0, 1] images (N, C0, H0, W0) to (N, C, H, W).

    1 -> 3 channels repeats, 3 (or 4, alpha dropped) -> 1 takes the luminance; the size changes
    bilinearly (antialiased when shrinking).
    """
    c, h, w = shape
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] != c:
        if x.shape[1] == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and c == 1:
            x = (x * torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise DataError(f"cannot convert {x.shape[1]}-channel images to the model's {c} channels")
    if tuple(x.shape[2:]) != (h, w):
        shrink = x.shape[2] > h or x.shape[3] > w
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
    return x.contiguous()


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of (N, C, H, W) images, computed in float64."""
    x64 = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    std = x64.std(dim=1).clamp_min(1e-6)
    return tuple(x64.mean(dim=1).tolist()), tuple(std.tolist())


class ArrayImages(Dataset):
    """Images held as a (N, C0, H0, W0) uint8 or float array, converted sample by sample.

    Keeps large arrays (CIFAR) in their compact form; each item is converted to the model's
    (C, H, W), scaled to [0, 1] when uint8, and normalized.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        indices: np.ndarray,
        shape: tuple[int, int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.indices = indices
        self.shape = shape
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = int(self.indices[i])
        x = _to_unit(torch.from_numpy(np.ascontiguousarray(self.images[j : j + 1])))
        x = convert_images(x, self.shape)[0]  # (C, H, W)
        return (x - self.mean) / self.std, self.labels[j]

    @property
    def targets(self) -> torch.Tensor:
        """Labels of the samples of this dataset, in order."""
        return self.labels[torch.as_tensor(self.indices)]


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1]; floats pass as float32."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _array_splits(
    images: np.ndarray,
    labels: np.ndarray,
    parts: list[np.ndarray],
    shape: tuple[int, int, int],
    num_classes: int,
    name: str,
) -> Splits:
    """Splits over one image array; mean/std come from the training part at its native size."""
    mean, std = _array_stats(images, parts[0], shape[0])
    datasets = [ArrayImages(images, labels, p, shape, mean, std) for p in parts]
    test = datasets[2] if len(datasets) > 2 else None
    return Splits(datasets[0], datasets[1], test, num_classes, shape, name, mean, std)


def _array_stats(images: np.ndarray, indices: np.ndarray, channels: int) -> tuple[tuple, tuple]:
    """Per-channel mean/std over the selected images after channel conversion, in chunks."""
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for k in range(0, len(indices), 4096):
        x = _to_unit(torch.from_numpy(np.ascontiguousarray(images[indices[k : k + 4096]])))
        x = convert_images(x, (channels, x.shape[2], x.shape[3])).double()
        total += x.sum(dim=(0, 2, 3)).numpy()
        total_sq += (x * x).sum(dim=(0, 2, 3)).numpy()
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 1e-12))
    return tuple(mean.tolist()), tuple(std.tolist())


# --- digits ------------------------------------------------------------------------------------


def _load_digits(shape: tuple[int, int, int], seed: int) -> Splits:
    """scikit-learn's 8x8 digits (values 0..16), upsampled, 70/15/15 stratified, all in memory."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    x = convert_images(x, shape)  # (N, C, H, W)
    parts = stratified_split(labels, (0.70, 0.15, 0.15), seed)
    mean, std = _channel_stats(x[torch.from_numpy(parts[0])])
    x = (x - torch.tensor(mean).view(1, -1, 1, 1).float()) / torch.tensor(std).view(1, -1, 1, 1).float()
    y = torch.from_numpy(labels)
    train, val, test = (TensorDataset(x[torch.from_numpy(p)], y[torch.from_numpy(p)]) for p in parts)
    return Splits(train, val, test, 10, shape, "digits", mean, std)


# --- CIFAR python batches ----------------------------------------------------------------------

_CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": (["train"], ["test"], b"fine_labels", 100),
}
_CIFAR_SUBDIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
# What a CIFAR batch may reconstruct: numpy arrays and dtypes, and Python 2 byte strings.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),  # numpy's reduce for pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and nothing else callable."""

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise DataError(
            f"{self.source}: refusing to unpickle {module}.{name}; a CIFAR batch holds only numpy "
            "arrays and lists. Use the original CIFAR python-version files"
        )


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images (N, 3, 32, 32) uint8, labels (N,) int64)."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # any parse failure of a user file becomes one message
        raise DataError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(f"{path}: CIFAR batch must be a dict with b'data' and {label_key!r} entries")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or len(labels) != len(data):
        raise DataError(
            f"{path}: b'data' must be (N, 3072) uint8 with N labels, got {data.shape} {data.dtype} "
            f"and {len(labels)} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(kind: str, root: Path, shape: tuple[int, int, int], seed: int) -> Splits:
    """CIFAR-10/100 python batches; a seeded stratified 10% of train is the validation split."""
    if not root.exists():
        raise DataError(f"CIFAR folder {root} does not exist; pass the extracted python-version folder")
    if (root / _CIFAR_SUBDIRS[kind]).is_dir():
        root = root / _CIFAR_SUBDIRS[kind]
    train_files, test_files, label_key, num_classes = _CIFAR_FILES[kind]
    missing = [n for n in train_files + test_files if not (root / n).is_file()]
    if missing:
        raise DataError(
            f"CIFAR folder {root} lacks {', '.join(missing)}; pass the folder extracted from the "
            f"{kind} python-version archive"
        )
    train = [_read_cifar_batch(root / n, label_key) for n in train_files]
    test = [_read_cifar_batch(root / n, label_key) for n in test_files]
    images = np.concatenate([b[0] for b in train + test])
    labels = np.concatenate([b[1] for b in train + test])
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"CIFAR folder {root}: labels outside 0..{num_classes - 1}; is this {kind}?")
    n_train = sum(len(b[1]) for b in train)
    return _official_test_splits(images, labels, n_train, shape, num_classes, f"{kind}:{root}", seed)


def _official_test_splits(
    images: np.ndarray, labels: np.ndarray, n_train: int, shape, num_classes: int, name: str, seed: int
) -> Splits:
    """Splits of a source with an official test set (the samples after the first `n_train`): validation is a
    seeded, stratified 10 % of the training samples."""
    train_idx, val_idx = stratified_split(labels[:n_train], (0.9, 0.1), seed)
    test_idx = np.arange(n_train, len(labels), dtype=np.int64)
    return _array_splits(images, labels, [train_idx, val_idx, test_idx], shape, num_classes, name)


def _train_subset(train: Dataset, n: int, seed: int, spec: str) -> Dataset:
    """A stratified, seeded subset of ``n`` training samples (all of them when ``n`` >= the count)."""
    if n < 1:
        raise DataError(f"data {spec!r}: --train-samples must be >= 1, got {n}")
    labels = _labels_of(train)
    if n >= len(labels):
        return train
    keep, _ = stratified_split(labels, (n / len(labels), 1 - n / len(labels)), seed + 7919)
    return Subset(train, keep.tolist())


def _labels_of(ds: Dataset) -> np.ndarray:
    """The labels of a dataset, in order, without loading its images where the type allows."""
    if isinstance(ds, Subset):
        return _labels_of(ds.dataset)[np.asarray(ds.indices)]
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].numpy()
    if hasattr(ds, "targets"):
        return np.asarray(ds.targets)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]


# --- MNIST-style IDX files ---------------------------------------------------------------------


def _load_idx(kind: str, root: Path, shape: tuple[int, int, int], seed: int) -> Splits:
    """Four IDX files; the official test images are the test split, 10 % of train validation."""
    if not root.is_dir():
        raise DataError(f"{kind} folder {root} does not exist; pass {kind}:DIR with the four IDX files")
    train_x, train_y = idx.read_split(root, "train")
    test_x, test_y = idx.read_split(root, "t10k")
    if train_x.shape[2:] != test_x.shape[2:]:
        raise DataError(f"{root}: train images are {train_x.shape[2:]} but test images {test_x.shape[2:]}")
    labels = np.concatenate([train_y, test_y])
    images = np.concatenate([train_x, test_x])
    num_classes = int(labels.max()) + 1
    return _official_test_splits(images, labels, len(train_y), shape, num_classes, f"{kind}:{root}", seed)


# --- npz arrays --------------------------------------------------------------------------------


def _load_npz(path: Path, shape: tuple[int, int, int], seed: int) -> Splits:
    """``x`` (N,C,H,W | N,H,W | N,H,W,C; uint8 or float) and ``y`` (N,) ints; 70/15/15 stratified."""
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist; pass npz:FILE with arrays x and y")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise DataError(f"{path} must hold arrays 'x' and 'y', found {sorted(arrays.files)}")
            x, y = arrays["x"], arrays["y"]
    except DataError:
        raise
    except Exception as e:  # any parse failure of a user file becomes one message
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{path}: y must be (N,) with N = len(x); got x {x.shape} and y {y.shape}")
    if len(y) == 0:
        raise DataError(f"{path}: x and y are empty; add samples")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise DataError(f"{path}: y must hold integer labels 0..K-1, got dtype {y.dtype} and min {y.min()}")
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{path}: x must be uint8 or float, got {x.dtype}")
    x = _to_nchw(x, path)
    num_classes = int(y.max()) + 1
    parts = stratified_split(y, (0.70, 0.15, 0.15), seed)
    if len(parts[1]) == 0:
        raise DataError(f"{path}: too few samples per class to split 70/15/15; add samples")
    return _array_splits(x, y.astype(np.int64), parts, shape, num_classes, f"npz:{path}")


def _to_nchw(x: np.ndarray, path: Path) -> np.ndarray:
    """(N,H,W) -> (N,1,H,W); (N,H,W,C) -> (N,C,H,W) (a view); (N,C,H,W) unchanged.

    A 4-D array is channels-first when its axis 1 has 1, 3 or 4 entries (so an ambiguous shape
    such as (N, 3, 4, 3) is read as NCHW), else channels-last when axis 3 does.
    """
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3, 4):
        return x
    if x.ndim == 4 and x.shape[3] in (1, 3, 4):
        return x.transpose(0, 3, 1, 2)
    raise DataError(f"{path}: x must be (N,C,H,W), (N,H,W) or (N,H,W,C) with C in 1, 3, 4; got {x.shape}")


# --- ImageFolder -------------------------------------------------------------------------------


def _load_image(path: str, mode: str) -> Image.Image:
    """PIL loader that names the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path} ({e}); remove or replace the file") from e


class _FixedClassesFolder(ImageFolder):
    """ImageFolder with a given class list, so train/val/test agree on label indices."""

    def __init__(self, root: str, classes: list[str], **kwargs: Any) -> None:
        self._class_list = classes  # read by find_classes() during ImageFolder.__init__
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._class_list, {c: i for i, c in enumerate(self._class_list)}


def _folder_norm(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet mean/std (what pretrained models expect); its luminance for grayscale models."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (sum(w * v for w, v in zip(_LUMA, IMAGENET_MEAN, strict=True)),), (0.226,)


def _image_folder(root: Path, shape: tuple[int, int, int], classes: list[str] | None = None) -> ImageFolder:
    """An ImageFolder over ``root``, with the class list of ``classes`` when given (val/test)."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; pass an ImageFolder tree")
    # Hidden folders (.ipynb_checkpoints, .git) are not classes.
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DataError(f"image folder {root} has no class subfolders; put images in {root}/CLASS_NAME/")
    if classes is not None and set(found) - set(classes):
        extra = sorted(set(found) - set(classes))
        raise DataError(f"image folder {root} has classes {extra} that the training folder lacks")
    mean, std = _folder_norm(shape[0])
    tf = transforms.Compose(
        [transforms.Resize(shape[1:], antialias=True), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )
    loader = partial(_load_image, mode="L" if shape[0] == 1 else "RGB")
    try:
        ds = _FixedClassesFolder(str(root), classes or found, transform=tf, loader=loader, allow_empty=True)
    except (OSError, ValueError) as e:
        raise DataError(f"image folder {root}: {e}; check the folder") from e
    if len(ds) == 0:
        raise DataError(
            f"image folder {root} holds no images in its class subfolders; supported extensions: "
            f"{', '.join(IMG_EXTENSIONS)}"
        )
    empty = sorted(set(ds.classes) - {ds.classes[t] for t in ds.targets})
    if empty and classes is None:
        log.warning("image folder %s: classes %s have no images", root, empty)
    _check_headers(ds.samples, root)
    return ds


def _check_headers(samples: list[tuple[str, int]], root: Path) -> None:
    """Open every image header (or the first of each class in big trees) so bad files fail early."""
    if len(samples) > _MAX_HEADER_CHECKS:
        log.info("image folder %s: %d images, checking the first of each class only", root, len(samples))
        first: dict[int, tuple[str, int]] = {}
        for s in samples:
            first.setdefault(s[1], s)
        samples = list(first.values())
    for path, _ in samples:
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 -- parsing the header is the check
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {path} ({e}); remove or replace the file") from e


def _load_folder(root: Path, shape: tuple[int, int, int], seed: int) -> Splits:
    """ImageFolder: ``train/`` + ``val/`` (+ ``test/``) subfolders, or class folders split 80/20."""
    if not root.exists():
        raise DataError(f"data path {root} does not exist; pass one of {SPEC_FORMS}")
    if not root.is_dir():
        raise DataError(f"data path {root} is a file, not a folder; for arrays use npz:{root}")
    if (root / "train").is_dir():
        train = _image_folder(root / "train", shape)
        classes = train.classes
        test = _image_folder(root / "test", shape, classes) if (root / "test").is_dir() else None
        if (root / "val").is_dir():
            val = _image_folder(root / "val", shape, classes)
        else:
            log.info("image folder %s has train/ but no val/: holding out 20%% of train", root)
            train_idx, val_idx = _split_folder(train, 0.2, seed, root)
            train, val = Subset(train, train_idx.tolist()), Subset(train, val_idx.tolist())
    else:
        full = _image_folder(root, shape)
        classes = full.classes
        train_idx, val_idx = _split_folder(full, 0.2, seed, root)
        train, val, test = Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist()), None
    mean, std = _folder_norm(shape[0])
    return Splits(train, val, test, len(classes), shape, f"folder:{root}", tuple(mean), tuple(std))


def _split_folder(ds: Any, val_fraction: float, seed: int, root: Path) -> tuple[np.ndarray, np.ndarray]:
    train_idx, val_idx = stratified_split(np.asarray(ds.targets), (1 - val_fraction, val_fraction), seed)
    if len(val_idx) == 0:
        raise DataError(
            f"image folder {root} has too few images per class to hold out a validation split; "
            "add images or provide train/ and val/ subfolders"
        )
    return train_idx, val_idx

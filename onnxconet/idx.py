"""The IDX format of MNIST and Fashion-MNIST: four files, gzipped or not, read into numpy.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions),
one big-endian int32 per dimension, then the values in C order. MNIST-style datasets ship
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` (some archives write ``train-images.idx3-ubyte``). Every defect of a
user's file becomes one :class:`DataError` that names the file.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import numpy as np

from onnxconet.errors import DataError

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
_UBYTE = 0x08
_MAX_BYTES = 1 << 32  # refuse a header that declares more than 4 GiB of values


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one uint8 IDX file of ``ndim`` dimensions (``.gz`` decompressed on the fly).

    Raises:
        DataError: wrong magic number, a type other than unsigned bytes, a size that disagrees
            with the header, or a file that cannot be read; the message names the file.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
            if len(header) < 4 or header[:2] != b"\0\0" or header[2] != _UBYTE or header[3] != ndim:
                raise DataError(
                    f"{path}: not a {ndim}-dimensional unsigned-byte IDX file (magic "
                    f"{header[:4].hex() or 'missing'}, expected 000008{ndim:02x}); pass the original files"
                )
            if len(header) < 4 + 4 * ndim:
                raise DataError(f"{path}: truncated IDX header; the file is damaged, fetch it again")
            dims = tuple(int.from_bytes(header[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
            size = int(np.prod(dims, dtype=np.int64))
            if size > _MAX_BYTES:
                raise DataError(f"{path}: the header declares {dims} values, over 4 GiB; the file is damaged")
            data = f.read(size + 1)
    except DataError:
        raise
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read it ({type(e).__name__}: {e})") from e
    if len(data) != size:
        what = "truncated" if len(data) < size else "longer than its header says"
        raise DataError(f"{path}: {what} (header {dims} = {size} bytes, found {len(data)} or more)")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def find_file(root: Path, stem: str) -> Path:
    """The file for ``stem`` (e.g. ``train-images-idx3-ubyte``) in ``root``, gzipped or not."""
    dotted = stem.replace("-idx", ".idx")  # train-images.idx3-ubyte, as some archives name it
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root} lacks {stem}[.gz]; pass a folder holding the four standard IDX files")


def read_split(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 of ``prefix`` ("train" or "t10k")."""
    images_path = find_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = find_file(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}; "
            "the two files do not belong together"
        )
    if len(labels) == 0:
        raise DataError(f"{images_path}: holds no images")
    return images[:, None], labels


def debian_folder() -> Path:
    """The folder of Debian's ``dataset-fashion-mnist`` package, or a one-line error saying how to get it."""
    if (DEBIAN_FOLDER / "train-images-idx3-ubyte.gz").is_file():
        return DEBIAN_FOLDER
    if shutil.which("dpkg-query"):
        listing = subprocess.run(
            ["dpkg-query", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, check=False
        ).stdout
        for line in listing.splitlines():
            if line.endswith("/train-images-idx3-ubyte.gz"):
                return Path(line).parent
    raise DataError(
        f"data 'fashion-mnist': Debian's {DEBIAN_PACKAGE} package is not installed; run "
        f"`apt-get install {DEBIAN_PACKAGE}`, or pass fashion-mnist:DIR with the four IDX files"
    )

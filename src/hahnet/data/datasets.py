"""Data sets in memory: readers for CIFAR-10 (python/binary), image folders and IDX
(MNIST, Fashion-MNIST), a decode cache, seeded subsets, and batched crop+flip.

Every reader returns a :class:`Dataset` of uint8 NCHW tensors; every problem with the
files on disk raises a one-line :class:`DataError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import multiprocessing
import os
import pickle
import struct
import sys
import tarfile
import tempfile
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                   "horse", "ship", "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
IDX_PAD = 2  # 28x28 -> 32x32, so that VGG's five 2x2 poolings apply
_CACHE_VERSION = "1"
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# The only globals a CIFAR pickle may reference: numpy's array reconstruction (and the
# bytes constructor Python 3 writes at protocol 2).
_PICKLE_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class DataError(ValueError):
    """A data set on disk is missing, malformed or inconsistent (message: one line)."""


def _error(where: object, problem: str, fix: str) -> DataError:
    """A one-line DataError: '<where>: <problem>; <fix>'."""
    return DataError(" ".join(f"{where}: {problem}; {fix}".splitlines()))


@dataclass(frozen=True)
class ImageDataset:
    """One split: uint8 images (N, C, H, W), int64 labels (N,) and the class names."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Tensor | list[int]) -> ImageDataset:
        """The images at ``indices`` (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.images[idx].contiguous(), self.labels[idx], self.classes)

    def limit(self, n: int, seed: int = 0) -> ImageDataset:
        """A fixed random subset of ``n`` images (all if n >= len), drawn from ``seed``."""
        if n < 1:
            raise ValueError(f"limit: n must be >= 1, got {n}")
        if n >= len(self):
            return self
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[:n].sort().values)


@dataclass(frozen=True)
class Dataset:
    """A train/test pair read from ``source`` in one of the supported layouts."""

    name: str
    layout: str
    train: ImageDataset
    test: ImageDataset
    source: str

    def describe(self) -> str:
        """One line: name, layout, source, sizes, image shape and class count."""
        c, h, w = self.train.image_shape
        padded = (f", zero-padded from {h - 2 * IDX_PAD}x{w - 2 * IDX_PAD}"
                  if self.layout == "idx" else "")
        return (f"{self.name} ({self.layout} at {self.source}): {len(self.train)} train / "
                f"{len(self.test)} test, {c}x{h}x{w}{padded}, {len(self.train.classes)} classes")


def split_holdout(ds: ImageDataset, fraction: float,
                  seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Split into (train_part, heldout_part) with ``fraction`` held out, seeded, disjoint."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split_holdout: fraction must be in (0, 1), got {fraction}")
    k = min(max(1, round(fraction * len(ds))), len(ds) - 1)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return ds.subset(perm[k:].sort().values), ds.subset(perm[:k].sort().values)


def channel_stats(ds: ImageDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std in [0, 1] units, exact via 256-bin histograms."""
    hist = torch.stack([torch.bincount(ds.images[:, c].reshape(-1), minlength=256)
                        for c in range(ds.images.shape[1])]).to(torch.float64)
    p, v = hist / hist.sum(1, keepdim=True), torch.arange(256, dtype=torch.float64) / 255
    mean = p @ v
    std = (p @ v.square() - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# ---------------------------------------------------------------- validation

def _split(images: np.ndarray | Tensor, labels: np.ndarray | Tensor, classes: tuple[str, ...],
           where: object) -> ImageDataset:
    """Validate one split read from ``where`` and wrap it as an ImageDataset."""
    images, labels = (torch.as_tensor(a.copy() if isinstance(a, np.ndarray)
                                      and not a.flags.writeable else a) for a in (images, labels))
    fix = "re-download or re-extract the data set"
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise _error(where, f"images must be uint8 (N, C, H, W), got {images.dtype} "
                     f"{tuple(images.shape)}", fix)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or len(labels) == 0:
        raise _error(where, f"{images.shape[0]} images but labels of shape "
                     f"{tuple(labels.shape)}", fix)
    labels = labels.to(torch.int64)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= len(classes):
        raise _error(where, f"labels span [{lo}, {hi}] but there are {len(classes)} classes "
                     f"(valid: 0..{len(classes) - 1})", fix)
    return ImageDataset(images.contiguous(), labels.contiguous(), tuple(classes))


def _dataset(name: str, layout: str, train: ImageDataset, test: ImageDataset,
             source: Path) -> Dataset:
    """Check that train and test agree on classes and image shape; build the Dataset."""
    if train.classes != test.classes or train.image_shape != test.image_shape:
        raise _error(source, f"train ({len(train.classes)} classes, {train.image_shape}) and "
                     f"test ({len(test.classes)} classes, {test.image_shape}) disagree",
                     "use matching train and test splits")
    return Dataset(name, layout, train, test, str(source))


def _read_bytes(file: Path) -> bytes:
    """All (gunzipped if ``.gz``) bytes of a data file, or a DataError naming it."""
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as f:
                return f.read()
        return file.read_bytes()
    except FileNotFoundError:
        raise _error(file, "missing file", "restore it or re-extract the data set") from None
    except (OSError, EOFError) as e:
        raise _error(file, f"unreadable or truncated ({e})", "re-download the file") from None


# ---------------------------------------------------------------- CIFAR-10

class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array-reconstruction globals."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _unpickle(file: Path) -> dict[str, object]:
    """Load one CIFAR pickle (keys decoded to str), accepting only dict/ndarray/list/bytes."""
    data = _read_bytes(file)
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any malformed pickle: truncated, foreign globals, ...
        raise _error(file, f"not a CIFAR-10 pickle ({type(e).__name__}: {e})",
                     "re-download cifar-10-python.tar.gz") from None
    if not isinstance(obj, dict):
        raise _error(file, f"expected a dict, got {type(obj).__name__}", "re-download it")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_python_batch(file: Path, classes: tuple[str, ...]) -> ImageDataset:
    """One pickled batch: 'data' uint8 (N, 3072) RGB planes and 'labels' list."""
    d = _unpickle(file)
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072 or not isinstance(labels, list) \
            or not all(isinstance(y, int) for y in labels):
        raise _error(file, "expected 'data' uint8 (N, 3072) and 'labels' list", "re-download it")
    return _split(data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64), classes, file)


def _cifar(root: Path, layout: str, suffix: str, classes: tuple[str, ...],
           read_batch: Callable[[Path, tuple[str, ...]], ImageDataset]) -> Dataset:
    """CIFAR-10 from ``data_batch_1..5`` (train) and ``test_batch`` (test), each + suffix."""
    parts = [read_batch(root / f"data_batch_{i}{suffix}", classes) for i in range(1, 6)]
    train = ImageDataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                         classes)
    return _dataset("cifar10", layout, train, read_batch(root / f"test_batch{suffix}", classes), root)


def read_cifar_python(root: str | Path) -> Dataset:
    """CIFAR-10 "python version" (``cifar-10-batches-py``). Pickle is unsafe for untrusted
    files; the unpickler here only resolves numpy's array globals, which limits the damage."""
    root = Path(root)
    meta = _unpickle(root / "batches.meta").get("label_names")
    if not isinstance(meta, list) or not all(isinstance(n, (bytes, str)) for n in meta):
        raise _error(root / "batches.meta", "no 'label_names' list", "re-download it")
    classes = tuple(n.decode() if isinstance(n, bytes) else n for n in meta)
    return _cifar(root, "cifar-python", "", classes, _cifar_python_batch)


def _cifar_binary_batch(file: Path, classes: tuple[str, ...]) -> ImageDataset:
    """One binary batch: records of 1 label byte + 3072 pixel bytes."""
    raw = np.frombuffer(_read_bytes(file), dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise _error(file, f"{raw.size} bytes is not a whole number of 3073-byte records "
                     "(truncated?)", "re-download cifar-10-binary.tar.gz")
    rec = raw.reshape(-1, 3073)
    return _split(rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64), classes, file)


def read_cifar_binary(root: str | Path) -> Dataset:
    """CIFAR-10 binary version (``cifar-10-batches-bin``) with ``batches.meta.txt``."""
    root = Path(root)
    meta = root / "batches.meta.txt"
    classes = tuple(s.strip() for s in _read_bytes(meta).decode("utf-8", "replace").splitlines()
                    if s.strip())
    return _cifar(root, "cifar-binary", ".bin", classes, _cifar_binary_batch)


def _safe_extract(archive: Path, root: Path) -> None:
    """Extract a tar into ``root``, refusing links, devices and paths escaping ``root``."""
    base = root.resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            target = (base / m.name).resolve()
            if not (m.isfile() or m.isdir()) or (target != base and base not in target.parents):
                raise _error(archive, f"unsafe archive member {m.name!r}",
                             "download the archive again from the official site")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(base, members=members, **kwargs)


def download_cifar10(root: str | Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """Download and MD5-check the CIFAR-10 python archive, extract it into ``root`` and
    return ``root/cifar-10-batches-py``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=root, suffix=".tar.gz.part")
    tmp, digest = Path(tmp_name), hashlib.md5()
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                while chunk := resp.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as e:  # URLError, timeouts and refused connections are OSErrors
            raise _error(url, f"download failed ({e})", "download it manually, extract it and "
                         "pass --data <dir containing cifar-10-batches-py>") from None
        if digest.hexdigest() != md5:
            raise _error(url, f"MD5 {digest.hexdigest()} != expected {md5}",
                         "retry the download, or download it manually and pass --data")
        _safe_extract(tmp, root)
    finally:
        tmp.unlink(missing_ok=True)
    return root / "cifar-10-batches-py"


# ---------------------------------------------------------------- IDX

def _read_idx(file: Path, magic: int) -> np.ndarray:
    """An IDX array (uint8) after checking its magic number and size."""
    data = _read_bytes(file)
    ndim = 3 if magic == 2051 else 1
    if len(data) < 4 + 4 * ndim or struct.unpack(">I", data[:4])[0] != magic:
        raise _error(file, f"bad magic number (expected {magic})", "re-download the file")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise _error(file, f"{payload.size} data bytes but the header says {dims} "
                     "(truncated?)", "re-download the file")
    return payload.reshape(dims)


def read_idx(root: str | Path) -> Dataset:
    """MNIST-style IDX files (optionally .gz); images are zero-padded by 2 px on each side
    (28x28 -> 32x32) so that VGG's five 2x2 poolings apply."""
    root = Path(root)
    name = "fashion-mnist" if "fashion" in str(root.absolute()).lower() else "mnist"
    classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else tuple("0123456789")
    files = {k: _idx_file(root, stem) for k, stem in IDX_FILES.items()}
    pad = ((0, 0), (IDX_PAD, IDX_PAD), (IDX_PAD, IDX_PAD))
    splits = [_split(np.pad(_read_idx(files[f"{s}_images"], 2051), pad)[:, None],
                     _read_idx(files[f"{s}_labels"], 2049).astype(np.int64), classes,
                     files[f"{s}_labels"]) for s in ("train", "test")]
    return _dataset(name, "idx", *splits, root)


def _idx_file(root: Path, stem: str) -> Path:
    """``root/stem`` or ``root/stem.gz``, whichever exists (the plain name if neither)."""
    gz = root / f"{stem}.gz"
    return gz if gz.exists() and not (root / stem).exists() else root / stem


# ---------------------------------------------------------------- image folders

def _scan(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[str, int]]], str]:
    """Classes (sorted train subfolders), per split the (file, label) pairs, and a hash of
    the sorted relative paths with sizes and mtimes (it changes when the folder does)."""
    classes = tuple(sorted(d.name for d in (root / "train").iterdir() if d.is_dir()))
    if not (root / "test").is_dir():
        raise _error(root / "test", "missing folder", "add test/<class>/ images next to train/")
    test_classes = tuple(sorted(d.name for d in (root / "test").iterdir() if d.is_dir()))
    if classes != test_classes:
        raise _error(root / "test", f"class folders differ from train/ (only in one: "
                     f"{sorted(set(classes) ^ set(test_classes))})",
                     "give train/ and test/ the same class subfolders")
    files: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    stamps = []
    for split, items in files.items():
        for label, cls in enumerate(classes):
            with os.scandir(root / split / cls) as it:
                entries = sorted((e for e in it if e.is_file()
                                  and e.name.lower().endswith(IMAGE_EXTENSIONS)),
                                 key=lambda e: e.name)
            for e in entries:
                st = e.stat()
                items.append((e.path, label))
                stamps.append(f"{split}/{cls}/{e.name}\t{st.st_size}\t{st.st_mtime_ns}\n")
        if not items:
            raise _error(root / split, "no .png/.jpg/.jpeg images in class folders",
                         f"lay images out as {split}/<class>/*.png")
    digest = hashlib.sha256(_CACHE_VERSION.encode() + "".join(sorted(stamps)).encode())
    return classes, files, digest.hexdigest()[:24]


def _decode_chunk(files: list[str]) -> np.ndarray | list[np.ndarray]:
    """Decode images with PIL: (H, W) for grayscale modes, (H, W, 3) RGB otherwise;
    stacked into one array when all agree (cheaper to send back from a worker)."""
    from PIL import Image

    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                mode = "L" if im.mode in _GRAY_MODES else "RGB"
                out.append(np.asarray(im if im.mode == mode else im.convert(mode)))
        except (OSError, ValueError, SyntaxError) as e:
            raise _error(f, f"cannot decode image ({e})", "replace or delete the file") from None
    return np.stack(out) if all(a.shape == out[0].shape for a in out) else out


def _decode_files(files: list[str], min_parallel: int = 1024) -> list[np.ndarray]:
    """Decode many images, in chunks across os.cpu_count() processes when worth it."""
    workers = os.cpu_count() or 1
    if workers == 1 or len(files) < min_parallel:
        return list(_decode_chunk(files))
    size = min(2048, -(-len(files) // (4 * workers)))
    chunks = [files[i:i + size] for i in range(0, len(files), size)]
    # fork is cheap (no re-import of torch); the workers only touch PIL and numpy.
    ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return [a for block in pool.map(_decode_chunk, chunks) for a in block]


def _stack(arrays: list[np.ndarray], files: list[str]) -> np.ndarray:
    """Stack decoded images into uint8 (N, C, H, W): C=1 if all are grayscale, else 3."""
    ref = arrays[0].shape[:2]
    for a, f in zip(arrays, files):
        if a.shape[:2] != ref:
            raise _error(f, f"image is {a.shape[1]}x{a.shape[0]} but {files[0]} is "
                         f"{ref[1]}x{ref[0]}", "resize all images to one size")
    if all(a.ndim == 2 for a in arrays):
        return np.stack(arrays)[:, None]
    rgb = np.stack([a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in arrays])
    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))


def _load_cache(file: Path, classes: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing, corrupt or for other classes."""
    try:
        with open(file, "rb") as f, np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("train_images", "train_labels", "test_images",
                                        "test_labels", "classes")}
    except Exception:  # missing or corrupt (zip, header, truncation...): rebuild
        return None
    return arrays if tuple(arrays["classes"].tolist()) == classes else None


def _save_cache(file: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache atomically (temp file + os.replace); a failure only costs speed."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, file)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass


def default_cache_dir() -> Path:
    """``$HAHNET_CACHE`` if set, else ``~/.cache/hahnet``."""
    return Path(os.environ.get("HAHNET_CACHE") or Path.home() / ".cache" / "hahnet")


def read_image_folder(root: str | Path, cache_dir: str | Path | None = None) -> Dataset:
    """``{train,test}/<class>/*.{png,jpg,jpeg}``, decoded once and cached as .npz in
    ``cache_dir`` (never in the data set folder, which may be read-only)."""
    root = Path(root)
    classes, files, digest = _scan(root)
    folder = root.resolve().name or "images"
    safe = "".join(c if c.isalnum() else "-" for c in folder)
    cache = Path(cache_dir or default_cache_dir()) / f"image-folder-{safe}-{digest}.npz"
    arrays = _load_cache(cache, classes)
    if arrays is None:
        paths = [f for split in files.values() for f, _ in split]
        images = _stack(_decode_files(paths), paths)
        n = len(files["train"])
        arrays = {"train_images": images[:n], "test_images": images[n:], "classes": np.array(classes),
                  **{f"{s}_labels": np.array([y for _, y in files[s]], dtype=np.int64)
                     for s in files}}
        _save_cache(cache, arrays)
    train, test = (_split(arrays[f"{s}_images"], arrays[f"{s}_labels"], classes, root / s)
                   for s in ("train", "test"))
    name = "cifar10" if classes == CIFAR10_CLASSES and train.image_shape == (3, 32, 32) else folder
    return _dataset(name, "image-folder", train, test, root)


# ---------------------------------------------------------------- detection

def load_dataset(path: str | Path, cache_dir: str | Path | None = None,
                 download: bool = False) -> Dataset:
    """Read the data set at ``path``, detecting its layout; with ``download=True`` a
    missing (or empty) ``path`` first receives CIFAR-10 from the official site."""
    path = Path(path).expanduser()
    if download and (not path.exists() or (path.is_dir() and not any(path.iterdir()))):
        path = download_cifar10(path)
    for d in (path, path / "cifar-10-batches-py"):
        if d.is_dir() and (d.name == "cifar-10-batches-py" or (d / "batches.meta").is_file()):
            return read_cifar_python(d)
    for d in (path, path / "cifar-10-batches-bin"):
        if d.is_dir() and (d.name == "cifar-10-batches-bin" or (d / "batches.meta.txt").is_file()):
            return read_cifar_binary(d)
    if (path / "train").is_dir():
        return read_image_folder(path, cache_dir)
    if any(_idx_file(path, stem).exists() for stem in IDX_FILES.values()):
        return read_idx(path)
    what = "missing path" if not path.exists() else "no recognised data set layout"
    raise _error(path, what + " (looked for cifar-10-batches-py/ pickles, cifar-10-batches-bin/, "
                 "train/<class>/ + test/<class>/ image folders, MNIST IDX files)",
                 "pass --data pointing at one of these (or download=True for CIFAR-10)")


def to_float(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 images as floats in [0, 1] (on the same device)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images.dtype}")
    return images.to(dtype).div_(255)

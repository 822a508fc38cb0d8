"""Tests for hahnet.data.datasets: every format built as tiny files in tmp_path, the decode cache,
one-line DataErrors naming the file, seeded subsets and the batched crop+flip."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hahnet.data import datasets as data
from hahnet.data.datasets import (CIFAR10_CLASSES, FASHION_MNIST_CLASSES, DataError, ImageDataset,
                                  channel_stats, download_cifar10, load_dataset, split_holdout,
                                  to_float)
from hahnet.data.augment import crop_flip, crop_flip_params

RNG = np.random.default_rng(0)


def _names(n: int) -> list[bytes]:
    return [c.encode() for c in CIFAR10_CLASSES[:n]]


# ---------------------------------------------------------------- builders

def _official_pickle(obj: object) -> bytes:
    """Protocol 2 naming numpy.core.multiarray, as in the official (Python 2) files."""
    return pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n",
                                                 b"cnumpy.core.multiarray\n")


def make_cifar_python(root: Path, per_batch: int = 3, n_test: int = 4) -> dict[str, np.ndarray]:
    """A cifar-10-batches-py/ with official-looking pickles; returns the arrays written."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        x = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in RNG.integers(0, 10, n)]
        batch = {b"batch_label": name.encode(), b"labels": y, b"data": x,
                 b"filenames": [b"f%d.png" % i for i in range(n)]}
        (d / name).write_bytes(_official_pickle(batch))
        written[name] = (x, np.array(y))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": _names(10), b"num_vis": 3072}
    (d / "batches.meta").write_bytes(_official_pickle(meta))
    return written


def make_cifar_binary(root: Path, per_batch: int = 3, n_test: int = 4) -> dict[str, np.ndarray]:
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    written = {}
    for name, n in [(f"data_batch_{i}.bin", per_batch) for i in range(1, 6)] + \
            [("test_batch.bin", n_test)]:
        rec = RNG.integers(0, 256, (n, 3073), dtype=np.uint8)
        rec[:, 0] = RNG.integers(0, 10, n)
        (d / name).write_bytes(rec.tobytes())
        written[name] = rec
    (d / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n\n")
    return written


def make_image_folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 2,
                      size=(8, 6), ext: str = ".png", mode: str = "RGB") -> dict[str, list]:
    """{train,test}/<class>/*.ext; returns per split the (array, label) pairs in load order."""
    out: dict[str, list] = {"train": [], "test": []}
    for split in out:
        for label, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
                arr = RNG.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(arr, mode).save(root / split / c / f"{i:03d}{ext}")
                out[split].append((arr, label))
    return out


def write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    raw = struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def make_idx(root: Path, gz: bool, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    root.mkdir(parents=True)
    sfx = ".gz" if gz else ""
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = RNG.integers(0, 10, n).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", x, 2051)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", y, 2049)
        out[prefix] = (x, y)
    return out


def _nchw(arrays: list[np.ndarray]) -> torch.Tensor:
    x = np.stack(arrays)
    return torch.from_numpy(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2).copy())


# ---------------------------------------------------------------- CIFAR-10

@pytest.mark.parametrize("inside", [False, True])
def test_cifar_python_roundtrip(tmp_path, inside):
    w = make_cifar_python(tmp_path)
    ds = load_dataset(tmp_path / "cifar-10-batches-py" if inside else tmp_path)
    assert (ds.name, ds.layout, ds.train.classes) == ("cifar10", "cifar-python", CIFAR10_CLASSES)
    x = np.concatenate([w[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(ds.train.images, torch.from_numpy(x))
    assert ds.train.labels.dtype == torch.int64 and ds.train.images.is_contiguous()
    assert torch.equal(ds.test.labels, torch.from_numpy(w["test_batch"][1]))
    assert ds.describe().startswith(f"cifar10 (cifar-python at {ds.source}): 15 train / 4 test, "
                                    "3x32x32, 10 classes")


def test_cifar_pickle_with_foreign_global_is_refused(tmp_path):
    make_cifar_python(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(pickle.dumps({b"data": print, b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2: not a CIFAR-10 pickle .*not allowed"):
        load_dataset(tmp_path)


def test_cifar_python_missing_and_truncated(tmp_path):
    make_cifar_python(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    (d / "test_batch").write_bytes((d / "test_batch").read_bytes()[:100])
    with pytest.raises(DataError, match=re.escape(str(d / "test_batch"))):
        load_dataset(d)
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3: missing file"):
        load_dataset(d)


def test_cifar_binary_roundtrip(tmp_path):
    w = make_cifar_binary(tmp_path)
    ds = load_dataset(tmp_path)
    assert (ds.name, ds.layout, ds.train.classes) == ("cifar10", "cifar-binary", CIFAR10_CLASSES)
    rec = np.concatenate([w[f"data_batch_{i}.bin"] for i in range(1, 6)])
    assert torch.equal(ds.train.images, torch.from_numpy(rec[:, 1:].reshape(-1, 3, 32, 32)))
    assert torch.equal(ds.train.labels, torch.from_numpy(rec[:, 0].astype(np.int64)))
    assert len(ds.test) == 4


def test_cifar_binary_truncated_and_bad_labels(tmp_path):
    w = make_cifar_binary(tmp_path)
    d = tmp_path / "cifar-10-batches-bin"
    (d / "data_batch_4.bin").write_bytes(w["data_batch_4.bin"].tobytes()[:-7])
    with pytest.raises(DataError, match=r"data_batch_4\.bin: .*3073-byte records"):
        load_dataset(tmp_path)
    (d / "data_batch_4.bin").write_bytes(w["data_batch_4.bin"].tobytes())
    rec = w["test_batch.bin"].copy()
    rec[1, 0] = 12
    (d / "test_batch.bin").write_bytes(rec.tobytes())
    with pytest.raises(DataError, match=r"test_batch\.bin: labels span \[\d+, 12\]"):
        load_dataset(tmp_path)


def _tarball(path: Path, members: dict[str, bytes], link: str | None = None) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_extracts_checks_md5_and_refuses_traversal(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_cifar_python(src)
    files = {f"cifar-10-batches-py/{f.name}": f.read_bytes()
             for f in (src / "cifar-10-batches-py").iterdir()}
    archive = tmp_path / "c.tar.gz"
    md5 = _tarball(archive, files)
    url = archive.as_uri()
    with pytest.raises(DataError, match=r"MD5 [0-9a-f]{32} != expected 0{32}"):
        download_cifar10(tmp_path / "a", url=url, md5="0" * 32)
    assert list((tmp_path / "a").iterdir()) == []  # nothing extracted, temp file removed
    out = download_cifar10(tmp_path / "b", url=url, md5=md5)
    assert out == tmp_path / "b" / "cifar-10-batches-py" and len(load_dataset(out).train) == 15

    real = data.download_cifar10
    monkeypatch.setattr(data, "download_cifar10", lambda root: real(root, url=url, md5=md5))
    assert load_dataset(tmp_path / "c", download=True).layout == "cifar-python"

    for bad, link in (({"../evil": b"x"}, None), ({}, "cifar-10-batches-py/link")):
        md5_bad = _tarball(tmp_path / "bad.tar.gz", bad, link)
        with pytest.raises(DataError, match="unsafe archive member"):
            real(tmp_path / "d", url=(tmp_path / "bad.tar.gz").as_uri(), md5=md5_bad)
    assert not (tmp_path / "evil").exists()
    with pytest.raises(DataError, match="download failed .*download it manually"):
        real(tmp_path / "e", url=(tmp_path / "nope.tar.gz").as_uri())


# ---------------------------------------------------------------- image folders

def test_image_folder_png_exact_and_jpeg_close(tmp_path):
    png = make_image_folder(tmp_path / "pngs", ext=".PNG")
    (tmp_path / "pngs" / "train" / "cat" / "notes.txt").write_text("ignored")
    ds = load_dataset(tmp_path / "pngs", cache_dir=tmp_path / "cache")
    assert (ds.name, ds.layout, ds.train.classes) == ("pngs", "image-folder", ("cat", "dog", "emu"))
    assert torch.equal(ds.train.images, _nchw([a for a, _ in png["train"]]))
    assert ds.train.labels.tolist() == [y for _, y in png["train"]]
    assert ds.describe().endswith("6 train / 6 test, 3x6x8, 3 classes")

    jpg = make_image_folder(tmp_path / "jpgs", ext=".jpeg")
    ds = load_dataset(tmp_path / "jpgs", cache_dir=tmp_path / "cache")
    assert ds.test.images.shape == (6, 3, 6, 8)
    diff = (ds.test.images.float() - _nchw([a for a, _ in jpg["test"]]).float()).abs().mean()
    assert diff < 60  # lossy on random noise, but not garbage


def test_image_folder_grayscale_and_mixed(tmp_path):
    gray = make_image_folder(tmp_path / "g", mode="L")
    ds = load_dataset(tmp_path / "g", cache_dir=tmp_path / "cache")
    assert ds.train.images.shape == (6, 1, 6, 8)
    assert torch.equal(ds.train.images, _nchw([a for a, _ in gray["train"]]))
    rgb = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "g" / "test" / "dog" / "zzz.png")
    ds = load_dataset(tmp_path / "g", cache_dir=tmp_path / "cache")
    assert ds.train.images.shape == (6, 3, 6, 8) and len(ds.test) == 7
    first = gray["train"][0][0]
    assert all(torch.equal(ds.train.images[0, c], torch.from_numpy(first)) for c in range(3))


def test_image_folder_names_cifar10(tmp_path):
    make_image_folder(tmp_path / "x", classes=CIFAR10_CLASSES, per_class=1, size=(32, 32))
    ds = load_dataset(tmp_path / "x", cache_dir=tmp_path / "cache")
    assert ds.name == "cifar10" and ds.describe().startswith("cifar10 (image-folder at ")


def test_image_folder_errors(tmp_path):
    root = tmp_path / "imgs"
    make_image_folder(root)
    odd = root / "test" / "dog" / "001.png"
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(odd)
    with pytest.raises(DataError, match=re.escape(str(odd)) + r": image is 5x5 but .* is 8x6"):
        load_dataset(root, cache_dir=tmp_path / "cache")
    (root / "test" / "emu").rename(root / "test" / "owl")
    with pytest.raises(DataError, match=r"test: class folders differ .*'emu', 'owl'"):
        load_dataset(root, cache_dir=tmp_path / "cache")
    bad = root / "train" / "cat" / "000.png"
    bad.write_bytes(b"not a png")
    (root / "test" / "owl").rename(root / "test" / "emu")
    with pytest.raises(DataError, match=re.escape(str(bad)) + ": cannot decode image"):
        load_dataset(root, cache_dir=tmp_path / "cache")


def test_cache_is_used_invalidated_and_rebuilt(tmp_path, monkeypatch):
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    make_image_folder(root)
    before = sorted(p for p in root.rglob("*"))
    first = load_dataset(root, cache_dir=cache)
    assert sorted(p for p in root.rglob("*")) == before  # nothing written into the data set
    (cache_file,) = cache.glob("*.npz")
    real_decode = data._decode_files
    calls = []

    def boom(files):
        raise AssertionError("decoder called although the cache is valid")

    monkeypatch.setattr(data, "_decode_files", boom)
    second = load_dataset(root, cache_dir=cache)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)

    monkeypatch.setattr(data, "_decode_files", lambda f: calls.append(1) or real_decode(f))
    cache_file.write_bytes(b"PK\x03\x04 garbage")
    assert torch.equal(load_dataset(root, cache_dir=cache).train.images, first.train.images)
    with np.load(cache_file) as z:
        assert calls == [1] and z["train_images"].shape == (6, 3, 6, 8)

    changed = root / "train" / "dog" / "000.png"
    new = np.full((6, 8, 3), 7, np.uint8)
    Image.fromarray(new).save(changed)
    os.utime(changed, ns=(1_000_000_000, 1_000_000_000))
    third = load_dataset(root, cache_dir=cache)
    assert calls == [1, 1] and torch.equal(third.train.images[2], torch.from_numpy(new).permute(2, 0, 1))
    assert len(list(cache.glob("*.npz"))) == 2 and not list(cache.glob("*.tmp"))


def test_parallel_decode_matches_serial_and_reports_bad_file(tmp_path):
    make_image_folder(tmp_path, per_class=3)
    paths = sorted(str(p) for p in tmp_path.rglob("*.png"))
    serial = data._decode_files(paths)
    parallel = data._decode_files(paths, min_parallel=1)  # a process pool even for 18 files
    assert len(parallel) == 18 and all(np.array_equal(a, b) for a, b in zip(serial, parallel))
    Path(paths[7]).write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=re.escape(paths[7]) + ": cannot decode image"):
        data._decode_files(paths, min_parallel=1)


def test_cache_dir_from_env(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "imgs")
    monkeypatch.setenv("HAHNET_CACHE", str(tmp_path / "envcache"))
    load_dataset(tmp_path / "imgs")
    assert len(list((tmp_path / "envcache").glob("image-folder-imgs-*.npz"))) == 1


# ---------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_padded(tmp_path, gz):
    w = make_idx(tmp_path / "Fashion", gz)
    ds = load_dataset(tmp_path / "Fashion")
    assert (ds.name, ds.layout, ds.train.classes) == ("fashion-mnist", "idx", FASHION_MNIST_CLASSES)
    assert ds.train.images.shape == (5, 1, 32, 32)
    assert torch.equal(ds.train.images[:, 0, 2:30, 2:30], torch.from_numpy(w["train"][0]))
    border = ds.test.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.sum() == 0
    assert ds.test.labels.tolist() == w["t10k"][1].tolist()
    assert "1x32x32, zero-padded from 28x28, 10 classes" in ds.describe()


def test_idx_mnist_name_and_errors(tmp_path):
    root = tmp_path / "digits"
    w = make_idx(root, gz=True)
    ds = load_dataset(root)
    assert ds.name == "mnist" and ds.train.classes == tuple("0123456789")
    f = root / "t10k-labels-idx1-ubyte.gz"
    write_idx(f, w["t10k"][1], 2051)
    with pytest.raises(DataError, match=re.escape(str(f)) + r": bad magic number \(expected 2049\)"):
        load_dataset(root)
    f.unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: missing file"):
        load_dataset(root)
    write_idx(f, w["t10k"][1], 2049)
    img = root / "train-images-idx3-ubyte.gz"
    with gzip.open(img, "wb") as fh:
        fh.write(struct.pack(">IIII", 2051, 5, 28, 28) + b"\0" * 100)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: 100 data bytes .*truncated"):
        load_dataset(root)
    img.write_bytes(img.read_bytes()[:30])  # a cut-off gzip stream
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: unreadable or truncated"):
        load_dataset(root)


def test_unrecognised_path(tmp_path):
    with pytest.raises(DataError, match=r"missing path .*looked for cifar-10-batches-py"):
        load_dataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no recognised data set layout"):
        load_dataset(tmp_path / "empty")


def test_errors_are_one_line_value_errors(tmp_path):
    make_cifar_binary(tmp_path)
    (tmp_path / "cifar-10-batches-bin" / "batches.meta.txt").unlink()
    with pytest.raises(ValueError) as info:
        load_dataset(tmp_path)
    assert isinstance(info.value, DataError) and "\n" not in str(info.value)
    assert "batches.meta.txt: missing file" in str(info.value)


# ---------------------------------------------------------------- subsets and stats

def _split_ds(n: int = 20) -> ImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return ImageDataset(images, torch.arange(n) % 4, ("a", "b", "c", "d"))


def test_limit_subset_and_holdout_are_seeded_and_disjoint():
    ds = _split_ds()
    a, b = ds.limit(7, seed=3), ds.limit(7, seed=3)
    assert len(a) == 7 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(ds.limit(7, seed=4).images, a.images)
    assert ds.limit(50, seed=0) is ds
    assert torch.equal(ds.subset([3, 1]).labels, torch.tensor([3, 1]))
    train, held = split_holdout(ds, 0.25, seed=1)
    assert (len(train), len(held)) == (15, 5)
    ids = torch.cat([train.images[:, 0, 0, 0], held.images[:, 0, 0, 0]]).sort().values
    assert torch.equal(ids, torch.arange(20, dtype=torch.uint8))
    assert torch.equal(split_holdout(ds, 0.25, seed=1)[1].images, held.images)
    with pytest.raises(ValueError):
        split_holdout(ds, 1.0)


def test_channel_stats_matches_direct():
    x = torch.randint(0, 256, (9, 3, 5, 4), dtype=torch.uint8)
    mean, std = channel_stats(ImageDataset(x, torch.zeros(9, dtype=torch.long), ("a",)))
    f = x.double() / 255
    assert np.allclose(mean, f.mean((0, 2, 3)).numpy()) and len(std) == 3
    assert np.allclose(std, f.std((0, 2, 3), unbiased=False).numpy())


def test_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(to_float(x), torch.tensor([0.0, 0.2, 1.0]))
    with pytest.raises(TypeError):
        to_float(x.float())


# ---------------------------------------------------------------- augmentation

def _reference(img: torch.Tensor, dy: int, dx: int, flip: bool, pad: int) -> torch.Tensor:
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=img.dtype)
    padded[:, pad:pad + h, pad:pad + w] = img
    out = padded[:, dy:dy + h, dx:dx + w]
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("dtype,pad", [(torch.float32, 4), (torch.uint8, 4), (torch.float64, 2)])
def test_crop_flip_matches_per_image_reference(dtype, pad):
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(16, 3, 7, 10, generator=g) * 255).to(dtype)
    dy, dx, flip = crop_flip_params(16, g, pad)
    out = crop_flip(x, dy, dx, flip, pad)
    assert out.dtype == dtype and out.shape == x.shape
    for i in range(16):
        assert torch.equal(out[i], _reference(x[i], int(dy[i]), int(dx[i]), bool(flip[i]), pad))


def test_crop_flip_identity_flip_twice_and_slicing():
    x = torch.rand(8, 3, 6, 6)
    centre, yes = torch.full((8,), 4), torch.ones(8, dtype=torch.bool)
    assert torch.equal(crop_flip(x, centre, centre, ~yes), x)
    once = crop_flip(x, centre, centre, yes)
    assert torch.equal(once, x.flip(-1)) and torch.equal(crop_flip(once, centre, centre, yes), x)
    dy, dx, flip = crop_flip_params(8, torch.Generator().manual_seed(0))
    assert torch.equal(crop_flip(x, dy, dx, flip)[4:], crop_flip(x[4:], dy[4:], dx[4:], flip[4:]))


def test_crop_flip_params_seeded_and_in_range():
    a = crop_flip_params(1000, torch.Generator().manual_seed(1), pad=3)
    b = crop_flip_params(1000, torch.Generator().manual_seed(1), pad=3)
    c = crop_flip_params(1000, torch.Generator().manual_seed(2), pad=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    dy, dx, flip = a
    assert dy.min() == 0 and dy.max() == 6 and dx.min() == 0 and dx.max() == 6
    assert flip.dtype == torch.bool and 0 < flip.sum() < 1000

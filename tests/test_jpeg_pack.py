"""JPEG packs: byte-identical round trip, the shared header stored once, damage caught."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from hahnet.data import jpeg_pack
from hahnet.data.datasets import load_dataset


def make_jpeg_folder(root, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.jpg", quality=75)


def test_round_trip_is_byte_identical_and_smaller(tmp_path):
    make_jpeg_folder(tmp_path / "src")
    sizes = jpeg_pack.pack(tmp_path / "src", tmp_path / "data.npz")
    assert sizes["files"] == 12 and sizes["bytes_out"] < sizes["bytes_in"]
    assert jpeg_pack.unpack(tmp_path / "data.npz", tmp_path / "dst") == 12
    for path in (tmp_path / "src").rglob("*.jpg"):
        assert (tmp_path / "dst" / path.relative_to(tmp_path / "src")).read_bytes() == path.read_bytes()
    a = load_dataset(tmp_path / "src", cache_dir=tmp_path / "c1")
    b = load_dataset(tmp_path / "dst", cache_dir=tmp_path / "c2")
    assert (a.train.images == b.train.images).all() and (a.test.labels == b.test.labels).all()
    with np.load(tmp_path / "data.npz") as z:  # the common header is stored once
        assert z["prefix"].size > 100


def test_damaged_or_missing_input_is_refused(tmp_path):
    with pytest.raises(jpeg_pack.PackError, match="is not a folder"):
        jpeg_pack.pack(tmp_path / "nope", tmp_path / "x.npz")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(jpeg_pack.PackError, match="no JPEG files found"):
        jpeg_pack.pack(tmp_path / "empty", tmp_path / "x.npz")
    make_jpeg_folder(tmp_path / "src", per_class=1)
    jpeg_pack.pack(tmp_path / "src", tmp_path / "data.npz")
    with np.load(tmp_path / "data.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["bodies"] = arrays["bodies"].copy()
    arrays["bodies"][5] ^= 0xFF
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (tmp_path / "bad.npz").write_bytes(buffer.getvalue())
    with pytest.raises(jpeg_pack.PackError, match="do not match the packed checksum"):
        jpeg_pack.unpack(tmp_path / "bad.npz", tmp_path / "out")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(jpeg_pack.PackError, match="not a readable JPEG pack"):
        jpeg_pack.unpack(tmp_path / "junk.npz", tmp_path / "out")

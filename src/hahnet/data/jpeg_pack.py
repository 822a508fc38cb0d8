"""A JPEG image folder packed into one small file, byte for byte, for carrying data to a
machine that cannot see it (a rented GPU with a small upload, a cluster node).

Tiny JPEGs from one encoder share their headers (quantization and Huffman tables): in
the CIFAR-10 JPEG copy 623 of ~890 bytes per image. A pack stores that common prefix once
and each file's remainder, so 57 MB of files become ~16 MB; :func:`unpack` writes the
very same files back (checked by SHA-256), and the usual image-folder loader reads them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

EXTENSIONS = (".jpg", ".jpeg")


class PackError(ValueError):
    """A folder that cannot be packed or a pack that cannot be unpacked."""


def _files(folder: Path) -> list[str]:
    """Relative paths of every JPEG under ``folder/{train,test}/<class>/``, sorted."""
    found = sorted(str(p.relative_to(folder)) for split in ("train", "test")
                   for p in (folder / split).glob("*/*") if p.suffix.lower() in EXTENSIONS)
    if not found:
        raise PackError(f"{folder}: no JPEG files found; expected "
                        f"{folder}/train/<class>/*.jpg and {folder}/test/<class>/*.jpg")
    return found


def pack(folder: str | Path, out: str | Path) -> dict[str, int]:
    """Pack the JPEG folder into ``out`` (.npz); returns sizes (files, bytes in, bytes out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PackError(f"{folder} is not a folder; pass the image folder holding train/ and test/")
    names = _files(folder)
    blobs = [(folder / name).read_bytes() for name in names]
    prefix = os.path.commonprefix(blobs) if len(blobs) > 1 else b""
    bodies = [blob[len(prefix):] for blob in blobs]
    offsets = np.cumsum([0] + [len(b) for b in bodies], dtype=np.int64)
    digest = hashlib.sha256(b"".join(blobs)).hexdigest()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, prefix=np.frombuffer(prefix, dtype=np.uint8),
                 bodies=np.frombuffer(b"".join(bodies), dtype=np.uint8), offsets=offsets,
                 names=np.array(names), sha256=np.array(digest))
    os.replace(tmp, out)
    return {"files": len(names), "bytes_in": sum(map(len, blobs)), "bytes_out": out.stat().st_size}


def unpack(pack_file: str | Path, folder: str | Path) -> int:
    """Write the packed files under ``folder`` (byte-identical, checked); returns their count."""
    pack_file, folder = Path(pack_file), Path(folder)
    try:
        with np.load(pack_file, allow_pickle=False) as z:
            prefix, bodies = z["prefix"].tobytes(), z["bodies"].tobytes()
            offsets, names, digest = z["offsets"], z["names"].tolist(), str(z["sha256"])
    except (OSError, ValueError, KeyError) as error:
        raise PackError(f"{pack_file}: not a readable JPEG pack ({error}); pack it again") from None
    check = hashlib.sha256()
    for i, name in enumerate(names):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise PackError(f"{pack_file}: unsafe path {name!r} in the pack; pack it again")
        blob = prefix + bodies[offsets[i]:offsets[i + 1]]
        check.update(blob)
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob)
    if check.hexdigest() != digest:
        raise PackError(f"{pack_file}: unpacked files do not match the packed checksum "
                        f"(damaged pack?); pack it again")
    return len(names)

"""The on-disk image-set format shared by every stage, real and synthetic alike.

An image set is a folder:
    info.json           {"shape": [H, W, C], "count": N, "shard_size": S}
    meta.csv            one row per image, in image order; always has `image_id`
    shard-00000.npy ... uint8 arrays of shape (<=S, H, W, C), memory-mapped on read

DVC moves a handful of large files instead of one file per image, and readers touch only
the pages they need, so memory stays flat as sets grow. Writes go to a temporary sibling
folder that is renamed into place on success, so a killed stage never leaves a half-written
set that a later stage would trust.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

SHARD_BYTES = 64 << 20
META_DTYPES = {"image_id": str, "patient_id": str, "sex": str, "label": str, "source": str}
NEAR_COPY = "near_copy"  # a synthetic set's meta column: 1 for a near copy of a training image, which no exit ships


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save's bytes, written by Python rather than numpy's fwrite: a full disk is then an OSError that
    says so (numpy's says only "N requested and M written")."""
    array = np.ascontiguousarray(array)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(array.data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file via a temporary name and rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")  # a leftover the next run removes
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_weights(path: Path, map_location="cpu"):
    """torch.load of tensors and plain values only (weights_only): unpickling anything else could run code, so
    a file that holds another object is refused with a ValueError of one line naming the file and the object."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # torch's message names the object it refused
        raise ValueError(f"{path} is not plain weights: it holds {found[1] if found else 'an object'}, not only "
                         "tensors and numbers; refusing to load it") from e


def save_torch(obj, path: Path) -> None:
    """torch.save via a temporary name and rename. Written through a Python file, so a failed write is an
    OSError naming the file (torch's own file writer says only "unexpected pos N vs M"), and the bytes do
    not depend on the file's name (torch names a file's archive after it; a stream's is "archive")."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        except (OSError, RuntimeError) as e:  # torch's error on a failed write follows the write's own
            failed = e
            while failed is not None and not isinstance(failed, OSError):
                failed = failed.__context__
            if failed is None:
                raise
            raise OSError(failed.errno, failed.strerror, str(path)) from e
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_tree(path: Path) -> None:
    """Remove a folder and all it holds (none there is fine); an OSError naming it and what stayed when a
    part cannot be removed, where shutil.rmtree(ignore_errors=True) would leave it silently."""
    def fail(func, failed, exc):
        exc = exc if isinstance(exc, BaseException) else exc[1]  # onexc gets the exception, onerror exc_info
        if not isinstance(exc, FileNotFoundError):
            raise OSError(exc.errno, f"cannot be removed ({exc.strerror}: {failed})", str(path)) from exc

    shutil.rmtree(path, **{"onexc" if sys.version_info >= (3, 12) else "onerror": fail})


def replace_tree(new: Path, out: Path) -> None:
    """Put the finished folder `new` in place of `out` (absent is fine). `out` moves aside first, so a kill between the
    two renames leaves the old output under .<name>.old (which the next call removes), never a half-written one."""
    old = out.with_name(f".{out.name}.old")
    remove_tree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    remove_tree(old)


class ImageSetWriter:
    """Stream images into a new image set; use as a context manager.

    Only one shard is held in memory at a time. On a clean exit the set replaces whatever was
    at `path`; on an exception nothing at `path` changes.
    """

    def __init__(self, path: Path, image_shape: tuple[int, int, int], shard_bytes: int = SHARD_BYTES):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in image_shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {image_shape}")
        self.shard_size = max(1, shard_bytes // int(np.prod(self.shape)))
        self._buf = np.empty((self.shard_size,) + self.shape, np.uint8)
        self._fill = 0
        self._shards = 0
        self._rows: list[dict] = []
        self._tmp: Path | None = None

    def __enter__(self) -> ImageSetWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.tmp-"))
        return self

    def add(self, image: np.ndarray, **meta) -> None:
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape != self.shape or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 {self.shape}, got {image.dtype} {image.shape}")
        self._buf[self._fill] = image
        self._fill += 1
        self._rows.append({"image_id": str(meta.pop("image_id", len(self._rows))), **meta})
        if self._fill == self.shard_size:
            self._flush()

    def add_many(self, images: Iterable[np.ndarray], metas: Iterable[dict]) -> None:
        for image, meta in zip(images, metas, strict=True):
            self.add(image, **meta)

    def _flush(self) -> None:
        if self._fill:
            _save_npy(self._tmp / _shard_name(self._shards), self._buf[: self._fill])
            self._shards += 1
            self._fill = 0

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        try:
            self._finish()
        except BaseException:  # a full disk, an output that cannot be replaced: leave no half-written set
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    def _finish(self) -> None:
        self._flush()
        pd.DataFrame(self._rows, columns=None if self._rows else ["image_id"]).to_csv(
            self._tmp / "meta.csv", index=False)
        info = {"shape": list(self.shape), "count": len(self._rows), "shard_size": self.shard_size}
        (self._tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        replace_tree(self._tmp, self.path)


class ImageSet:
    """Read-only, memory-mapped view of an image set written by ImageSetWriter."""

    def __init__(self, path: Path):
        self.path = Path(path)
        info_path = self.path / "info.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{self.path} is not an image set (no info.json); run the stage that writes it")
        info = json.loads(info_path.read_text())
        self.shape: tuple[int, int, int] = tuple(info["shape"])
        self.shard_size: int = info["shard_size"]
        self.meta: pd.DataFrame = pd.read_csv(self.path / "meta.csv", dtype=META_DTYPES, keep_default_na=False)
        if len(self.meta) != info["count"]:
            raise ValueError(f"{self.path}: meta.csv has {len(self.meta)} rows, info.json says {info['count']}")
        self._shards: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.meta)

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._shards:
            self._shards[k] = np.load(self.path / _shard_name(k), mmap_mode="r")
        return self._shards[k]

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return np.asarray(self._shard(i // self.shard_size)[i % self.shard_size])

    def batches(self, indices: Iterable[int] | None = None, batch_size: int = 256) -> Iterator[np.ndarray]:
        """Yield (B, H, W, C) uint8 copies of the images at `indices` (all, in order, by default)."""
        idx = np.arange(len(self)) if indices is None else np.asarray(list(indices), dtype=np.int64)
        for start in range(0, len(idx), batch_size):
            yield np.stack([self[int(i)] for i in idx[start:start + batch_size]])

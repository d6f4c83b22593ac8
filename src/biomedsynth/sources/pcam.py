"""PatchCamelyon: 96x96 RGB tiles in HDF5, read a chunk of tiles at a time (train_x alone is 6 GB).

Per split under root: camelyonpatch_level_2_split_<split>_x.h5 (dataset `x`, (N, 96, 96, 3) uint8),
..._<split>_y.h5 (dataset `y`, (N, 1, 1, 1) uint8, 1 = tumour) and, optionally,
..._<split>_meta.csv, whose `wsi` column names each tile's source slide: slide_id is that slide.
A split without its meta CSV has no slide ids: refused, unless `allow_tile_level_split`, when its tiles
are split on their own (slide_id None) and tiles of one slide can land on both sides of the split.
The files come gzipped (.h5.gz) and must be gunzipped. Tiles larger than the pixel budget (ingest.max_pixels)
stop the ingest, like any other wrong shape; a read decodes at most the budget's pixels. HDF5 inflates a whole
compressed chunk to read any tile in it, so a split whose `x` or `y` chunk inflates to more than the budget's
RGB pixels (3 bytes each) is skipped and counted (over_pixel_budget) before anything is read.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from biomedsynth.sources import Tile
from biomedsynth.sources.budget import OverPixelBudget
from biomedsynth.sources.manifest import read_table, skip

PREFIX = "camelyonpatch_level_2_split_"
LABELS = {0: "normal", 1: "tumor"}


class Split(NamedTuple):
    name: str
    x: Path
    y: Path
    wsi: list[str] | None  # source slide per tile, from the meta CSV


def _h5(path: Path, key: str, what: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape and dtype of dataset `key` in an HDF5 file and the bytes one of its chunks inflates to (0 when it
    is stored whole: then it is uncompressed and read in parts), with clear errors for the usual faults."""
    if not path.is_file():
        gz = path.with_name(path.name + ".gz")
        if gz.is_file():
            raise ValueError(f"{gz} is gzip-compressed; run `gunzip {gz}` first")
        raise ValueError(f"{path} not found ({what})")
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise ValueError(f"{path}: no dataset {key!r} (has: {', '.join(f.keys())})")
            d = f[key]
            return d.shape, d.dtype, math.prod(d.chunks) * d.dtype.itemsize if d.chunks else 0
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from None


def find_split(root: Path, name: str, max_pixels: int) -> Split:
    x, y, meta = (root / f"{PREFIX}{name}_{k}" for k in ("x.h5", "y.h5", "meta.csv"))
    xs, xt, x_chunk = _h5(x, "x", f"the tiles of split {name!r}")
    ys, _, y_chunk = _h5(y, "y", f"the labels for {x.name}")
    if len(xs) != 4 or xs[-1] != 3 or xt != np.uint8 or min(xs[1:3]) < 1:
        raise ValueError(f"{x}: dataset 'x' is {xt} {xs}, expected uint8 (N, H, W, 3)")
    if xs[1] * xs[2] > max_pixels:
        raise ValueError(f"{x}: tiles of {xs[2]} x {xs[1]} px are over the pixel budget (ingest.max_pixels = "
                         f"{max_pixels:,}); PatchCamelyon's are 96 x 96")
    for path, key, inflated in ((x, "x", x_chunk), (y, "y", y_chunk)):
        if inflated > 3 * max_pixels:
            raise OverPixelBudget(f"{path}: one chunk of dataset {key!r} inflates to {inflated:,} bytes, over the "
                                  f"pixel budget (ingest.max_pixels = {max_pixels:,} RGB pixels); not read")
    n = xs[0]
    if not ys or ys[0] != n or np.prod(ys) != n:
        raise ValueError(f"{y}: dataset 'y' has shape {ys}, expected one label per tile of {x.name} ({n})")
    wsi = None
    if meta.is_file():
        wsi = list(read_table(meta, ["wsi"])["wsi"].str.strip())
        if len(wsi) != n:
            raise ValueError(f"{meta}: {len(wsi)} rows for {n} tiles in {x.name}")
        if "" in wsi:
            raise ValueError(f"{meta}: empty wsi (slide) on row {wsi.index('') + 1}")
    return Split(name, x, y, wsi)


def pcam_tiles(root: Path, allow_tile_level_split: bool, max_pixels: int,
               splits: tuple[str, ...] = ("train", "valid", "test"), chunk: int = 1024
               ) -> tuple[Iterator[Tile], dict[str, int]]:
    """(tiles, skipped): files and slide ids are checked now, and a split whose HDF5 chunks are over the budget
    is skipped (over_pixel_budget); tiles stream out `chunk` at a time (fewer when `chunk` tiles hold more than
    `max_pixels` pixels) as the iterator is consumed, and `skipped` (reason -> count: bad_label, a y value
    other than 0/1) fills up meanwhile."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    found, skipped = [], Counter()
    for s in splits:
        try:
            found.append(find_split(Path(root), s, max_pixels))
        except OverPixelBudget as e:
            skip(skipped, e.reason, str(e))
    no_ids = [s.name for s in found if s.wsi is None]
    if no_ids and not allow_tile_level_split:
        raise ValueError(f"{root}: no {PREFIX}<split>_meta.csv for split(s) {', '.join(no_ids)}, so their tiles have "
                         "no slide ids and the split cannot keep a slide's tiles together; put PatchCamelyon's "
                         "_meta.csv files beside the .h5 files, or accept a split by tile: "
                         "sources.histology.allow_tile_level_split=true")
    return _tiles(found, chunk, max_pixels, skipped), skipped


def _tiles(splits: list[Split], chunk: int, max_pixels: int, skipped: Counter) -> Iterator[Tile]:
    for s in splits:
        with h5py.File(s.x, "r") as fx, h5py.File(s.y, "r") as fy:
            x, y = fx["x"], fy["y"]
            step = min(chunk, max_pixels // (x.shape[1] * x.shape[2]))  # >= 1: find_split checked one tile
            for start in range(0, len(x), step):
                images, labels = x[start:start + step], y[start:start + step].reshape(-1)
                for i, (image, label) in enumerate(zip(images, labels.tolist()), start):
                    if label not in LABELS:
                        skip(skipped, "bad_label", f"{s.y.name} tile {i}: label {label}")
                        continue
                    yield Tile(image, s.wsi[i] if s.wsi is not None else None, LABELS[label], f"{s.x.name}:{i}")

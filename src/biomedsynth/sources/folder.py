"""Ready-cut histology tiles in label folders: <root>/<label>/*.png|jpg|jpeg|tif|tiff.

Label folders (case-insensitive): `normal` or `0` -> normal; `tumor`, `tumour` or `1` -> tumor (0/1 as in
PatchCamelyon). Any other visible subfolder is an error, so a misspelt label is not silently dropped.
Files are read in sorted order; each comes out as (H, W, 3) uint8 RGB (grayscale, palette, RGBA converted).

slide_id, used to keep a slide's tiles on one side of the train/test split:
- from <root>/slides.csv (columns `file,slide`; `file` is the path under root, e.g. tumor/a.png, or the
  bare file name); tiles it does not list are skipped and counted;
- else from the file name `<slide>_<anything>.png`: the part before the first "_" (so slide names that
  contain "_" themselves, like Camelyon's tumor_001, need slides.csv);
- else (no "_") the file's own stem: every tile is its own group, so the split is by tile, not slide,
  and tiles of one slide can land on both sides.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from biomedsynth.sources import Tile, UnreadableInput
from biomedsynth.sources.manifest import read_table, skip

LABELS = {"normal": "normal", "0": "normal", "tumor": "tumor", "tumour": "tumor", "1": "tumor"}
SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def read_rgb(path: Path) -> np.ndarray:
    """An 8-bit image file as (H, W, 3) uint8 RGB; UnreadableInput when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith(("I", "F")):  # 16/32-bit: converting would clip, not rescale
                raise UnreadableInput(f"{path}: {im.mode} image, tiles must be 8-bit")
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableInput(f"{path}: {e}") from None


def slide_table(csv: Path) -> dict[str, str]:
    table = read_table(csv, ["file", "slide"])
    files, slides = table["file"].str.strip(), table["slide"].str.strip()
    if files.duplicated().any():
        raise ValueError(f"{csv}: file {files[files.duplicated()].iloc[0]!r} is listed twice")
    if (slides == "").any():
        raise ValueError(f"{csv}: empty slide for file {files[slides == ''].iloc[0]!r}")
    return dict(zip(files, slides))


def folder_tiles(root: Path) -> tuple[Iterator[Tile], dict[str, int]]:
    """(tiles, skipped): the layout is checked now; tiles are decoded as the iterator is consumed, and
    `skipped` (reason -> count: unsupported_format, unreadable, not_in_slides_csv) fills up meanwhile."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: tile folder not found")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [d.name for d in folders if d.name.lower() not in LABELS]
    if unknown or not folders:
        raise ValueError(f"{root}: label folders must be normal/ and tumor/ (or tumour/, 0/, 1/); "
                         + (f"found {', '.join(unknown)}" if unknown else "found none"))
    slides = slide_table(root / "slides.csv") if (root / "slides.csv").is_file() else None
    files = [(f, LABELS[d.name.lower()]) for d in folders for f in sorted(d.iterdir())
             if f.is_file() and not f.name.startswith(".")]
    skipped: Counter = Counter()
    return _tiles(root, files, slides, skipped), skipped


def _tiles(root: Path, files: list[tuple[Path, str]], slides: dict[str, str] | None,
           skipped: Counter) -> Iterator[Tile]:
    for f, label in files:
        rel = f.relative_to(root).as_posix()
        if f.suffix.lower() not in SUFFIXES:
            skip(skipped, "unsupported_format", rel)
            continue
        slide = (f.stem.split("_", 1)[0] or f.stem) if slides is None else slides.get(rel, slides.get(f.name))
        if slide is None:
            skip(skipped, "not_in_slides_csv", rel)
            continue
        try:
            image = read_rgb(f)
        except UnreadableInput as e:
            skip(skipped, "unreadable", str(e))
            continue
        yield Tile(image, slide, label, rel)

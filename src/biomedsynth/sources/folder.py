"""Ready-cut histology tiles in label folders: <root>/<label>/*.png|jpg|jpeg|tif|tiff.

Label folders (case-insensitive): `normal` or `0` -> normal; `tumor`, `tumour` or `1` -> tumor (0/1 as in
PatchCamelyon). Any other visible subfolder is an error, so a misspelt label is not silently dropped.
Files are read in sorted order; each comes out as (H, W, 3) uint8 RGB (grayscale, palette, RGBA converted).

slide_id, used to keep a slide's tiles on one side of the train/test split, is never guessed:
- from <root>/slides.csv (columns `file,slide`; `file` is the path under root, e.g. tumor/a.png, or the
  bare file name); tiles it does not list are skipped and counted (not_in_slides_csv);
- else from the file name by `slide_id` (sources.histology.slide_id): a preset (camelyon16:
  tumor_001_x100_y200.png -> tumor_001; pcam: camelyon16_train_normal_017_4.png -> camelyon16_train_normal_017)
  or a regex with a group named `slide`, searched in the name; tiles it does not match are skipped and
  counted (no_slide_id);
- else none: refused, unless `allow_tile_level_split`, when every tile is split on its own (slide_id None)
  and tiles of one slide can land on both sides of the split.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from biomedsynth.sources import Tile, UnreadableInput, inside, slide_id_pattern
from biomedsynth.sources.budget import pil_budget
from biomedsynth.sources.manifest import read_table, skip

LABELS = {"normal": "normal", "0": "normal", "tumor": "tumor", "tumour": "tumor", "1": "tumor"}
SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def read_rgb(path: Path, max_pixels: int) -> np.ndarray:
    """An 8-bit image file as (H, W, 3) uint8 RGB; UnreadableInput when it cannot be decoded, OverPixelBudget
    (not decoded) when its header declares more than `max_pixels` pixels."""
    try:
        with pil_budget(str(path), max_pixels), Image.open(path) as im:
            im.load()
            if im.mode.startswith(("I", "F")):  # 16/32-bit: converting would clip, not rescale
                raise UnreadableInput(f"{path}: {im.mode} image, tiles must be 8-bit")
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableInput(f"{path}: {e}") from None


def slide_table(csv: Path) -> dict[str, str]:
    table = read_table(csv, ["file", "slide"])
    files, slides = table["file"].str.strip(), table["slide"].str.strip()
    if files.duplicated().any():
        raise ValueError(f"{csv}: file {files[files.duplicated()].iloc[0]!r} is listed twice")
    if (slides == "").any():
        raise ValueError(f"{csv}: empty slide for file {files[slides == ''].iloc[0]!r}")
    return dict(zip(files, slides))


def folder_tiles(root: Path, slide_id: str | None, allow_tile_level_split: bool, max_pixels: int,
                 allow_outside_root: bool = False) -> tuple[Iterator[Tile], dict[str, int]]:
    """(tiles, skipped): the layout and the slide ids are checked now; tiles are decoded as the iterator is
    consumed, and `skipped` (reason -> count: unsupported_format, unreadable, over_pixel_budget,
    not_in_slides_csv, no_slide_id, outside_root: a symlink out of the root, unless allow_outside_root) fills up
    meanwhile."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: tile folder not found")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [d.name for d in folders if d.name.lower() not in LABELS]
    if unknown or not folders:
        raise ValueError(f"{root}: label folders must be normal/ and tumor/ (or tumour/, 0/, 1/); "
                         + (f"found {', '.join(unknown)}" if unknown else "found none"))
    files = [(f, LABELS[d.name.lower()]) for d in folders for f in sorted(d.iterdir())
             if f.is_file() and not f.name.startswith(".")]
    rule = _slide_rule(root, files, slide_id, allow_tile_level_split)
    skipped: Counter = Counter()
    return _tiles(root, files, rule, skipped, max_pixels, allow_outside_root), skipped


class SlideRule(NamedTuple):
    """How a tile's slide is found: find(file, path under root) gives it, or None when the tile is skipped
    and counted under `missing`; `find` None: no slide ids, every tile is split on its own."""
    find: Callable[[Path, str], str | None] | None
    missing: str


def _slide_rule(root: Path, files: list[tuple[Path, str]], slide_id: str | None,
                allow_tile_level_split: bool) -> SlideRule:
    csv = root / "slides.csv"
    if csv.is_file() and slide_id is not None:
        raise ValueError(f"{csv} and sources.histology.slide_id = {slide_id!r} both give slide ids; keep one")
    if csv.is_file():
        slides = slide_table(csv)
        return SlideRule(lambda f, rel: slides.get(rel, slides.get(f.name)), "not_in_slides_csv")
    if slide_id is not None:
        pattern = slide_id_pattern(slide_id)
        if files and not any(_match(pattern, f.name) for f, _ in files):
            raise ValueError(f"{root}: sources.histology.slide_id = {slide_id!r} matches no file name "
                             f"(e.g. {files[0][0].name!r}); fix the regex or add {csv.name} (columns file,slide)")
        return SlideRule(lambda f, rel: _match(pattern, f.name), "no_slide_id")
    if allow_tile_level_split:
        return SlideRule(None, "")
    raise ValueError(f"{root}: tiles have no slide ids, so the split cannot keep a slide's tiles together; add "
                     f"{csv.name} (columns file,slide) or set sources.histology.slide_id (camelyon16, pcam or a "
                     "regex with a group named 'slide'), or accept a split by tile: "
                     "sources.histology.allow_tile_level_split=true")


def _match(pattern: re.Pattern, name: str) -> str | None:
    m = pattern.search(name)
    return m["slide"] if m and m["slide"] else None


def _tiles(root: Path, files: list[tuple[Path, str]], rule: SlideRule, skipped: Counter,
           max_pixels: int, allow_outside_root: bool) -> Iterator[Tile]:
    for f, label in files:
        rel = f.relative_to(root).as_posix()
        if not allow_outside_root and not inside(f, root):
            skip(skipped, "outside_root", f"{rel}: a link out of the source's root")
            continue
        if f.suffix.lower() not in SUFFIXES:
            skip(skipped, "unsupported_format", rel)
            continue
        slide = rule.find(f, rel) if rule.find is not None else None
        if rule.find is not None and slide is None:
            skip(skipped, rule.missing, rel)
            continue
        try:
            image = read_rgb(f, max_pixels)
        except UnreadableInput as e:
            skip(skipped, e.reason, str(e))
            continue
        yield Tile(image, slide, label, rel)

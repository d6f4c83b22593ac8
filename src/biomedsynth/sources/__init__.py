"""Readers of the formats users hold. Each adapter turns files into the records below;
the ingest stages turn records into image sets (see store.py)."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np


class UnreadableInput(Exception):
    """An input file that cannot be decoded; ingest skips it and counts it under `reason`."""
    reason = "unreadable"


class ScanRecord(NamedTuple):
    """One chest X-ray scan listed by a source (NIH CSV, manifest, phantom)."""
    path: Path
    image_id: str
    patient_id: str
    sex: str          # "F" or "M"
    age: int          # years
    normal: bool      # True for "No Finding" / no visible abnormality


class SlideRecord(NamedTuple):
    """One whole-slide image (Camelyon16-style) listed by a source."""
    path: Path
    slide_id: str
    label: str                 # "normal" or "tumor" (the slide's label)
    annotation: Path | None    # ASAP XML of tumour polygons, if any


class Tile(NamedTuple):
    """One ready-cut histology tile (tile folder, PatchCamelyon)."""
    image: np.ndarray     # (H, W, 3) uint8 RGB
    slide_id: str | None  # the slide it came from; None when unknown (then the tile is split on its own)
    label: str            # "normal" or "tumor"
    source: str           # where it was read from, for the metadata table


# Slide ids from tile file names (sources.histology.slide_id): Camelyon16 slide names (tumor_001_x100_y200.png
# -> tumor_001) and PatchCamelyon's `wsi` names (camelyon16_train_normal_017_4.png -> camelyon16_train_normal_017)
SLIDE_ID_PRESETS = {
    "camelyon16": r"^(?P<slide>(?:normal|tumor|test)_\d+)(?=[_.])",
    "pcam": r"^(?P<slide>camelyon16_(?:train_(?:normal|tumor)|test)_\d+)(?=[_.])",
}


def slide_id_pattern(rule: str) -> re.Pattern:
    """The regex of a sources.histology.slide_id value: a preset name, or a regex with a group named
    `slide`; ValueError for anything else."""
    try:
        pattern = re.compile(SLIDE_ID_PRESETS.get(rule, rule))
    except re.error as e:
        raise ValueError(f"slide_id {rule!r}: not a preset ({', '.join(SLIDE_ID_PRESETS)}) nor a regex ({e})") from None
    if "slide" not in pattern.groupindex:
        raise ValueError(f"slide_id {rule!r}: the regex needs a group named 'slide', e.g. ^(?P<slide>[^_]+_\\d+)_")
    return pattern


def inside(path: Path, root: Path) -> bool:
    """Whether `path` lies inside `root` once `..` and symlinks are resolved: a link out of the root is outside."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def symlink_loops(root: Path) -> list[Path]:
    """The symlinks under `root` that loop: a chain back to itself (opening it fails with ELOOP, and DVC, hashing
    the root, stops on it) or a link to a folder above it. Found without following any link, sorted."""
    loops = []
    for folder, dirs, files in os.walk(root):  # os.walk follows no link, so it ends
        for name in dirs + files:
            path = Path(folder) / name
            if not path.is_symlink():
                continue
            try:
                os.stat(path)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    loops.append(path)
                continue  # a dangling link is no loop: it is a missing file
            if path.is_dir() and Path(os.path.realpath(folder)).is_relative_to(os.path.realpath(path)):
                loops.append(path)
    return sorted(loops)


LOOPS_BLOCK = ("# symlink loops in the source roots (DVC stops on them), listed by `biomedsynth check-params`\n",
               "# end of symlink loops\n")


def dvcignore_loops(loops: list[Path], dvcignore: Path) -> list[Path]:
    """List the loops that lie in the project in its .dvcignore, between LOOPS_BLOCK's lines (rewritten each time),
    so DVC, hashing a root, skips them instead of stopping ("Too many levels of symbolic links", exit 255).
    Returns the loops outside the project, which no .dvcignore reaches."""
    from biomedsynth.store import atomic_write_text

    project = Path(os.path.abspath(dvcignore.parent))
    inner = [Path(os.path.abspath(loop)) for loop in loops if Path(os.path.abspath(loop)).is_relative_to(project)]
    before = dvcignore.read_text() if dvcignore.is_file() else ""
    begin, end = LOOPS_BLOCK
    text = before[:before.index(begin)] + before[before.index(end) + len(end):] if begin in before else before
    if inner:  # anchored at the project, gitignore's wildcards escaped
        text += ("" if text.endswith("\n") or not text else "\n") + begin + "".join(
            "/" + re.sub(r"([\\*?\[\]])", r"\\\1", p.relative_to(project).as_posix()) + "\n" for p in inner) + end
    if text != before:
        atomic_write_text(dvcignore, text)
    return [loop for loop in loops if Path(os.path.abspath(loop)) not in inner]

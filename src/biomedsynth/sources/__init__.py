"""Readers of the formats users hold. Each adapter turns files into the records below;
the ingest stages turn records into image sets (see store.py)."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np


class UnreadableInput(Exception):
    """An input file that cannot be decoded; ingest skips it and counts it."""


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
    image: np.ndarray  # (H, W, 3) uint8 RGB
    slide_id: str      # the slide (or best available group) it came from
    label: str         # "normal" or "tumor"
    source: str        # where it was read from, for the metadata table

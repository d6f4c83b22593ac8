"""NIH ChestX-ray14: PNG scans plus the Data_Entry CSV.

Under root: the CSV (Data_Entry_2017*.csv or Data_Entry.csv, unless given) and the images, either in
root/images/ (where the official images_NNN.tar.gz archives all unpack) or split over
root/images_001/images/, root/images_002/images/, ... (the Kaggle copy). An image is found by its
`Image Index` in any of those folders. A scan is normal iff its `Finding Labels` is "No Finding".
Rows are checked and skipped as in manifest.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from biomedsynth.sources import ScanRecord
from biomedsynth.sources.manifest import read_table, scan_records

COLUMNS = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender"]


def find_csv(root: Path) -> Path:
    found = sorted(root.glob("Data_Entry_2017*.csv")) or sorted(root.glob("Data_Entry.csv"))
    if not found:
        raise ValueError(f"{root}: no Data_Entry_2017*.csv or Data_Entry.csv; pass the label CSV as csv")
    if len(found) > 1:
        raise ValueError(f"{root}: several label CSVs ({', '.join(f.name for f in found)}); pass the one to use as csv")
    return found[0]


def image_index(root: Path) -> dict[str, Path]:
    """File name -> path over root/images and root/images_*/images (first folder wins a clash)."""
    index: dict[str, Path] = {}
    for folder in [root / "images", *sorted(root.glob("images_*/images"))]:
        if folder.is_dir():
            for e in os.scandir(folder):
                if e.is_file():
                    index.setdefault(e.name, Path(e.path))
    if not index:
        unpack = " (unpack the images_*.tar.gz archives first)" if any(root.glob("images_*.tar.gz")) else ""
        raise ValueError(f"{root}: no images in images/ or images_*/images/{unpack}")
    return index


def nih_records(root: Path, csv: Path | None = None) -> tuple[list[ScanRecord], dict[str, int]]:
    """ChestX-ray14 scans; returns (records in CSV order, skipped rows counted by reason)."""
    root = Path(root)
    csv = Path(csv) if csv is not None else find_csv(root)
    table = read_table(csv, COLUMNS)
    index = image_index(root)
    return scan_records(pd.DataFrame({
        "path": pd.Series([index.get(n.strip()) for n in table["Image Index"]], dtype=object),
        "image_id": table["Image Index"], "patient_id": table["Patient ID"],
        "sex": table["Patient Gender"], "age": table["Patient Age"],
        "normal": table["Finding Labels"].str.strip() == "No Finding",
    }), csv)

"""Whole-slide images as Camelyon16 ships them: a folder of normal_*/tumor_* slides (any format
OpenSlide reads), ASAP XML tumour annotations, and a writer of pyramidal TIFFs that OpenSlide opens.

DICOM whole-slide images (OpenSlide 4 reads them) come as a folder of .dcm files per slide, one series:
the pyramid levels plus label and overview images. The folder is the slide: its name is the slide id,
and OpenSlide opens the series from any of its pyramid files.

Annotations: ASAP XML, `<Annotation PartOfGroup=...><Coordinates><Coordinate Order X Y/>`, level-0 px.
Camelyon16 puts tumour outlines in groups `_0`/`_1` (or `Tumor`) and outlines of non-tumour tissue
inside a tumour in group `_2` (or `Exclusion`); a point is tumour when it lies in a tumour polygon and
in no exclusion polygon.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import tifffile
from matplotlib.path import Path as PolyPath
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from biomedsynth.sources import SlideRecord, inside
from biomedsynth.sources.manifest import read_table

SLIDE_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".mrxs"}
DICOM_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"  # SOP class: VL Whole Slide Microscopy Image Storage
ANNOTATION_DIRS = ("annotations", "lesion_annotations")  # the second is Camelyon16's own folder name
LABELS = {"normal": "normal", "tumor": "tumor", "tumour": "tumor"}
NAME_LABEL = re.compile(r"(normal|tumou?r)_", re.IGNORECASE)
EXCLUSION_GROUPS = {"_2", "exclusion"}


def _halve(img: np.ndarray) -> np.ndarray:
    """2x2 box average (an odd last row/column is dropped), rounded back to uint8."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    s = img[:h, :w].astype(np.uint16).reshape(h // 2, 2, w // 2, 2, -1).sum((1, 3))
    return ((s + 2) // 4).astype(np.uint8)


def write_pyramidal_tiff(path: Path, rgb: np.ndarray, tile: int = 256, levels: int | None = None,
                         compression: str = "jpeg", quality: int = 90, mpp: float = 0.25) -> None:
    """Write an (H, W, 3) uint8 image as a tiled pyramidal TIFF: level 0 full size, each further level
    half the size as its own page (subfiletype 1), down to where the smallest side fits one tile or
    `levels` levels are written. Same input -> same bytes; written to a temporary name, then renamed."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{path}: need (H, W, 3) uint8 RGB, got {rgb.dtype} {rgb.shape}")
    if tile % 16 or tile <= 0:
        raise ValueError(f"{path}: tile = {tile}, TIFF tiles must be a positive multiple of 16")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = {"compression": compression, "photometric": "rgb", "tile": (tile, tile), "metadata": None,
            "resolutionunit": "CENTIMETER"}
    if compression == "jpeg":
        args["compressionargs"] = {"level": quality}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tw:
            level, k = rgb, 0
            while True:
                px_per_cm = 1e4 / (mpp * 2**k)
                tw.write(level, subfiletype=1 if k else 0, resolution=(px_per_cm, px_per_cm), **args)
                k += 1
                if (levels is not None and k >= levels) or min(level.shape[:2]) <= tile:
                    break
                level = _halve(level)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _annotation(slide_id: str, beside: list[Path], root: Path) -> Path | None:
    for d in (*beside, *(root / a for a in ANNOTATION_DIRS)):
        if (d / f"{slide_id}.xml").is_file():
            return d / f"{slide_id}.xml"
    return None


def _csv_labels(csv: Path) -> dict[str, str]:
    table = read_table(csv, ["slide", "label"])
    labels = {}
    for slide, label in zip(table["slide"].str.strip(), table["label"].str.strip()):
        if label.lower() not in LABELS:
            raise ValueError(f"{csv}: slide {slide!r} has label {label!r}; allowed: normal, tumor (or tumour)")
        labels[Path(slide).stem] = LABELS[label.lower()]
    return labels


def _visible_files(root: Path, suffixes: set[str], outside: list[Path] | None) -> list[Path]:
    """The files of these suffixes under `root`, hidden ones left out; when `outside` is a list, links out of the
    root are left out too and added to it."""
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if outside is None:
        return found
    outside += [p for p in found if not inside(p, root)]
    return [p for p in found if inside(p, root)]


def _dicom_slides(files: list[Path], unsupported: list[str]) -> list[Path]:
    """One pyramid file per DICOM whole-slide image among `files` (a slide = one series in one folder);
    every .dcm file that is no part of such a slide is added to `unsupported` as "path: why"."""
    series: dict[tuple[Path, str], list[Path]] = defaultdict(list)  # (folder, series) -> its pyramid files
    for f in files:
        try:
            # dcmread inflates a deflated file whole, pixel data included (a decompression bomb), and no
            # whole-slide image is deflated: those are left out unread
            if read_file_meta_info(f).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
                unsupported.append(f"{f}: deflated DICOM, not a whole-slide image (left unread)")
                continue
            ds = pydicom.dcmread(f, stop_before_pixels=True,
                                 specific_tags=["SOPClassUID", "SeriesInstanceUID", "ImageType"])
        except Exception as e:  # any parse failure is a property of the file
            unsupported.append(f"{f}: not a readable DICOM file ({type(e).__name__})")
            continue
        if ds.get("SOPClassUID") != DICOM_WSI:
            unsupported.append(f"{f}: DICOM of SOP class {ds.get('SOPClassUID', 'none')}, not a whole-slide image")
            continue
        pyramid = series[(f.parent, str(ds.get("SeriesInstanceUID", "")))]
        if len(ds.get("ImageType", [])) > 2 and ds.ImageType[2] == "VOLUME":  # not a label or overview image
            pyramid.append(f)
    for (folder, uid), pyramid in series.items():
        if not pyramid:
            unsupported.append(f"{folder}: DICOM series {uid} has label or overview images only, no pyramid")
    return [pyramid[0] for pyramid in series.values() if pyramid]


def _file_digest(path: Path) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.digest()


def _check_distinct_files(records: list[SlideRecord]) -> None:
    """No file under two slide ids: a copy would put the same tissue on both sides of the split. Only files
    of equal size are read and hashed, so slides of distinct sizes cost nothing; empty files are left out."""
    by_size: dict[int, list[SlideRecord]] = defaultdict(list)
    for r in records:
        by_size[r.path.stat().st_size].append(r)
    for size, same_size in by_size.items():
        if size == 0 or len(same_size) < 2:
            continue
        first_of: dict[bytes, SlideRecord] = {}
        for r in same_size:
            first = first_of.setdefault(_file_digest(r.path), r)
            if first is not r:
                raise ValueError(f"slides {first.slide_id!r} and {r.slide_id!r} are the same file ({first.path} and "
                                 f"{r.path}); remove the copy")


def list_slides(root: Path, labels_csv: Path | None = None, unsupported: list[str] | None = None,
                outside: list[Path] | None = None) -> list[SlideRecord]:
    """Slides (*.tif, *.tiff, *.svs, *.ndpi, *.mrxs, DICOM folders) under `root`, subfolders included,
    sorted by path. .dcm files that are no part of a DICOM whole-slide image are left out and named in
    `unsupported` ("path: why"), when a list is given; so are files that are links out of the root, in
    `outside`, when a list is given (none is: sources.histology.allow_outside_root).

    Label from `labels_csv` (columns slide,label; slide = file name or stem) when it lists the slide,
    else from the Camelyon16 name (normal_001.tif, tumor_001.tif). A slide with neither is an error, not
    a skip: dropping it silently would change the study's class balance behind the user's back; so are two
    slides of one name and one file under two names.
    Annotation: <stem>.xml beside the slide (a DICOM slide: in or beside its folder), or in
    root/annotations/ or root/lesion_annotations/."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: slide folder not found")
    csv = _csv_labels(Path(labels_csv)) if labels_csv is not None else {}
    dicom = _dicom_slides(_visible_files(root, {".dcm"}, outside), unsupported if unsupported is not None else [])
    found = sorted([(p, p.stem, [p.parent]) for p in _visible_files(root, SLIDE_SUFFIXES, outside)]
                   + [(p, p.parent.name, [p.parent, p.parent.parent]) for p in dicom])
    if not found:
        raise ValueError(f"{root}: no slides ({', '.join(sorted(SLIDE_SUFFIXES))} or DICOM) found")
    records, seen = [], {}
    for p, slide_id, beside in found:
        if slide_id in seen:
            raise ValueError(f"{root}: two slides named {slide_id!r} ({seen[slide_id]} and {p}); slide ids must be unique")
        seen[slide_id] = p
        m = NAME_LABEL.match(slide_id)
        label = csv.get(slide_id) or (LABELS[m[1].lower()] if m else None)
        if label is None:
            raise ValueError(f"{p}: cannot tell the slide's label: name it normal_*/tumor_* or list it in a "
                             "labels CSV (columns slide,label)")
        records.append(SlideRecord(p, slide_id, label, _annotation(slide_id, beside, root)))
    _check_distinct_files(records)
    return records


def read_annotation_polygons(xml_path: Path, exclusion: bool = False) -> list[np.ndarray]:
    """The tumour polygons of an ASAP XML file (with exclusion=True: the exclusion polygons) as
    (N, 2) float64 arrays of level-0 (x, y), vertices in `Order`. Annotations of under 3 points
    (ASAP "Dot") enclose nothing and are left out."""
    try:
        tree = ET.parse(xml_path)
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"{xml_path}: not a readable ASAP XML file ({e})") from None
    polygons = []
    for ann in tree.getroot().iter("Annotation"):
        if (ann.get("PartOfGroup", "").strip().lower() in EXCLUSION_GROUPS) != exclusion:
            continue
        try:
            pts = sorted((float(c.get("Order", i)), float(c.get("X").replace(",", ".")),
                          float(c.get("Y").replace(",", "."))) for i, c in enumerate(ann.iter("Coordinate")))
        except (AttributeError, ValueError):  # a missing attribute, or not a number
            raise ValueError(f"{xml_path}: annotation {ann.get('Name')!r} has a coordinate without a "
                             "numeric X, Y or Order") from None
        if len(pts) >= 3:
            polygons.append(np.array(pts)[:, 1:])
    return polygons


def write_annotation_xml(path: Path, polygons: list[np.ndarray], exclusions: list[np.ndarray] = ()) -> None:
    """Write tumour polygons (group _0) and exclusion polygons (group _2) as ASAP XML, atomically."""
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    items = [(p, "_0", "#F4FA58") for p in polygons] + [(p, "_2", "#64FE2E") for p in exclusions]
    for i, (poly, group, color) in enumerate(items):
        ann = ET.SubElement(anns, "Annotation", Name=f"Annotation {i}", Type="Polygon", PartOfGroup=group,
                            Color=color)
        coords = ET.SubElement(ann, "Coordinates")
        for k, (x, y) in enumerate(np.asarray(poly, float)):
            ET.SubElement(coords, "Coordinate", Order=str(k), X=f"{x:.2f}", Y=f"{y:.2f}")
    groups = ET.SubElement(root, "AnnotationGroups")
    for name, color in (("_0", "#FF0000"), ("_2", "#00FF00")):
        ET.SubElement(ET.SubElement(groups, "Group", Name=name, PartOfGroup="None", Color=color), "Attributes")
    ET.indent(root)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        ET.ElementTree(root).write(f, encoding="utf-8", xml_declaration=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def points_in_tumour(points: np.ndarray, tumour: list[np.ndarray], exclusion: list[np.ndarray]) -> np.ndarray:
    """Boolean per (x, y) point: inside some tumour polygon and inside no exclusion polygon."""
    points = np.asarray(points, float).reshape(-1, 2)
    inside = np.zeros(len(points), bool)
    for poly in tumour:
        inside |= PolyPath(poly).contains_points(points)
    for poly in exclusion:
        inside &= ~PolyPath(poly).contains_points(points)
    return inside

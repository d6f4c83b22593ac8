"""Ingest stages: list the raw data with its source adapter, decode, preprocess, write an image set."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np

from biomedsynth.params import Params
from biomedsynth.paths import INGEST_DETAILS
from biomedsynth.sources import symlink_loops
from biomedsynth.store import write_json


def pixel_digest(image: np.ndarray) -> bytes | None:
    """A hash of an image's pixels (values, shape and type, not the file's bytes: one scan saved as PNG and
    as DICOM is one image); None for a uniform image, whose one value says nothing about where it came from."""
    image = np.ascontiguousarray(image)
    if image.size == 0 or (image == image.flat[0]).all():
        return None
    h = hashlib.blake2b(f"{image.dtype.str}{image.shape}".encode(), digest_size=16)
    h.update(image.data)
    return h.digest()


class PixelOwners:
    """Whose each image content seen in one ingest run is (a patient, a slide): identical pixels under two
    owners would put one image on both sides of the train/test split, or tell that an id is wrong."""

    def __init__(self, owner: str):
        self.owner = owner  # "patient" or "slide", for the message
        self.first: dict[bytes, tuple[str | None, str]] = {}  # digest -> (owner, source) of its first image

    def is_repeat(self, digest: bytes | None, owner: str | None, source: str) -> bool:
        """True when these pixels came before under the same owner (or where one is unknown): skip this copy.
        ValueError, naming both owners and sources, when they came before under another owner."""
        if digest is None:
            return False
        if digest not in self.first:
            self.first[digest] = (owner, source)
            return False
        first_owner, first_source = self.first[digest]
        if None not in (owner, first_owner) and owner != first_owner:
            raise ValueError(f"identical pixels under two {self.owner}s: {first_owner!r} ({first_source}) and "
                             f"{owner!r} ({source}); one image cannot belong to both: drop the wrong copy or fix "
                             f"its {self.owner} id")
        return True


# Summary keys that name slides, files or patients: kept in the DVC-cached <out>/ingest.json, counted in the metrics
NAMING_KEYS = ("per_slide", "skipped_slides", "slides_without_tissue_tiles", "unsupported_files", "unreadable_examples")


def shareable(summary: dict, details: Path) -> dict:
    """The summary as git-tracked metrics may hold it: counts in place of every slide id, file name and path
    (a pull request of a run on real data publishes the metrics); `details` names the local file with them."""
    out = {k: v for k, v in summary.items() if k not in NAMING_KEYS}
    if "per_slide" in summary:
        kept = np.array([s["kept"] for s in summary["per_slide"].values()])
        out["tiles_kept_per_slide"] = {"slides": len(kept), "min": int(kept.min()), "median": float(np.median(kept)),
                                       "max": int(kept.max())} if len(kept) else {"slides": 0}
    for key in ("slides_without_tissue_tiles", "unsupported_files"):
        if key in summary:
            out[key] = len(summary[key])
    out["details"] = f"{details} (which slides and files: DVC-cached, never in git)"
    return out


def ingest(modality: str, p: Params, out: Path, summary_path: Path) -> dict:
    """Run ingest@<modality>: data/raw -> data/interim/<modality>, its summary with slide ids and file names to
    <out>/ingest.json, and the same counted without them to `summary_path` (git-tracked metrics)."""
    if modality == "xray":
        from biomedsynth.ingest.xray import ingest_xray
        from biomedsynth.sources.manifest import manifest_records
        from biomedsynth.sources.nih import nih_records

        src, cfg = p.sources.xray, p.ingest.xray
        records, listing_skipped = (nih_records(src.root, src.csv) if src.format == "nih"
                                    else manifest_records(src.csv, src.root, src.allow_outside_root))
        summary = ingest_xray(records, out, size=cfg.image_size, normal_only=cfg.normal_only,
                              on_no_lungs=cfg.on_no_lungs, lo_pct=cfg.percentiles[0],
                              hi_pct=cfg.percentiles[1], fit=cfg.fit, workers=p.ingest.workers,
                              max_pixels=p.ingest.max_pixels)
    elif modality == "histology":
        from biomedsynth.ingest.histology import ingest_histology

        src, cfg = p.sources.histology, p.ingest.histology
        slides = tiles = None
        unsupported: list[str] = []  # "path: why" of .dcm files that are no part of a DICOM whole-slide image
        if src.format == "slides":
            from biomedsynth.sources.wsi import list_slides
            outside: list[Path] | None = None if src.allow_outside_root else []
            slides = list_slides(src.root, src.labels_csv, unsupported, outside)
            listing_skipped = {k: n for k, n in (("unsupported", len(unsupported)),
                                                 ("outside_root", len(outside or []))) if n}
        elif src.format == "tiles":
            from biomedsynth.sources.folder import folder_tiles
            tiles, listing_skipped = folder_tiles(src.root, src.slide_id, src.allow_tile_level_split,
                                                  p.ingest.max_pixels, src.allow_outside_root)
        else:
            from biomedsynth.sources.pcam import pcam_tiles
            tiles, listing_skipped = pcam_tiles(src.root, src.allow_tile_level_split, p.ingest.max_pixels)
        summary = ingest_histology(slides, tiles, out, tile_size=cfg.tile_size, level=cfg.level,
                                   min_tissue=cfg.min_tissue, tiles_per_slide=cfg.tiles_per_slide,
                                   tumor_label=cfg.tumor_label, seed=p.seed, max_pixels=p.ingest.max_pixels)
        summary["unsupported_files"] = unsupported
    else:
        raise ValueError(f"unknown modality '{modality}' (allowed: xray, histology)")
    # a symlink loop in the root: never followed, counted (and dvcignored by check-params, else DVC stops on it)
    if loops := symlink_loops(src.root):
        listing_skipped = {**listing_skipped, "symlink_loop": len(loops)}
    # timings differ run to run: printed, not written, so the metrics file (and dvc.lock) change only
    # when the results do
    timing = {k: summary.pop(k) for k in ("seconds", "scans_per_s", "tiles_per_s") if k in summary}
    summary = {"listing_skipped": dict(listing_skipped), **summary}
    # every input skipped, when listed or when read, counted by reason
    skipped = Counter(listing_skipped) + Counter(summary["skipped_by_reason"])
    summary["skipped_by_reason"] = dict(sorted(skipped.items()))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / INGEST_DETAILS, summary)
    write_json(summary_path, shareable(summary, out / INGEST_DETAILS))
    summary["timing"] = timing
    if summary["written"] == 0:
        raise ValueError(f"ingest@{modality}: no usable input in {src.root}; see {out / INGEST_DETAILS} for what was skipped")
    return summary

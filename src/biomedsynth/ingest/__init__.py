"""Ingest stages: list the raw data with its source adapter, decode, preprocess, write an image set."""
from __future__ import annotations

from pathlib import Path

from biomedsynth.params import Params
from biomedsynth.store import write_json


def ingest(modality: str, p: Params, out: Path, summary_path: Path) -> dict:
    """Run ingest@<modality>: data/raw -> data/interim/<modality>, summary to `summary_path`."""
    if modality == "xray":
        from biomedsynth.ingest.xray import ingest_xray
        from biomedsynth.sources.manifest import manifest_records
        from biomedsynth.sources.nih import nih_records

        src, cfg = p.sources.xray, p.ingest.xray
        records, listing_skipped = (nih_records(src.root, src.csv) if src.format == "nih"
                                    else manifest_records(src.csv, src.root))
        summary = ingest_xray(records, out, size=cfg.image_size, normal_only=cfg.normal_only,
                              on_no_lungs=cfg.on_no_lungs, lo_pct=cfg.percentiles[0],
                              hi_pct=cfg.percentiles[1], workers=p.ingest.workers)
    elif modality == "histology":
        from biomedsynth.ingest.histology import ingest_histology

        src, cfg = p.sources.histology, p.ingest.histology
        slides = tiles = None
        if src.format == "slides":
            from biomedsynth.sources.wsi import list_slides
            slides, listing_skipped = list_slides(src.root, src.labels_csv), {}
        elif src.format == "tiles":
            from biomedsynth.sources.folder import folder_tiles
            tiles, listing_skipped = folder_tiles(src.root)
        else:
            from biomedsynth.sources.pcam import pcam_tiles
            tiles, listing_skipped = pcam_tiles(src.root)
        summary = ingest_histology(slides, tiles, out, tile_size=cfg.tile_size, level=cfg.level,
                                   min_tissue=cfg.min_tissue, tiles_per_slide=cfg.tiles_per_slide,
                                   tumor_label=cfg.tumor_label, seed=p.seed)
    else:
        raise ValueError(f"unknown modality '{modality}' (allowed: xray, histology)")
    # timings differ run to run: printed, not written, so the metrics file (and dvc.lock) change only
    # when the results do
    timing = {k: summary.pop(k) for k in ("seconds", "scans_per_s", "tiles_per_s") if k in summary}
    summary = {"listing_skipped": dict(listing_skipped), **summary}
    write_json(summary_path, summary)
    summary["timing"] = timing
    if summary["written"] == 0:
        raise ValueError(f"ingest@{modality}: no usable input in {src.root}; see {summary_path} for what was skipped")
    return summary

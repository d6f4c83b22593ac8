"""ingest@histology: find the tissue on each whole-slide image, cut it into tiles and stream a random
sample of tissue tiles per slide into an image set; or take ready-cut tiles (tile folder, PatchCamelyon).

Tissue is found classically on a low-resolution level: stained tissue is coloured, glass and dust are
grey or white, so an Otsu threshold on saturation (kept within sane bounds for slides that are nearly
all glass or all tissue) separates them; small specks are removed and small holes filled. Marker ink
of green-cyan hue, a colour neither stain has, is excluded too.

Memory: a slide's mask level is read whole (at most MASK_PIXELS pixels); level-0 pixels are read one
tile at a time, and one slide's sampled tiles (at most tiles_per_slide per label) are held before they are
written, so a slide that fails halfway adds nothing. A slide whose mask level (when none is small enough), or
whose stored tiles (OpenSlide decodes one whole to read any part of it), are over the pixel budget
(ingest.max_pixels) is skipped and counted before anything is decoded; the slide's own size is not limited.
"""
from __future__ import annotations

import time
import zlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import openslide
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects
from tqdm import tqdm

from biomedsynth.ingest import PixelOwners, pixel_digest
from biomedsynth.sources import SlideRecord, Tile
from biomedsynth.sources.budget import OverPixelBudget, check_pixels
from biomedsynth.sources.wsi import points_in_tumour, read_annotation_polygons
from biomedsynth.store import ImageSetWriter

SATURATION_BOUNDS = (0.07, 0.25)  # Otsu's threshold clipped into this range
INK_HUES = (70, 200)              # degrees: green to cyan marker ink, no H&E colour
MIN_SPECK = 0.0005                # objects smaller than this share of the thumbnail are dust
MASK_PIXELS = 1 << 24             # largest level read whole for the tissue mask
LABELS = ("normal", "tumor")
TILE_LEVEL_WARNING = "split by tile: slides may leak between train and test"
# the summary's counts of the other kind of input (slides or ready-cut tiles), so every summary has the same keys
NOTHING_READ = {"slides_listed": 0, "slides_read": 0, "slides_skipped": {}, "skipped_slides": {},
                "slides_without_tissue_tiles": [], "grid_tiles": 0, "background_tiles": 0, "tiles_in": 0,
                "tiles_skipped": {}}


class _Skip(Exception):
    """A slide that cannot be used: `reason` is the category counted in the summary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def tissue_mask(thumb_rgb: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of stained tissue in an RGB(A) uint8 thumbnail; glass, grey dust, black or
    green-cyan marker and specks excluded."""
    rgb = np.asarray(thumb_rgb)[..., :3].astype(np.float32)
    mx, mn = rgb.max(2), rgb.min(2)
    sat = ndimage.gaussian_filter((mx - mn) / np.maximum(mx, 1), 1.0)
    lo, hi = SATURATION_BOUNDS
    t = np.clip(threshold_otsu(sat), lo, hi) if np.ptp(sat) > 0 else hi
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360
    mask = (sat > t) & ~((hue > INK_HUES[0]) & (hue < INK_HUES[1]))
    mask = ndimage.binary_opening(mask, np.ones((2, 2), bool))
    speck = max(4, int(MIN_SPECK * mask.size))
    return remove_small_holes(remove_small_objects(mask, max_size=speck), max_size=speck)


def _rgb(region: Image.Image) -> np.ndarray:
    """OpenSlide's RGBA as RGB; fully transparent pixels (outside the scanned area) as white glass."""
    a = np.asarray(region)
    return np.where(a[..., 3:] == 0, np.uint8(255), a[..., :3])


def _mask_level(slide: openslide.OpenSlide, level: int, tile_size: int, max_pixels: int) -> int:
    """The coarsest level whose pixels are at most a quarter tile at `level` (a tile covers at least 4x4
    mask pixels), among levels small enough to read whole (else the smallest level)."""
    ds, most = slide.level_downsamples, min(MASK_PIXELS, max_pixels)
    small = [k for k, (w, h) in enumerate(slide.level_dimensions) if w * h <= most] or [slide.level_count - 1]
    fine = [k for k in small if ds[k] <= ds[level] * tile_size / 4]
    return max(fine) if fine else min(small)


def _check_budget(slide: openslide.OpenSlide, path: Path, mask_level: int, levels: tuple[int, ...],
                  max_pixels: int) -> None:
    """_Skip when one read would decode more than the budget: the mask level, read whole, or a tile stored
    at one of `levels` (formats that do not say their tile size are read in small regions anyway)."""
    try:
        check_pixels(f"{path} (level {mask_level}, read whole for the tissue mask)",
                     *slide.level_dimensions[mask_level], max_pixels)
        for k in levels:
            tile = [slide.properties.get(f"openslide.level[{k}].tile-{side}") for side in ("width", "height")]
            if None not in tile:
                check_pixels(f"{path} (a tile stored at level {k})", int(tile[0]), int(tile[1]), max_pixels)
    except OverPixelBudget as e:
        raise _Skip(e.reason, str(e)) from None


def _tissue_fractions(mask: np.ndarray, boxes: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Tissue share of each level-0 box (x0, y0, x1, y1) on a mask `scale` = (sx, sy) times smaller."""
    ii = np.pad(mask.cumsum(0, dtype=np.int64).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    x0 = np.clip(np.round(boxes[:, 0] * scale[0]).astype(int), 0, w - 1)
    y0 = np.clip(np.round(boxes[:, 1] * scale[1]).astype(int), 0, h - 1)
    x1 = np.clip(np.maximum(np.round(boxes[:, 2] * scale[0]).astype(int), x0 + 1), 1, w)
    y1 = np.clip(np.maximum(np.round(boxes[:, 3] * scale[1]).astype(int), y0 + 1), 1, h)
    return (ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]) / ((x1 - x0) * (y1 - y0))


def _cut_slide(rec: SlideRecord, tile_size: int, level: int, min_tissue: float, tiles_per_slide: int,
               tumor_label: str, seed: int, max_pixels: int) -> tuple[list[np.ndarray], list[dict], int, int]:
    """(tiles, metas, grid tiles, background tiles) of one slide; _Skip when it cannot be used."""
    polygons = None
    if tumor_label == "annotation" and rec.label == "tumor":
        if rec.annotation is None:
            raise _Skip("no_annotation", "tumor slide without an ASAP XML (needed for tumor_label=annotation)")
        try:
            polygons = (read_annotation_polygons(rec.annotation), read_annotation_polygons(rec.annotation, True))
        except ValueError as e:
            raise _Skip("bad_annotation", str(e)) from None
    try:
        slide = openslide.OpenSlide(str(rec.path))
    except (openslide.OpenSlideError, OSError, ValueError) as e:
        raise _Skip("unreadable", f"{rec.path}: {e}") from None
    with slide:
        if not 0 <= level < slide.level_count:
            raise _Skip("no_such_level", f"{rec.path}: level {level} requested, the slide has {slide.level_count} "
                        f"level(s) (0-{slide.level_count - 1})")
        try:
            m = _mask_level(slide, level, tile_size, max_pixels)
            _check_budget(slide, rec.path, m, (m, level), max_pixels)
            mask = tissue_mask(_rgb(slide.read_region((0, 0), m, slide.level_dimensions[m])))
            (w0, h0), (lw, lh), ds = slide.dimensions, slide.level_dimensions[level], slide.level_downsamples[level]
            ty, tx = np.mgrid[:lh // tile_size, :lw // tile_size].reshape(2, -1)
            span = tile_size * ds  # a tile's side in level-0 px
            x0, y0 = np.round(tx * span).astype(np.int64), np.round(ty * span).astype(np.int64)
            boxes = np.stack([x0, y0, x0 + span, y0 + span], 1)
            frac = _tissue_fractions(mask, boxes, (mask.shape[1] / w0, mask.shape[0] / h0))
            cand = np.flatnonzero(frac >= min_tissue)
            cand_labels = np.full(cand.size, rec.label, object)
            if polygons is not None:
                centres = np.stack([x0[cand] + span / 2, y0[cand] + span / 2], 1)
                cand_labels = np.where(points_in_tumour(centres, *polygons), "tumor", "normal").astype(object)
            # up to tiles_per_slide of each label, so the small tumour regions are not outnumbered
            rng = np.random.default_rng([seed, zlib.crc32(rec.slide_id.encode())])
            chosen = np.sort(np.concatenate([
                rng.choice(np.flatnonzero(cand_labels == lab), min(tiles_per_slide, int((cand_labels == lab).sum())),
                           replace=False) for lab in sorted(set(cand_labels))] or [np.array([], int)]))
            pick, labels = cand[chosen], cand_labels[chosen]
            images, metas = [], []
            for i, label in zip(pick, labels):
                images.append(_rgb(slide.read_region((int(x0[i]), int(y0[i])), level, (tile_size, tile_size))))
                metas.append({"image_id": f"{rec.slide_id}_L{level}_x{x0[i]}_y{y0[i]}", "patient_id": rec.slide_id,
                              "label": str(label), "slide_label": rec.label, "x": int(x0[i]), "y": int(y0[i]),
                              "level": level, "tissue_fraction": round(float(frac[i]), 4), "source": str(rec.path)})
        except openslide.OpenSlideError as e:
            raise _Skip("unreadable", f"{rec.path}: {e}") from None
    return images, metas, frac.size, frac.size - cand.size


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """A tile as (size, size, 3) uint8: RGB(A) only, centre-cropped to a square, resized when needed."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"need (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    s = min(h, w)
    image = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s, :3]
    if s != size:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))
    return image


def _add_slides(slides: list[SlideRecord], writer: ImageSetWriter, tile_size: int, level: int, min_tissue: float,
                tiles_per_slide: int, tumor_label: str, seed: int, max_pixels: int) -> dict:
    """Cut each slide and write its sampled tiles; returns this part of the summary."""
    per_label, reasons, skipped, empty, per_slide = Counter(), Counter(), {}, [], {}
    for rec in tqdm(slides, desc="ingest histology", unit="slide"):
        try:
            images, metas, n_grid, n_bg = _cut_slide(rec, tile_size, level, min_tissue, tiles_per_slide,
                                                     tumor_label, seed, max_pixels)
        except _Skip as e:
            reasons[e.reason] += 1
            skipped[rec.slide_id] = str(e)
            continue
        per_slide[rec.slide_id] = {"grid": n_grid, "background": n_bg, "kept": len(images)}
        if not images:
            empty.append(rec.slide_id)
        writer.add_many(images, metas)
        per_label.update(m["label"] for m in metas)
    return {"slides_listed": len(slides), "slides_read": len(per_slide), "slides_skipped": dict(reasons),
            "skipped_slides": skipped, "slides_without_tissue_tiles": empty,
            "grid_tiles": sum(c["grid"] for c in per_slide.values()),
            "background_tiles": sum(c["background"] for c in per_slide.values()),
            "per_label": per_label, "per_slide": per_slide, "split_unit": "slide"}


def _add_tiles(tiles: Iterable[Tile], writer: ImageSetWriter, tile_size: int) -> dict:
    """Write ready-cut tiles; returns this part of the summary. A tile without a slide id is a group of its
    own (patient_id tile_<i>), so the split is by tile. A second copy of a tile's pixels under the same slide
    is skipped and counted (duplicate_pixels); under another slide it stops the ingest (PixelOwners)."""
    owners = PixelOwners("slide")
    tiles_in, skipped, per_label, per_slide, split_unit = 0, Counter(), Counter(), Counter(), "slide"
    for i, t in enumerate(tqdm(tiles, desc="ingest tiles", unit="tile")):
        tiles_in += 1
        if t.label not in LABELS:
            skipped["bad_label"] += 1
            continue
        try:
            image = _square(t.image, tile_size)
        except ValueError:
            skipped["bad_image"] += 1
            continue
        if owners.is_repeat(pixel_digest(t.image), t.slide_id, t.source):
            skipped["duplicate_pixels"] += 1
            continue
        if t.slide_id is None:
            group, split_unit = f"tile_{i}", "tile"
        else:
            group = t.slide_id
            per_slide[group] += 1
        writer.add(image, image_id=f"{group}_t{i}", patient_id=group, label=t.label, slide_label=t.label,
                   x=-1, y=-1, level=-1, tissue_fraction=-1.0, source=t.source)
        per_label[t.label] += 1
    return {"tiles_in": tiles_in, "tiles_skipped": dict(skipped), "per_label": per_label,
            "per_slide": {slide: {"kept": n} for slide, n in per_slide.items()}, "split_unit": split_unit}


def _why_none(summary: dict, min_tissue: float) -> str:
    """Why a summary counts no tile written, in a few words."""
    if summary["skipped_slides"]:
        return "; ".join(f"{k}: {v}" for k, v in list(summary["skipped_slides"].items())[:3])
    if summary["slides_read"]:
        return f"no tiles with tissue_fraction >= {min_tissue}"
    if summary["tiles_in"]:
        return f"{summary['tiles_in']} tiles read, skipped: {summary['tiles_skipped']}"
    return "no slides or tiles given"


def ingest_histology(slides: list[SlideRecord] | None, tiles: Iterable[Tile] | None, out: Path, tile_size: int,
                     level: int, min_tissue: float, tiles_per_slide: int, tumor_label: str, seed: int,
                     max_pixels: int) -> dict:
    """Write an image set of (tile_size, tile_size, 3) tiles to `out` with meta columns image_id,
    patient_id (the slide), label, slide_label, x, y (level-0 px of the tile's top-left; -1 for ready-cut
    tiles), level (-1 for ready-cut), tissue_fraction (-1 for ready-cut), source. Labels: tumor_label
    "slide" = every tile takes its slide's label (the study); "annotation" = a tumour slide's tile is
    tumor when its centre lies in a tumour polygon and in no exclusion polygon. Slides that cannot be used
    are skipped and counted by reason and name; it is an error when nothing at all is written.

    Returns the summary: besides the counts (tiles_skipped.duplicate_pixels: repeated ready-cut tiles;
    skipped_by_reason: the slides or tiles skipped here, by reason), per_slide (slide -> grid, background
    and kept tiles of a whole-slide image; kept tiles of ready-cut ones with a slide id), split_unit ("slide", or "tile" when some ready-cut tiles had no slide id) and
    warnings (what a reader of the results must know)."""
    if tumor_label not in ("slide", "annotation"):
        raise ValueError(f"tumor_label = {tumor_label!r}: allowed slide, annotation")
    if (slides is None) == (tiles is None):
        raise ValueError("ingest_histology needs slides or tiles, one of them")
    t0 = time.perf_counter()
    with ImageSetWriter(out, (tile_size, tile_size, 3)) as writer:
        summary = {**NOTHING_READ, **(
            _add_slides(slides, writer, tile_size, level, min_tissue, tiles_per_slide, tumor_label, seed,
                        max_pixels)
            if slides is not None else _add_tiles(tiles, writer, tile_size))}
        written = sum(summary["per_label"].values())
        if not written:
            raise ValueError(f"ingest histology wrote no tiles ({_why_none(summary, min_tissue)})")
    seconds = time.perf_counter() - t0
    return {**summary, "written": written, "per_label": dict(summary["per_label"]),
            "skipped_by_reason": dict(Counter(summary["slides_skipped"]) + Counter(summary["tiles_skipped"])),
            "warnings": [TILE_LEVEL_WARNING] if summary["split_unit"] == "tile" else [],
            "seconds": round(seconds, 2), "tiles_per_s": round(written / max(seconds, 1e-9), 1)}

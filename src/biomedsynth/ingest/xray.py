"""ingest@xray: decode each scan, find the lung fields, normalise brightness by percentiles inside
the lungs' convex hull, make it square (`fit`), resize, and stream the result into an image set.
Identical pixels under two patients stop the ingest; under one patient, the second copy is skipped.

The lung finder is classical image processing (no learned weights), on a 256 px copy:
1. erase the ribs (a vertical grey opening), close thin dark gaps, smooth lightly;
2. threshold dark regions at a series of levels (one Otsu level misses a lung that is denser than the
   other, or is set by the outside air), drop components touching the border (the outside air), and
   take the largest side-by-side pair of lung-sized components as lung cores; else one wide central
   component (both lungs merged); else one lung plus its mirror image about the spine as the seed
   of the other (a lung whose thin wall lets it run into the outside air at every level);
3. grow each core over its watershed basin (bounded by the ridge to the outside air and to the other
   lung) and keep its dark part (Otsu within the basin); reject a basin without clear contrast or a
   lung grown into the outside air; fill holes.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from itertools import combinations, islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image, disk
from skimage.segmentation import watershed
from tqdm import tqdm

from biomedsynth.ingest import PixelOwners, pixel_digest
from biomedsynth.lifetime import die_with_parent
from biomedsynth.sources import ScanRecord, UnreadableInput
from biomedsynth.sources.scans import read_scan
from biomedsynth.store import ImageSetWriter

WORK_SIDE = 256           # long side of the copy the lung finder works on
RIB_SPAN = 15             # px at WORK_SIDE; a vertical opening this tall erases ribs crossing the lungs
BRIDGE = disk(2)          # a closing with this cuts thin dark bridges (lung to outside air, between ribs)
SMOOTH_SIGMA = 1.0        # px at WORK_SIDE; quiets noise, keeps thin chest walls
AIR = 0.1                 # share of the 1-99% range below which a pixel counts as air
LEVELS = np.linspace(0.05, 0.75, 11)  # dark thresholds tried, as quantiles of the non-air pixels
LUNG_AREA = (0.01, 0.40)  # one lung (core)'s share of the image
LUNG_WIDTH = 0.08         # one lung (core)'s least share of the image width (drops dark strips at the sides)
LUNG_CX = (0.12, 0.88)    # where a lung's centroid may lie, as shares of the image width
MERGED_AREA = 0.08        # both lungs as one component: at least this share of the image ...
MERGED_WIDTH = 0.40       # ... and at least this share of its width, across the middle
MIN_CONTRAST = 0.2        # lung vs rest of its basin, as a share of the image's 1-99% range
MIN_SOLIDITY = 0.6        # a grown lung less convex than this leaked: keep its core instead
TRIES = 3                 # candidate core sets grown at most
ON_NO_LUNGS = ("skip", "central")
FITS = ("stretch", "crop", "pad")
SCAN_CHUNK = 16           # scans per task sent to a worker
NORMALISE_ROWS = 256      # rows normalised at once (8192 px wide: 8 MiB of float32)


def _shrink(img: np.ndarray) -> np.ndarray:
    """Area-averaged float32 copy with long side WORK_SIDE (aspect ratio kept)."""
    h, w = img.shape
    k = WORK_SIDE / max(h, w)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    return np.asarray(Image.fromarray(np.asarray(img, np.float32)).resize(size, Image.Resampling.BOX))


def _grow(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A small boolean mask brought to `shape` (bilinear, then halfway threshold)."""
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize(shape[::-1], Image.Resampling.BILINEAR)
    return np.asarray(im) > 127


class Blob(NamedTuple):
    """A dark component enclosed by tissue at one threshold level."""
    mask: np.ndarray
    area: int
    cx: float       # centroid column
    rows: slice
    cols: slice


def _enclosed_blobs(s: np.ndarray) -> list[Blob]:
    """Lung-sized dark components not touching the border, at every threshold level."""
    h, w = s.shape
    blobs = []
    for t in np.quantile(s[s > AIR], LEVELS):
        lab, n = ndimage.label(s < t)
        area = np.bincount(lab.ravel(), minlength=n + 1)
        sized = (area >= LUNG_AREA[0] * h * w) & (area <= LUNG_AREA[1] * h * w)
        sized[np.concatenate([lab[[0, -1]].ravel(), lab[:, [0, -1]].ravel(), [0]])] = False  # outside air
        for i in np.flatnonzero(sized):
            mask = lab == i
            column = mask.sum(0)
            xs, ys = np.flatnonzero(column), np.flatnonzero(mask.any(1))
            cx = float(column @ np.arange(w)) / area[i]
            if xs[-1] + 1 - xs[0] >= LUNG_WIDTH * w and LUNG_CX[0] * w <= cx <= LUNG_CX[1] * w:
                blobs.append(Blob(mask, int(area[i]), cx, slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1)))
    return blobs


def _side_by_side(a: Blob, b: Blob, w: int) -> bool:
    """Two disjoint blobs placed as a right and a left lung are."""
    rows = min(a.rows.stop, b.rows.stop) - max(a.rows.start, b.rows.start)
    return (rows >= 0.5 * min(a.rows.stop - a.rows.start, b.rows.stop - b.rows.start)  # same height band
            and abs(a.cx - b.cx) >= 0.15 * w                                         # apart horizontally
            and 0.25 * w <= (a.cx + b.cx) / 2 <= 0.75 * w                             # straddling the middle
            and min(a.area, b.area) >= 0.2 * max(a.area, b.area)                      # of comparable size
            and not (a.mask & b.mask).any())


def _mirrored(b: Blob, s: np.ndarray) -> Blob:
    """A seed for the lung opposite `b`: `b` reflected about the spine (the brightest column of the
    middle half over b's rows) and shrunk, for when the other lung leaks to the outside at every level."""
    w = s.shape[1]
    spine = w // 4 + int(s[b.rows, w // 4: 3 * w // 4].mean(0).argmax())
    shift, flipped = 2 * spine - (w - 1), b.mask[:, ::-1]
    mask = np.zeros_like(b.mask)
    if shift >= 0:
        mask[:, shift:] = flipped[:, : w - shift]
    else:
        mask[:, : w + shift] = flipped[:, -shift:]
    mask = ndimage.binary_erosion(mask, iterations=5) & ~b.mask
    return b._replace(mask=mask, cx=2 * spine - b.cx)


def _solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area (pixel centres; boundary pixels suffice for the hull)."""
    edge = np.argwhere(mask & ~ndimage.binary_erosion(mask))
    return float(mask.sum() / max(ConvexHull(edge, qhull_options="QJ").volume, 1.0)) if len(edge) >= 3 else 0.0


def _grow_cores(s: np.ndarray, cores: tuple[Blob, ...]) -> np.ndarray | None:
    """Each core grown to the dark part of its watershed basin; None if a basin lacks contrast.
    Basins are coarse regions: they are found at half resolution, which is 4x cheaper."""
    half = s[::2, ::2]
    markers = np.zeros(half.shape, np.int32)
    markers[[0, -1]] = markers[:, [0, -1]] = 1  # the outside
    for k, core in enumerate(cores, 2):
        markers[core.mask[::2, ::2]] = k
    basins = watershed(half, markers).repeat(2, 0).repeat(2, 1)[: s.shape[0], : s.shape[1]]
    lungs = np.zeros(s.shape, bool)
    for k, core in enumerate(cores, 2):
        basin = basins == k
        if not (core.mask & basin).any():
            return None
        dark = basin & (s < threshold_otsu(s[basin]))
        if not dark.any() or s[basin & ~dark].mean() - s[dark].mean() < MIN_CONTRAST:
            return None
        lab, _ = ndimage.label(dark)
        lung = np.isin(lab, np.unique(lab[core.mask & dark]))  # the dark parts the core reaches
        lungs |= lung if len(cores) == 1 or _solidity(lung) >= MIN_SOLIDITY else core.mask & dark
    frame = np.concatenate([lungs[:2].ravel(), lungs[-2:].ravel(), lungs[:, :2].ravel(), lungs[:, -2:].ravel()])
    return None if frame.any() or not lungs.any() else lungs  # grown into the outside air: not lungs


def _lungs_small(img: np.ndarray) -> np.ndarray | None:
    """Lung mask on the WORK_SIDE copy of `img`, or None."""
    s = _shrink(img)
    lo, hi = np.percentile(s, [1, 99])
    if hi <= lo or min(s.shape) < 16:
        return None
    s = ndimage.grey_opening((s - lo) / (hi - lo), size=(RIB_SPAN, 1))
    s = ndimage.gaussian_filter(ndimage.grey_closing(s, footprint=BRIDGE), SMOOTH_SIGMA)
    if not (s > AIR).any():
        return None
    w = s.shape[1]
    blobs = _enclosed_blobs(s)
    pairs = sorted((p for p in combinations(blobs, 2) if _side_by_side(*p, w)), key=lambda p: -p[0].area - p[1].area)
    merged = sorted(((b,) for b in blobs if b.area >= MERGED_AREA * s.size and b.cols.start < w / 2 < b.cols.stop
                     and b.cols.stop - b.cols.start >= MERGED_WIDTH * w), key=lambda c: -c[0].area)
    singles = ((b, _mirrored(b, s)) for b in sorted(blobs, key=lambda b: -b.area))
    for cores in islice(pairs or merged or singles, TRIES):
        lungs = _grow_cores(s, cores)
        if lungs is not None:
            return ndimage.binary_fill_holes(lungs)
    return None


def find_lungs(img: np.ndarray) -> np.ndarray | None:
    """Boolean mask of the lung fields at `img`'s resolution, or None when no plausible lung field is found."""
    small = _lungs_small(img)
    return None if small is None else _grow(small, img.shape)


def lung_hull(mask: np.ndarray) -> np.ndarray:
    """Convex hull of a lung mask (the region whose brightness percentiles set the contrast)."""
    hull = np.zeros(mask.shape, bool)
    if mask.any():  # the hull lies within the mask's bounding box: fill only that, it is the costly part
        box = ndimage.find_objects(mask.astype(np.uint8))[0]
        hull[box] = convex_hull_image(mask[box])
    return hull


def _check_percentiles(lo_pct: float, hi_pct: float) -> None:
    if not 0 <= lo_pct < hi_pct <= 100:
        raise ValueError(f"percentiles ({lo_pct}, {hi_pct}): need 0 <= lo < hi <= 100")


def normalise(img: np.ndarray, region_mask: np.ndarray, lo_pct: float = 5.0, hi_pct: float = 95.0) -> np.ndarray:
    """uint8 image mapping the lo/hi percentiles of the pixels inside `region_mask` to 0 and 255, clipped."""
    _check_percentiles(lo_pct, hi_pct)
    if region_mask.shape != img.shape or not region_mask.any():
        raise ValueError(f"region mask {region_mask.shape} must match the image {img.shape} and be non-empty")
    # overwrite_input: the region's pixels are a copy of our own, so percentile need not copy them again
    lo, hi = (float(v) for v in np.percentile(img[region_mask], [lo_pct, hi_pct], overwrite_input=True))
    if hi <= lo:  # a flat region: split at its value
        return np.where(img > lo, 255, 0).astype(np.uint8)
    # in row blocks: whole-image temporaries would hold three float copies of a scan at the pixel budget at once
    out, scale = np.empty(img.shape, np.uint8), 255.0 / (hi - lo)
    for y in range(0, img.shape[0], NORMALISE_ROWS):
        block = img[y:y + NORMALISE_ROWS] - lo
        block *= scale
        out[y:y + NORMALISE_ROWS] = np.rint(np.clip(block, 0, 255, out=block), out=block)
    return out


def fit_square(img: np.ndarray, fit: str) -> np.ndarray:
    """A 2-D image made square before the resize. stretch: as is, the resize squashes it (proportions
    lost: heart and chest widths change with the scan's aspect ratio); crop: the central square (cuts the
    ends of the long side: lung apices and costophrenic angles of a tall scan, the chest wall of a wide
    one); pad: the short side extended equally at both ends with the median of the two edges it extends
    (the background there, air or collimation), so nothing is cut or distorted."""
    h, w = img.shape
    if fit == "stretch" or h == w:
        return img
    side = min(h, w)
    if fit == "crop":
        y, x = (h - side) // 2, (w - side) // 2
        return img[y:y + side, x:x + side]
    extra = abs(h - w)
    ends = (extra // 2, extra - extra // 2)
    if h < w:
        background, pad = np.median(np.concatenate([img[0], img[-1]])), (ends, (0, 0))
    else:
        background, pad = np.median(np.concatenate([img[:, 0], img[:, -1]])), ((0, 0), ends)
    return np.pad(img, pad, constant_values=np.asarray(np.rint(background), img.dtype))


def _check(size: int, on_no_lungs: str, lo_pct: float, hi_pct: float, fit: str) -> None:
    if on_no_lungs not in ON_NO_LUNGS:
        raise ValueError(f"on_no_lungs = {on_no_lungs!r}: allowed {', '.join(ON_NO_LUNGS)}")
    if fit not in FITS:
        raise ValueError(f"fit = {fit!r}: allowed {', '.join(FITS)}")
    if size < 1:
        raise ValueError(f"size = {size}: must be a positive number of pixels")
    _check_percentiles(lo_pct, hi_pct)


def preprocess_scan(img: np.ndarray, size: int, on_no_lungs: str, lo_pct: float = 5.0,
                    hi_pct: float = 95.0, *, fit: str) -> tuple[np.ndarray | None, str]:
    """Lungs -> hull -> percentile normalise -> square (fit_square) -> anti-aliased resize to (size, size) uint8.

    Status "ok"; "central" when no lungs were found and the central 50% box set the contrast;
    "skipped" (image None) when no lungs were found and on_no_lungs == "skip"."""
    _check(size, on_no_lungs, lo_pct, hi_pct, fit)
    if img.ndim != 2 or min(img.shape) < 1:
        raise ValueError(f"scan must be a 2-D image, got shape {img.shape}")
    lungs = _lungs_small(img)
    if lungs is not None:
        region, status = _grow(lung_hull(lungs), img.shape), "ok"
    elif on_no_lungs == "skip":
        return None, "skipped"
    else:
        h, w = img.shape
        region = np.zeros(img.shape, bool)
        region[h // 4: h - h // 4, w // 4: w - w // 4] = True
        status = "central"
    square = fit_square(normalise(img, region, lo_pct, hi_pct), fit)
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS)), status


def _process_chunk(records: list[ScanRecord], size: int, on_no_lungs: str, lo_pct: float, hi_pct: float,
                   fit: str, max_pixels: int) -> list[tuple[np.ndarray | None, str, str, bytes | None]]:
    """Decode and preprocess a chunk of scans in a worker: (image, status, why not decoded, pixel digest of
    the decoded scan) per scan; status "unreadable" or "over_pixel_budget" for a scan not decoded."""
    def one(path: Path) -> tuple[np.ndarray | None, str, str, bytes | None]:  # its scan is freed before the next
        scan = read_scan(path, max_pixels)
        return *preprocess_scan(scan, size, on_no_lungs, lo_pct, hi_pct, fit=fit), "", pixel_digest(scan)

    out = []
    for r in records:
        try:
            out.append(one(r.path))
        except UnreadableInput as e:
            out.append((None, e.reason, str(e), None))
    return out


def _ordered_map(fn, chunks, workers: int):
    """map(fn, chunks) in order, over `workers` processes with at most 2 chunks per worker in flight."""
    if workers <= 1:
        yield from map(fn, chunks)
        return
    with ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as ex:
        pending = deque()
        for chunk in chunks:
            pending.append(ex.submit(fn, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def ingest_xray(records: list[ScanRecord], out: Path, size: int, normal_only: bool, on_no_lungs: str,
                lo_pct: float, hi_pct: float, fit: str, workers: int, max_pixels: int) -> dict:
    """Decode + preprocess `records` into the image set `out` ((size, size, 1) uint8; meta: image_id,
    patient_id, sex, age, normal, lungs, source) over `workers` processes (<= 1: in this one), results
    in record order. A scan whose decoded pixels came before under the same patient is skipped and
    counted (skipped.duplicate_pixels); under another patient, it stops the ingest (PixelOwners). A scan
    over the pixel budget `max_pixels` is skipped undecoded. skipped_by_reason counts every scan skipped:
    unreadable, over_pixel_budget, duplicate_pixels, no_lungs (on_no_lungs "skip").
    Returns the summary; scans_per_s counts the scans decoded (abnormal ones dropped by normal_only are
    never read)."""
    _check(size, on_no_lungs, lo_pct, hi_pct, fit)
    t0 = time.perf_counter()
    todo = [r for r in records if r.normal or not normal_only]
    chunks = (todo[i:i + SCAN_CHUNK] for i in range(0, len(todo), SCAN_CHUNK))
    fn = partial(_process_chunk, size=size, on_no_lungs=on_no_lungs, lo_pct=lo_pct, hi_pct=hi_pct, fit=fit,
                 max_pixels=max_pixels)
    counts = {"ok": 0, "central": 0, "skipped": 0, "unreadable": 0, "over_pixel_budget": 0, "duplicate_pixels": 0}
    unreadable_examples, owners = [], PixelOwners("patient")
    with ImageSetWriter(out, (size, size, 1)) as writer, tqdm(total=len(todo), desc="ingest xray", unit="scan") as bar:
        done = 0
        for results in _ordered_map(fn, chunks, workers):
            for r, (image, status, why, digest) in zip(todo[done:done + len(results)], results):
                if status in ("ok", "central") and owners.is_repeat(digest, r.patient_id, str(r.path)):
                    status = "duplicate_pixels"
                counts[status] += 1
                if status in ("unreadable", "over_pixel_budget") and len(unreadable_examples) < 5:
                    unreadable_examples.append(why)
                elif status in ("ok", "central"):
                    writer.add(image, image_id=r.image_id, patient_id=r.patient_id, sex=r.sex, age=r.age,
                               normal=r.normal, lungs=status, source=str(r.path))
            done += len(results)
            bar.update(len(results))
    seconds = time.perf_counter() - t0
    return {"scans_listed": len(records), "written": counts["ok"] + counts["central"],
            "dropped_abnormal": len(records) - len(todo), "unreadable": counts["unreadable"],
            "unreadable_examples": unreadable_examples,
            "lungs_not_found": {"central": counts["central"], "skip": counts["skipped"]},
            "skipped": {"duplicate_pixels": counts["duplicate_pixels"]},
            "skipped_by_reason": {reason: n for reason, n in (
                ("unreadable", counts["unreadable"]), ("over_pixel_budget", counts["over_pixel_budget"]),
                ("duplicate_pixels", counts["duplicate_pixels"]), ("no_lungs", counts["skipped"])) if n},
            "seconds": round(seconds, 3), "scans_per_s": round(len(todo) / seconds, 2) if seconds > 0 else 0.0}

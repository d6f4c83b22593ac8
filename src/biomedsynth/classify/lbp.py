"""Uniform LBP texture histograms: the features of the study's conventional classifiers (SPEC 5).

At radius R the operator samples P = 8R points on a circle around each pixel (bilinear interpolation,
zero outside the image) and compares them with the centre. Rotation-invariant "uniform" codes 0..P
count the points at least as bright as the centre when the circle has at most two 0/1 transitions;
code P + 1 collects every other pattern. An image becomes the histogram of its P + 2 codes,
normalised to sum 1. The study used R = 2, 3, 4 and their concatenation, after converting colour
(histology) images to grayscale.

Images are read one at a time, so memory stays flat; chunks of image indices go to a process pool,
whose workers open the image set themselves by path, so no image crosses a process boundary.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from skimage.color import rgb2gray
from skimage.feature import local_binary_pattern
from tqdm import tqdm

from biomedsynth.lifetime import die_with_parent
from biomedsynth.store import ImageSet, replace_tree

RADII = (2, 3, 4)
CHUNK = 64  # images per pool task: a few seconds of work at 256 px, small enough to balance the cores


def points(radius: int) -> int:
    """The study's number of circle points at a radius."""
    return 8 * radius


def check_radii(radii) -> tuple[int, ...]:
    radii = tuple(radii)
    if not radii or any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1 for r in radii):
        raise ValueError(f"LBP radii must be positive integers, got {list(radii)}")
    if len(set(radii)) != len(radii):
        raise ValueError(f"LBP radii must be distinct, got {list(radii)}")
    return tuple(int(r) for r in radii)


def _check_image(image: np.ndarray, radii: tuple[int, ...]) -> None:
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {image.dtype} images of shape {image.shape}")
    h, w, c = image.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 (gray) or 3 (RGB) channels, got {c}")
    if min(h, w) <= 2 * max(radii):
        raise ValueError(f"{h}x{w} px images are too small for LBP radius {max(radii)} (need sides > {2 * max(radii)})")


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 (..., C) -> uint8 (...): channel 0 when C == 1, else the luminance of rgb2gray rounded back
    to integers, so LBP compares integer intensities as it does on a gray scan."""
    if image.shape[-1] == 1:
        return image[..., 0]
    return np.rint(rgb2gray(image) * 255).astype(np.uint8)


def histograms(images, indices, radii: tuple[int, ...]) -> np.ndarray:
    """float32 (len(indices), sum of P + 2): per image, the normalised uniform-code histogram at each
    radius, side by side in the order of `radii`. `images[i]` is one uint8 (H, W, C) image."""
    sizes = [points(r) + 2 for r in radii]
    out = np.empty((len(indices), sum(sizes)), np.float32)
    for row, i in enumerate(indices):
        gray, col = to_gray(np.asarray(images[i])), 0
        for r, n in zip(radii, sizes):
            codes = local_binary_pattern(gray, points(r), r, method="uniform").astype(np.intp)
            out[row, col:col + n] = np.bincount(codes.ravel(), minlength=n) / codes.size
            col += n
    return out


def _chunk(source, start: int, stop: int, radii: tuple[int, ...]) -> np.ndarray:
    """Histograms of images start..stop of `source`: an image-set path (opened here, in the worker) or an array."""
    return histograms(ImageSet(source) if isinstance(source, (str, Path)) else source, range(start, stop), radii)


def lbp_features(images, radii=RADII, workers: int = 1) -> dict[str, np.ndarray]:
    """{"r<R>": float32 (N, P + 2) per radius, "concat": all of them side by side} for uint8 (N, H, W, C)
    images (C = 1 or 3), or anything with len() and [i] -> (H, W, C) such as an ImageSet. With workers > 1
    a process pool shares the chunks; an ImageSet is opened by path in each worker, other inputs are
    copied to the workers chunk by chunk (pass an ImageSet for large sets)."""
    radii = check_radii(radii)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    n = len(images)
    if n:
        _check_image(np.asarray(images[0]), radii)
    bounds = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    parts = []
    with tqdm(total=n, desc="lbp", unit="img", leave=False) as bar:
        if workers == 1 or len(bounds) == 1:
            for a, b in bounds:
                parts.append(_chunk(images, a, b, radii))
                bar.update(b - a)
        else:
            def task(a, b):
                return (images.path, a, b) if isinstance(images, ImageSet) else (np.asarray(images[a:b]), 0, b - a)
            # forkserver: workers never inherit a parent's thread pools (torch, BLAS) mid-flight as fork would
            ctx = multiprocessing.get_context("forkserver")
            with ProcessPoolExecutor(min(workers, len(bounds)), mp_context=ctx, initializer=die_with_parent,
                                     initargs=(os.getpid(),)) as pool:
                futures = [pool.submit(_chunk, *task(a, b), radii) for a, b in bounds]
                for (a, b), f in zip(bounds, futures):
                    parts.append(f.result())
                    bar.update(b - a)
    feats = np.concatenate(parts) if parts else np.empty((0, sum(points(r) + 2 for r in radii)), np.float32)
    out, col = {}, 0
    for r in radii:
        out[f"r{r}"] = feats[:, col:col + points(r) + 2].copy()
        col += points(r) + 2
    out["concat"] = feats
    return out


def lbp_features_of_set(path: Path, radii=RADII, workers: int = 1) -> dict[str, np.ndarray]:
    """lbp_features of the image set at `path`, workers reading it by path."""
    return lbp_features(ImageSet(path), radii, workers)


def write_features(set_path: Path, out: Path, radii=RADII, workers: int = 1) -> dict:
    """Write `out/features.npz` (one array per variant + `image_id`, in image-set order) for the image set
    at `set_path`; the folder is built beside `out` and renamed into place, so a killed run leaves the
    previous output or none. Returns {"images": N, "radii": [...], "dims": {variant: D}}."""
    images = ImageSet(set_path)
    feats = lbp_features(images, radii, workers)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        # np.savez stamps zip entries with a fixed date, so equal features give equal bytes (stable DVC hashes)
        np.savez(tmp / "features.npz", image_id=images.meta["image_id"].to_numpy(str), **feats)
        replace_tree(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"images": len(images), "radii": list(check_radii(radii)), "dims": {k: int(v.shape[1]) for k, v in feats.items()}}


def read_features(out: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(image ids, {variant: float32 (N, D)}) from a folder written by write_features."""
    path = Path(out) / "features.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the stage that writes LBP features first")
    with np.load(path) as f:
        return f["image_id"], {k: f[k] for k in f.files if k != "image_id"}

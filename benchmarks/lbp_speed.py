"""LBP feature throughput (radii 2, 3, 4 on grayscale images), one process vs a pool on every core.

    .venv/bin/python benchmarks/lbp_speed.py [--sizes 64 256] [--images 256] [--workers N]

Images are random uint8 written to a temporary image set, read the way the pipeline reads them
(workers open the set by path); the pool's start-up (about a second: workers import scikit-image)
is included, as a pipeline run pays it once. Also prints the single-core cost of each radius.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from skimage.feature import local_binary_pattern

from biomedsynth.classify.lbp import RADII, lbp_features_of_set, points
from biomedsynth.store import ImageSetWriter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for side in args.sizes:
        images = rng.integers(0, 256, (args.images, side, side, 1), dtype=np.uint8)
        one = images[0, ..., 0]
        per_radius = []
        for r in RADII:
            t = time.perf_counter()
            for _ in range(10):
                local_binary_pattern(one, points(r), r, method="uniform")
            per_radius.append(f"R={r} {(time.perf_counter() - t) * 100:.2f} ms")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "set"
            with ImageSetWriter(path, images.shape[1:]) as w:
                w.add_many(images, ({"image_id": i} for i in range(len(images))))
            rates = []
            for workers in (1, args.workers):
                t = time.perf_counter()
                lbp_features_of_set(path, workers=workers)
                rates.append(f"{workers} worker(s) {args.images / (time.perf_counter() - t):.1f} img/s")
        print(f"{side}x{side} gray, {args.images} images: {', '.join(rates)}; one image, one core: {', '.join(per_radius)}")


if __name__ == "__main__":
    main()

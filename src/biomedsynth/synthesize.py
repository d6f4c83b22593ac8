"""The synthesize stage: draw a synthetic study group from a trained generator with exactly the real
training group's size and label distribution, screen out images without a body shape by an average
hash (SPEC 4), and measure how close the synthetic images come to real training images (SPEC 7).

Both checks compare against the real training set, read once in batches; only small derived arrays
(hashes, copy-check thumbnails) are held in memory, so sets larger than RAM are fine.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from biomedsynth.store import ImageSet, ImageSetWriter

NOT_COPIED = ("image_id", "patient_id", "source", "label")  # meta columns a synthetic image never inherits
FIGURE_PAIRS = 8
Sampler = Callable[[str, int, np.random.Generator], np.ndarray]


def _as_float(batch: np.ndarray, side: int | None = None) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, side, side) in [0, 1], area-resized when the size differs."""
    x = torch.tensor(np.asarray(batch)).permute(0, 3, 1, 2).float().div_(255)
    if side is not None and tuple(x.shape[-2:]) != (side, side):
        x = F.interpolate(x, size=(side, side), mode="area")
    return x


def _hash(x: torch.Tensor, hash_size: int) -> torch.Tensor:
    small = F.interpolate(x.mean(1, keepdim=True), size=(hash_size, hash_size), mode="area").flatten(1)
    return small > small.mean(1, keepdim=True)


def _thumb(x: torch.Tensor, side: int) -> torch.Tensor:
    # float16 halves the memory of the thumbnails kept for a whole training set; distances use float32
    return F.interpolate(x, size=(side, side), mode="area").flatten(1).half()


def average_hash(images: np.ndarray, hash_size: int = 16, batch_size: int = 1024) -> np.ndarray:
    """uint8 (N, H, W, C) images -> bool (N, hash_size**2): the grayscale image (mean of channels)
    area-resized to hash_size x hash_size, one bit per cell, set where the cell is above the mean.
    Reads `images` (a memory map is fine) `batch_size` at a time."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    out = np.empty((len(images), hash_size * hash_size), bool)
    for i in range(0, len(images), batch_size):
        out[i:i + batch_size] = _hash(_as_float(images[i:i + batch_size]), hash_size).numpy()
    return out


def _signed(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(bits, np.float32)).mul_(2).sub_(1)


def nearest_hamming(query: np.ndarray, reference: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each bool hash in `query` (Q, B), the smallest Hamming distance to any hash in `reference`
    (R, B), int64 (Q,). With bits as +-1, dot = B - 2 * distance, so one float matmul per block of
    chunk x 4*chunk pairs gives exact distances (integers far below float32's 2**24)."""
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1] or not len(reference):
        raise ValueError(f"hashes must be (Q, B) and (R, B) with R > 0, got {query.shape} and {reference.shape}")
    best = np.empty(len(query), np.int64)
    for i in range(0, len(query), chunk):
        q, top = _signed(query[i:i + chunk]), None
        for j in range(0, len(reference), 4 * chunk):
            dots = (q @ _signed(reference[j:j + 4 * chunk]).T).amax(1)
            top = dots if top is None else torch.maximum(top, dots)
        best[i:i + chunk] = ((query.shape[1] - top) / 2).round().long().numpy()
    return best


def nearest_euclidean(query: torch.Tensor, reference: torch.Tensor, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `query` (Q, D), the Euclidean distance to its nearest row of `reference` (R, D)
    and that row's index: float64 (Q,), int64 (Q,). Blocks of chunk x chunk keep memory bounded."""
    dist, idx = np.empty(len(query)), np.empty(len(query), np.int64)
    for i in range(0, len(query), chunk):
        q = query[i:i + chunk].float()
        best_d, best_i = torch.full((len(q),), math.inf), torch.zeros(len(q), dtype=torch.long)
        for j in range(0, len(reference), chunk):
            d, k = torch.cdist(q, reference[j:j + chunk].float()).min(1)
            closer = d < best_d
            best_d, best_i = torch.where(closer, d, best_d), torch.where(closer, k + j, best_i)
        dist[i:i + chunk], idx[i:i + chunk] = best_d.numpy(), best_i.numpy()
    return dist, idx


def _real_features(ds: ImageSet, resolution: int, hash_size: int, side: int, batch_size: int):
    """Hashes and copy-check thumbnails of a real set seen at the generator's resolution, in one pass."""
    # filled in place: small results kept between large per-batch temporaries fragment the heap (GBs at 40k images)
    hashes = torch.empty(len(ds), hash_size * hash_size, dtype=torch.bool)
    thumbs = torch.empty(len(ds), ds.shape[2] * side * side, dtype=torch.float16)
    start = 0
    for batch in tqdm(ds.batches(batch_size=batch_size), total=math.ceil(len(ds) / batch_size),
                      desc=f"read {ds.path.parent.name}/{ds.path.name}", unit="batch", leave=False):
        x = _as_float(batch, resolution)
        hashes[start:start + len(x)], thumbs[start:start + len(x)] = _hash(x, hash_size), _thumb(x, side)
        start += len(x)
    return hashes.numpy(), thumbs


def _label_constants(meta: pd.DataFrame) -> pd.DataFrame:
    """Per label, the meta columns that hold one value for all its images (sex, age_bin, slide_label...)."""
    by_label = meta.groupby("label")
    cols = [c for c in meta.columns if c not in NOT_COPIED and (by_label[c].nunique(dropna=False) == 1).all()]
    return by_label[cols].first()


def _save_pairs_figure(path: Path, synthetic: ImageSet, real: ImageSet, pairs: list[tuple[int, int, float]]) -> None:
    """The closest synthetic/real pairs: synthetic image above its nearest real training image."""
    fig = Figure(figsize=(1.6 * max(len(pairs), 1), 3.6), layout="constrained")
    for col, (s, r, d) in enumerate(pairs):
        for row, img in enumerate((synthetic[s], real[r])):
            ax = fig.add_subplot(2, len(pairs), row * len(pairs) + col + 1)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"syn {s}\nd={d:.2f}" if row == 0 else f"real {r}", fontsize=7)
    fig.suptitle("closest synthetic (top) / nearest real training image (bottom)", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def synthesize(sample: Sampler, real_train: Path, real_test: Path, out: Path, *, resolution: int, hash_screen: bool,
               hash_threshold: int, hash_size: int, max_tries_factor: float, batch_size: int,
               copy_check_images: int, copy_check_side: int, seed: int, figure_path: Path) -> dict:
    """Write a synthetic image set at `out` with real_train's size and exact label counts, drawn from
    `sample(label, n, rng) -> uint8 (n, resolution, resolution, C)`; return the stage's metrics."""
    train, test = ImageSet(real_train), ImageSet(real_test)
    channels = train.shape[2]
    if not len(train) or not len(test):
        raise ValueError(f"{real_train if not len(train) else real_test} has no images")
    if test.shape[2] != channels:
        raise ValueError(f"{real_test} has {test.shape[2]} channels, {real_train} has {channels}")
    if "label" not in train.meta.columns:
        raise ValueError(f"{real_train}/meta.csv has no 'label' column")
    if not 0 <= hash_threshold <= hash_size ** 2:
        raise ValueError(f"hash_threshold must be in [0, {hash_size ** 2}] bits for hash_size {hash_size}, "
                         f"got {hash_threshold}")
    if max_tries_factor < 1:
        raise ValueError(f"max_tries_factor must be >= 1, got {max_tries_factor}")

    train_hash, train_thumbs = _real_features(train, resolution, hash_size, copy_check_side, batch_size)
    test_hash, test_thumbs = _real_features(test, resolution, hash_size, copy_check_side, batch_size)
    counts = train.meta["label"].value_counts().sort_index()
    constants = _label_constants(train.meta)
    rng = np.random.default_rng(seed)
    per_label, written = {}, 0
    syn_thumbs = torch.empty(len(train), channels * copy_check_side ** 2, dtype=torch.float16)
    shape = (resolution, resolution, channels)
    with ImageSetWriter(out, shape) as writer, tqdm(total=len(train), desc="synthesize", unit="img") as bar:
        for label, target in counts.items():
            cap, drawn, kept, rejected = math.ceil(max_tries_factor * target), 0, 0, 0
            row = {"label": label, "source": "synthetic", **constants.loc[label].to_dict()}
            while kept < target:
                if hash_screen and drawn >= cap:
                    raise ValueError(
                        f"hash screen: label {label!r} got {kept} of {target} images after {drawn} drawn "
                        f"(cap {max_tries_factor} x {target}) at hash_threshold={hash_threshold} bits; raise "
                        f"hash_threshold, train the GAN longer, or switch hash_screen off")
                # enough draws to fill the rest at the acceptance rate seen so far
                need = math.ceil((target - kept) * (drawn + 1) / (kept + 1))
                n = min(batch_size, need, cap - drawn) if hash_screen else min(batch_size, target - kept)
                batch = np.asarray(sample(label, n, rng))
                if batch.shape != (n, *shape) or batch.dtype != np.uint8:
                    raise ValueError(f"sampler gave {batch.dtype} {batch.shape} for label {label!r}, "
                                     f"expected uint8 {(n, *shape)}")
                drawn += n
                x = _as_float(batch)
                ok = np.ones(n, bool)
                if hash_screen:
                    ok = nearest_hamming(_hash(x, hash_size).numpy(), train_hash) <= hash_threshold
                    rejected += int(n - ok.sum())
                take = np.flatnonzero(ok)[:target - kept]
                syn_thumbs[written:written + len(take)] = _thumb(x[torch.from_numpy(take)], copy_check_side)
                for i in take:
                    writer.add(batch[i], image_id=f"syn-{written:06d}", **row)
                    written += 1
                kept += len(take)
                bar.update(len(take))
            per_label[label] = {"images": int(target), "drawn": drawn, "rejected": rejected}

    check_rng = np.random.default_rng([seed, 1])
    syn_idx, test_idx = (np.sort(check_rng.choice(n, min(n, copy_check_images), replace=False))
                         for n in (len(train), len(test)))
    syn_d, syn_nn = nearest_euclidean(syn_thumbs[torch.from_numpy(syn_idx)], train_thumbs)
    test_d, _ = nearest_euclidean(test_thumbs[torch.from_numpy(test_idx)], train_thumbs)
    copy_threshold = float(np.quantile(test_d, 0.01))
    closest = np.argsort(syn_d, kind="stable")[:FIGURE_PAIRS]
    _save_pairs_figure(figure_path, ImageSet(out), train,
                       [(int(syn_idx[k]), int(syn_nn[k]), float(syn_d[k])) for k in closest])

    drawn = sum(v["drawn"] for v in per_label.values())
    rejected = sum(v["rejected"] for v in per_label.values())
    return {
        "images": int(len(train)),
        "per_label": per_label,
        "hash_screen": bool(hash_screen),
        "hash_threshold": int(hash_threshold),
        "hash_size": int(hash_size),
        "drawn": int(drawn),
        "rejected": int(rejected),
        "rejection_rate": rejected / drawn,
        "real_rejection_rate": float(np.mean(nearest_hamming(test_hash, train_hash) > hash_threshold)),
        "copy_check": {
            "threshold": copy_threshold,
            "share_closer": float(np.mean(syn_d < copy_threshold)),
            "median_nn_synthetic": float(np.median(syn_d)),
            "median_nn_real": float(np.median(test_d)),
            "images_checked": int(len(syn_idx)),
            "side": int(copy_check_side),
        },
    }

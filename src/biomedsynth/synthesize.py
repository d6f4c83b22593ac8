"""The synthesize stage: draw a synthetic study group from a trained generator with exactly the real
training group's size and label distribution, screen out images without a body shape by an average
hash (SPEC 4), and gather evidence on fidelity and copying of the synthetic set (SPEC 7-8, evidence.py).

The hash screen's threshold is, unless params fix it, a quantile of the held-out real images' nearest
Hamming distances to the training hashes. The evidence compares the synthetic images with the training
images and, as the baseline, held-out real images, in three offline feature spaces: PCA of downsampled
pixels, the KID feature net and the average hash; the feature net's space is marked unreliable when its net is
not better than chance on held-out images (feature_space_reliability). The real sets are read once in batches for hashes and
features; only those small per-image arrays are held in memory, so sets larger than RAM are fine.

Every image of the set, not a sample, is checked for being a near copy of a training image in those spaces
(NearCopyScreen) and marked in the meta column `near_copy`: the privacy gate (gate.py) drops the marked images
at every exit, and generate screens what it draws the same way.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from biomedsynth.evidence import ALPHA, RULE, Space, assess, false_positive_rate, pixel_pca, training_neighbours
from biomedsynth.store import NEAR_COPY, ImageSet, ImageSetWriter

NOT_COPIED = ("image_id", "patient_id", "source", "label")  # meta columns a synthetic image never inherits
FIGURE_PAIRS = 8
GROUP_COLUMN = "patient_id"  # the patient (X-ray) or slide (histology) of each real image
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


def hash_space(hash_size: int) -> Space:
    """The average hash as one more per-image feature: float images -> bool (N, hash_size**2)."""
    return lambda x: _hash(x, hash_size).numpy()


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


def _read(ds: ImageSet, resolution: int, batch_size: int, indices: np.ndarray | None = None):
    """Float (B, C, resolution, resolution) batches of a set (all images, or those at `indices`, in order)."""
    total = len(ds) if indices is None else len(indices)
    for batch in tqdm(ds.batches(indices, batch_size=batch_size), total=math.ceil(total / batch_size),
                      desc=f"read {ds.path.parent.name}/{ds.path.name}", unit="batch", leave=False):
        yield _as_float(batch, resolution)


def _features(ds: ImageSet, spaces: dict[str, Space], resolution: int, batch_size: int,
              indices: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per space, the features of a set's images (all, or those at `indices`) seen at the generator's
    resolution, in one pass."""
    features = {name: [] for name in spaces}
    for x in _read(ds, resolution, batch_size, indices):
        for name, space in spaces.items():
            features[name].append(space(x))
    return {name: np.concatenate(f) for name, f in features.items()}


def set_hashes(ds: ImageSet, resolution: int, hash_size: int, batch_size: int) -> np.ndarray:
    """The average hashes of a set's images seen at the generator's resolution: what the screen compares with."""
    return _features(ds, {"hash": hash_space(hash_size)}, resolution, batch_size)["hash"]


class HashScreen:
    """The image-hash screen (SPEC 4): a uint8 image passes when its average hash lies within `threshold` bits of
    some training image's hash (`train_hash`, from set_hashes)."""

    def __init__(self, train_hash: np.ndarray, threshold: int, hash_size: int):
        self.train_hash, self.threshold, self.hash_size = train_hash, int(threshold), int(hash_size)

    def passes(self, batch: np.ndarray) -> np.ndarray:
        """bool (N,) for uint8 (N, H, W, C) images."""
        return nearest_hamming(_hash(_as_float(batch), self.hash_size).numpy(), self.train_hash) <= self.threshold

    def shortfall(self) -> str:
        return (f"the hash screen rejected the rest at hash_threshold={self.threshold} bits; raise hash_threshold, "
                f"train the GAN longer, or switch hash_screen off")


def evidence_spaces(train: ImageSet, feature_space: Space, *, resolution: int, side: int, pca_dims: int,
                    fit_images: int, hash_size: int, seed: int, batch_size: int) -> dict[str, Space]:
    """The evidence's feature spaces: pixels (a PCA of `side` px pixels, `pca_dims` axes, fitted on a seeded sample
    of `fit_images` training images), features (`feature_space`, the KID feature net) and the average hash."""
    fit_idx = np.sort(np.random.default_rng([seed, 2]).choice(len(train), min(fit_images, len(train)), replace=False))
    side = min(side, resolution)
    thumbs = [F.interpolate(x, size=side, mode="area") for x in _read(train, resolution, batch_size, fit_idx)]
    return {"pixels": pixel_pca(torch.cat(thumbs), side, pca_dims, seed), "features": feature_space,
            "hash": hash_space(hash_size)}


class NearCopyScreen:
    """Which images are near copies of a training image (evidence.Neighbours.near_copy: closer to it than it is to
    any other patient's image, and at most half as far as another patient's nearest image) in any of `spaces`,
    image by image. Holds the training images' features and patient ids: it stays with the pipeline."""

    def __init__(self, spaces: dict[str, Space], train_features: dict[str, np.ndarray], train_groups,
                 resolution: int):
        self.spaces, self.train_features, self.resolution = spaces, train_features, resolution
        self.train_groups = np.asarray(train_groups, object)

    @classmethod
    def of(cls, train: ImageSet, spaces: dict[str, Space], resolution: int, batch_size: int) -> NearCopyScreen:
        """The screen against a training set, its images seen at the generator's resolution."""
        return cls(spaces, _features(train, spaces, resolution, batch_size), train.meta[GROUP_COLUMN].to_numpy(),
                   resolution)

    def near_copies(self, batch: np.ndarray) -> np.ndarray:
        """bool (N,) for uint8 (N, H, W, C) images."""
        out = np.zeros(len(batch), bool)
        if not len(batch):  # a batch the hash screen rejected whole
            return out
        x = _as_float(batch, self.resolution)
        for name, space in self.spaces.items():
            out |= training_neighbours(space(x), self.train_features[name], self.train_groups).near_copy
        return out


def calibrate_hash_threshold(heldout_hashes: np.ndarray, train_hashes: np.ndarray, quantile: float) -> int:
    """The `quantile` of held-out real images' nearest Hamming distances to the training hashes, taken at an
    observed distance (numpy's 'higher'): the screen would reject at most 1 - quantile of them."""
    return int(np.quantile(nearest_hamming(heldout_hashes, train_hashes), quantile, method="higher"))


def _label_constants(meta: pd.DataFrame) -> pd.DataFrame:
    """Per label, the meta columns that hold one value for all its images (sex, age_bin, slide_label...)."""
    by_label = meta.groupby("label")
    cols = [c for c in meta.columns if c not in NOT_COPIED and (by_label[c].nunique(dropna=False) == 1).all()]
    return by_label[cols].first()


def _save_pairs_figure(path: Path, synthetic: ImageSet, real: ImageSet,
                       pairs: dict[str, list[tuple[int, int, float]]]) -> None:
    """Per feature space, the closest synthetic/real pairs: synthetic image above its nearest real training image."""
    cols = max([len(p) for p in pairs.values()] + [1])
    fig = Figure(figsize=(1.6 * cols, 3.6 * len(pairs)), layout="constrained")
    for block, (space, space_pairs) in enumerate(pairs.items()):
        for col, (s, r, d) in enumerate(space_pairs):
            for row, img in enumerate((synthetic[s], real[r])):
                ax = fig.add_subplot(2 * len(pairs), cols, (2 * block + row) * cols + col + 1)
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(f"{space}: syn {s}\nd={d:.3g}" if row == 0 else f"real {r}", fontsize=7)
    fig.suptitle("closest synthetic (top) / nearest real training image (bottom), per feature space", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def hash_screened(hash_screen: str, arch: str, modality: str) -> bool:
    """Whether the average-hash screen applies to a set under params synthesize.hash_screen: `all`, `none`, or
    `dcgan_xray`, the study's choice (it screened its DCGAN X-rays only; tiles have no global shape to hash)."""
    return hash_screen == "all" or (hash_screen == "dcgan_xray" and arch == "dcgan" and modality == "xray")


def check_sets(train: ImageSet, val: ImageSet, test: ImageSet, *, hash_threshold: int | None, hash_quantile: float,
               hash_size: int, max_tries_factor: float, draws: int, evidence_images: int, prdc_k: int,
               seed: int) -> None:
    """What `synthesize` would refuse in its sets and knobs, from their labels and ids alone (no image read): the
    check_synthesize stage runs it on every set before DVC clears any synthetic set, and synthesize runs it first."""
    if not len(train) or not len(test):
        raise ValueError(f"{train.path if not len(train) else test.path} has no images")
    if hash_threshold is None and not len(val):
        raise ValueError(f"{val.path} has no images to calibrate hash_threshold on; set synthesize.hash_threshold")
    if test.shape[2] != train.shape[2]:
        raise ValueError(f"{test.path} has {test.shape[2]} channels, {train.path} has {train.shape[2]}")
    for ds, columns in ((train, ("label", GROUP_COLUMN)), (test, ("label", GROUP_COLUMN))):
        if missing := [c for c in columns if c not in ds.meta.columns]:
            raise ValueError(f"{ds.path}/meta.csv has no {', '.join(map(repr, missing))} column")
    if hash_threshold is not None and not 0 <= hash_threshold <= hash_size ** 2:
        raise ValueError(f"hash_threshold must be in [0, {hash_size ** 2}] bits for hash_size {hash_size}, "
                         f"got {hash_threshold}")
    if not 0 < hash_quantile <= 1:
        raise ValueError(f"hash_quantile must be in (0, 1], got {hash_quantile}")
    if max_tries_factor < 1:
        raise ValueError(f"max_tries_factor must be >= 1, got {max_tries_factor}")
    _, test_idx = _evidence_samples(draws * len(train), len(test), evidence_images, seed)
    # PRDC compares sets of len(test_idx) images (and as many training images) with k neighbours each
    if min(len(test_idx), len(train)) <= prdc_k:
        raise ValueError(f"the evidence compares {min(len(test_idx), len(train))} images per set (synthesize.evidence"
                         f".images, the training and {test.path} sizes), too few for PRDC with k={prdc_k}: "
                         f"lower synthesize.evidence.k")
    patients = set(test.meta[GROUP_COLUMN].to_numpy()[test_idx])
    if len(patients) < 2:
        raise ValueError(f"the evidence's held-out images in {test.path} come from {len(patients)} patient or slide; "
                         f"its false-positive rate needs 2 or more")


def _evidence_samples(synthetic: int, test: int, images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The evidence's seeded samples: indices of equally many synthetic and held-out real images."""
    rng = np.random.default_rng([seed, 1])
    n = min(images, synthetic, test)
    return tuple(np.sort(rng.choice(size, n, replace=False)) for size in (synthetic, test))


class Screen(Protocol):
    """What draw_label redraws past: HashScreen, or generate's ExitScreen."""

    def passes(self, batch: np.ndarray) -> np.ndarray: ...

    def shortfall(self) -> str: ...


def draw_label(sample: Sampler, label: str, target: int, rng: np.random.Generator, *, shape: tuple[int, int, int],
               screen: Screen | None, max_tries_factor: float, batch_size: int,
               tally: dict) -> Iterator[np.ndarray]:
    """Yield uint8 batches of `label` from `sample` until `target` images passed the screen (all pass without
    one), redrawing what it rejects; more than max_tries_factor x target drawn stops with a line naming the
    label. `tally["drawn"]` and `tally["rejected"]` count as it goes."""
    cap, drawn, kept = math.ceil(max_tries_factor * target), 0, 0
    while kept < target:
        if screen and drawn >= cap:
            raise ValueError(f"label {label!r} got {kept} of {target} images after {drawn} drawn "
                             f"(cap {max_tries_factor} x {target}): {screen.shortfall()}")
        # enough draws to fill the rest at the acceptance rate seen so far
        need = math.ceil((target - kept) * (drawn + 1) / (kept + 1))
        n = min(batch_size, need, cap - drawn) if screen else min(batch_size, target - kept)
        batch = np.asarray(sample(label, n, rng))
        if batch.shape != (n, *shape) or batch.dtype != np.uint8:
            raise ValueError(f"sampler gave {batch.dtype} {batch.shape} for label {label!r}, "
                             f"expected uint8 {(n, *shape)}")
        drawn += n
        ok = screen.passes(batch) if screen else np.ones(n, bool)
        take = batch[np.flatnonzero(ok)[:target - kept]]
        kept += len(take)
        tally["drawn"] += n
        tally["rejected"] += int(n - ok.sum())
        yield take


def _draw(sample: Sampler, train: ImageSet, out: Path, screen: HashScreen | None, near: NearCopyScreen, *,
          resolution: int, max_tries_factor: float, batch_size: int, draws: int, rng: np.random.Generator) -> dict:
    """Write `draws` independent synthetic copies of the training set (column `draw`: fresh latents each),
    label by label, redrawing what the hash screen rejects and marking near copies (column NEAR_COPY: kept, so the
    evidence sees what the generator makes); per-label counts summed over the draws."""
    counts = train.meta["label"].value_counts().sort_index()
    constants = _label_constants(train.meta)
    per_label = {label: {"images": 0, "drawn": 0, "rejected": 0, "near_copies": 0} for label in counts.index}
    written = 0
    shape = (resolution, resolution, train.shape[2])
    jobs = [(draw, label, target) for draw in range(draws) for label, target in counts.items()]
    with ImageSetWriter(out, shape) as writer, tqdm(total=draws * len(train), desc="synthesize", unit="img") as bar:
        for draw, label, target in jobs:
            row = {"label": label, "source": "synthetic", **constants.loc[label].to_dict(), "draw": draw}
            for batch in draw_label(sample, label, int(target), rng, shape=shape, screen=screen,
                                    max_tries_factor=max_tries_factor, batch_size=batch_size, tally=per_label[label]):
                copies = near.near_copies(batch)
                per_label[label]["near_copies"] += int(copies.sum())
                for image, copy in zip(batch, copies):
                    writer.add(image, image_id=f"syn-{written:06d}", **row, **{NEAR_COPY: int(copy)})
                    written += 1
                bar.update(len(batch))
            per_label[label]["images"] += int(target)
    return per_label


def feature_space_reliability(net_metrics: dict) -> dict:
    """The `features` evidence space's mark, from its net's metrics (metrics/feature_net/<modality>.json):
    reliable when every head of the net is better than chance on held-out images (feature_net.chance_test);
    otherwise also unreliable_because, the net's warning lines. ValueError, one line, for metrics that hold no
    such test (written by an older version)."""
    check = net_metrics.get("better_than_chance")
    if not isinstance(check, dict) or not isinstance(check.get("overall"), bool) or "warnings" not in net_metrics:
        raise ValueError(f"the {net_metrics.get('modality', '')} feature net's metrics hold no better_than_chance "
                         "test (written by an older version); run its feature_net stage again (dvc repro)")
    return {"reliable": check["overall"], **({} if check["overall"] else
                                             {"unreliable_because": list(net_metrics["warnings"])})}


def _evidence(train: ImageSet, test: ImageSet, synthetic: ImageSet, train_features: dict[str, np.ndarray],
              test_features: dict[str, np.ndarray], spaces: dict[str, Space], *, images: int, k: int, cells: int,
              resolution: int, batch_size: int, seed: int, figure_path: Path) -> dict:
    """evidence.assess in every space on seeded samples of `images` synthetic and held-out real images against
    all training images, and the verdict's false-positive rate on those held-out images; draws the closest pairs
    per space; returns the metrics' `evidence` block."""
    syn_idx, test_idx = _evidence_samples(len(synthetic), len(test), images, seed)
    n = len(syn_idx)
    syn_features = _features(synthetic, spaces, resolution, batch_size, syn_idx)
    labels = (train.meta["label"].to_numpy(), test.meta["label"].to_numpy()[test_idx],
              synthetic.meta["label"].to_numpy()[syn_idx])
    groups, test_groups = train.meta[GROUP_COLUMN].to_numpy(), test.meta[GROUP_COLUMN].to_numpy()[test_idx]
    found, pairs, near_copy = {}, {}, np.zeros(n, bool)
    for name in spaces:
        found[name] = assess(train_features[name], groups, test_features[name][test_idx], syn_features[name],
                             heldout_groups=test_groups, labels=labels, k=k, cells=cells, seed=seed)
        nb = found[name].synthetic
        pairs[name] = [(int(syn_idx[i]), int(nb.index[i]), float(nb.distance[i]))
                       for i in np.argsort(nb.distance, kind="stable")[:FIGURE_PAIRS]]
        near_copy |= nb.near_copy
    _save_pairs_figure(figure_path, synthetic, train, pairs)
    marked = synthetic.meta[NEAR_COPY].astype(bool)
    return {**{name: f.metrics for name, f in found.items()},
            "copying": any(f.metrics["copying"] for f in found.values()),
            "rule": RULE, "alpha": ALPHA, "false_positive_rate": false_positive_rate(found, test_groups, seed=seed),
            "images": {"synthetic": int(n), "heldout": int(n), "train": int(len(train))},
            "near_duplicates": int(near_copy.sum()),
            "screen": {"images": int(len(synthetic)), "near_copies": int(marked.sum()), "spaces": list(spaces)}}


def synthesize(sample: Sampler, real_train: Path, real_val: Path, real_test: Path, out: Path, *, resolution: int,
               hash_screen: bool,
               hash_threshold: int | None, hash_quantile: float, hash_size: int, max_tries_factor: float,
               batch_size: int, feature_space: Space, evidence_images: int, evidence_side: int, pca_dims: int,
               prdc_k: int, cells: int, seed: int, figure_path: Path, feature_net_metrics: dict,
               draws: int = 1) -> dict:
    """Write a synthetic image set at `out` holding `draws` independent draws, each with real_train's size and
    exact label counts, from `sample(label, n, rng) -> uint8 (n, resolution, resolution, C)`; return the
    stage's metrics.

    hash_threshold None calibrates it: the hash_quantile of real_val's nearest Hamming distances to the
    training hashes (held-out patients of the training side: the test side never shapes the synthetic set; it only
    judges it, in the evidence and the real rejection rate). The evidence spaces: evidence_spaces (pixels: PCA of
    `evidence_side` px pixels, `pca_dims` axes fitted on up to `evidence_images` training images; features:
    `feature_space`, e.g. evidence.feature_net_space; hash: the average hash). `feature_net_metrics`, the metrics
    of the net behind `feature_space`, marks that space reliable or not (feature_space_reliability)."""
    features_mark = feature_space_reliability(feature_net_metrics)  # before anything is drawn
    train, val, test = ImageSet(real_train), ImageSet(real_val), ImageSet(real_test)
    check_sets(train, val, test, hash_threshold=hash_threshold, hash_quantile=hash_quantile, hash_size=hash_size,
               max_tries_factor=max_tries_factor, draws=draws, evidence_images=evidence_images, prdc_k=prdc_k,
               seed=seed)
    spaces = evidence_spaces(train, feature_space, resolution=resolution, side=evidence_side, pca_dims=pca_dims,
                             fit_images=evidence_images, hash_size=hash_size, seed=seed, batch_size=batch_size)
    near = NearCopyScreen.of(train, spaces, resolution, batch_size)
    train_features, test_features = near.train_features, _features(test, spaces, resolution, batch_size)
    train_hash, test_hash = train_features["hash"], test_features["hash"]
    source = "params" if hash_threshold is not None else "calibrated on val"
    if hash_threshold is None:
        val_hash = set_hashes(val, resolution, hash_size, batch_size)
        hash_threshold = calibrate_hash_threshold(val_hash, train_hash, hash_quantile)

    screen = HashScreen(train_hash, hash_threshold, hash_size) if hash_screen else None
    per_label = _draw(sample, train, out, screen, near, resolution=resolution, max_tries_factor=max_tries_factor,
                      batch_size=batch_size, draws=draws, rng=np.random.default_rng(seed))
    evidence = _evidence(train, test, ImageSet(out), train_features, test_features, spaces, images=evidence_images,
                         k=prdc_k, cells=cells, resolution=resolution, batch_size=batch_size, seed=seed,
                         figure_path=figure_path)
    evidence["features"].update(features_mark)
    drawn = sum(v["drawn"] for v in per_label.values())
    rejected = sum(v["rejected"] for v in per_label.values())
    return {
        "images": int(draws * len(train)),
        "draws": int(draws),
        "per_label": per_label,
        "hash_screen": bool(hash_screen),
        "hash_threshold": int(hash_threshold),
        "hash_threshold_source": source,
        "hash_quantile": float(hash_quantile) if source != "params" else None,
        "hash_size": int(hash_size),
        "drawn": int(drawn),
        "rejected": int(rejected),
        "rejection_rate": rejected / drawn,
        "real_rejection_rate": float(np.mean(nearest_hamming(test_hash, train_hash) > hash_threshold)),
        "evidence": evidence,
    }


def gan_learnt(name: str, warn) -> bool:
    """Whether every model of GAN stage `name` learnt (metrics/gan/<name>.json); a WARNING line through `warn` for
    each that did not."""
    from biomedsynth.gan.verdict import not_learnt_rule
    from biomedsynth.paths import METRICS

    gan = json.loads((METRICS / "gan" / f"{name}.json").read_text())
    for model, m in gan["per_model"].items():
        if not m["learnt"]:
            warn(f"WARNING synthesize@{name}: model {model} learnt nothing ({not_learnt_rule(m)}); its images are "
                 "drawn anyway and Table 3 leaves out the cells trained on them")
    return bool(gan["learnt"])


def synthesize_stage(p, arch: str, group: str, setup: str, out: Path, metrics: Path, figures: Path, warn) -> dict:
    """synthesize@<arch>-<group>-<setup> as dvc.yaml runs it: the generators of the epoch synthesize.checkpoint
    chooses, the hash screen where hash_screened applies it, the modality's feature net for the evidence, then
    synthesize(). Its summary, written to `metrics`, adds the epochs and the rule that chose them, whether every
    model of the GAN learnt (`warn` gets a WARNING line per model that did not, and per reason the feature net is
    unreliable) and the provenance of the data."""
    from biomedsynth.evidence import feature_net_space
    from biomedsynth.gan.checkpoint import Synthesizer
    from biomedsynth.gan.utility import choose_checkpoint
    from biomedsynth.params import GROUP_MODALITY
    from biomedsynth.paths import FEATURE_NETS, GAN_MODELS, METRICS, STUDYGROUPS
    from biomedsynth.provenance import fingerprint
    from biomedsynth.store import write_json

    name, modality, s, sets = f"{arch}-{group}-{setup}", GROUP_MODALITY[group], p.synthesize, STUDYGROUPS / group
    choice, rule = choose_checkpoint(s.checkpoint, GAN_MODELS / name, FEATURE_NETS / f"{modality}.pt", sets / "val")
    gen = Synthesizer(GAN_MODELS / name, choice)
    summary = synthesize(gen.sample, sets / "train", sets / "val", sets / "test", out,
                         resolution=gen.opt.resolution, hash_screen=hash_screened(s.hash_screen, arch, modality),
                         hash_threshold=s.hash_threshold, hash_quantile=s.hash_quantile, hash_size=s.hash_size,
                         max_tries_factor=s.max_tries_factor, batch_size=s.batch_size,
                         feature_space=feature_net_space(FEATURE_NETS / f"{modality}.pt", gen.device),
                         evidence_images=s.evidence.images, evidence_side=s.evidence.side,
                         pca_dims=s.evidence.pca_dims, prdc_k=s.evidence.k, cells=s.evidence.cells, seed=p.seed,
                         figure_path=figures / "closest.png",
                         feature_net_metrics=json.loads((METRICS / "feature_net" / f"{modality}.json").read_text()),
                         draws=s.draws)
    if not summary["evidence"]["features"]["reliable"]:
        for line in summary["evidence"]["features"]["unreliable_because"]:
            warn(f"WARNING synthesize@{name}: feature net: {line}")
    summary.update(checkpoint_epochs=gen.epochs, checkpoint_rule=rule, gan_learnt=gan_learnt(name, warn),
                   provenance=fingerprint(p.sources.model_dump(mode="json")))  # written once, not stamped after
    write_json(metrics, summary)
    return summary

"""Evidence about a synthetic image set (SPEC 8): fidelity and diversity, and whether it copies training images.

Everything here works on feature vectors, float (N, D), in two offline spaces: area-downsampled pixels
reduced by a PCA fitted on the training set (`pixel_pca`), and the small CNN trained here for KID
(`feature_net_space`). Three sets are compared: the training set T the generator learned from, held-out
real images P from other patients (the baseline every measure is read against), and synthetic images Q.

- PRDC (Naeem et al. 2020): precision, recall, density, coverage of Q against a sample of T; the same
  for P against T is the floor a perfect generator would reach.
- C_T (Meehan, Chaudhuri & Dasgupta 2020): per k-means cell of T, a Mann-Whitney U test of whether Q
  lies closer to T than P does, Z-scored and averaged with P's mass per cell; C_T << 0 means copying.
- Distance to the closest record (DCR): each image's distance to its nearest training image, Q against P.
- NN ratio: that distance over the distance to the nearest training image of another patient than the
  nearest one's; near 0 for a copy of one image (or one patient's scans), near 1 for the middle of the data.
- Authenticity (Alaa et al. 2022): q is not authentic when it lies closer to its nearest training image
  T_j than T_j lies to any training image of another patient. A near copy: not authentic and NN ratio < 0.5.
- Membership inference (GAN-Leaks' full black-box attack, Chen et al. 2020): a real image's score is its distance
  to the closest synthetic image, members (training images) expected closer than non-members (held-out images);
  the attack's AUC, with a cluster-bootstrap interval over patients, is 0.5 when the set leaks nothing measurable.

A space flags copying when synthetic images are near copies (or, with C_T, close to single patients) more often
than held-out real images are, by Fisher's exact test at one-sided alpha = 0.01 on effective counts (the held-out
scans come in patients: Rao & Scott's design effect); `false_positive_rate` measures how often that verdict flags
one half of the held-out images against the other.

Distances are computed in blocks, so a few thousand queries against ~100k training vectors stay in
tens of MB of memory.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import fisher_exact, rankdata
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from biomedsynth.classify.metrics import cluster_weights, describe, interval, interval_rule, weighted_metrics
from biomedsynth.gan.score import extract_features, load_feature_net

# float (N, C, H, W) images in [0, 1] -> float (N, D) features
Space = Callable[[torch.Tensor], np.ndarray]

C_T_LIMIT = -3.0           # Meehan et al. flag data-copying below about -3
ALPHA = 0.01               # one-sided level of the test that a synthetic share exceeds the held-out share
RATIO_THRESHOLD = 0.5      # NN ratio below this: at most half as far from the nearest image as from any other patient's
HELDOUT_PER_CELL = 20      # C_T uses at most len(heldout) // 20 cells, so each cell's U test has held-out images
MIN_SYNTHETIC_PER_CELL = 10  # Meehan et al.'s tau as a count: cells with fewer synthetic images are left out
MEMBERSHIP_BOOTSTRAP = 1000  # cluster-bootstrap replicates of the membership AUC's interval
FALSE_POSITIVE_SPLITS = 200  # random halvings of the held-out images that measure the verdict's false positives
RULE = (f"copying in a space when (C_T < {C_T_LIMIT:g} and an excess of synthetic images with NN ratio < "
        f"{RATIO_THRESHOLD:g}) or an excess of near-copies (not authentic and NN ratio < {RATIO_THRESHOLD:g}); "
        f"an excess: the synthetic share above the held-out share by Fisher's exact test, one-sided p < {ALPHA:g}, "
        f"on counts divided by their design effect (Rao-Scott: held-out scans are clustered by patient); "
        f"copying overall when copying in any space")


# ---- distances ----

def _as_features(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    return x


def _distance_blocks(query: np.ndarray, reference: np.ndarray, chunk: int) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """Squared Euclidean distances of query x reference in blocks of chunk x 4*chunk: (rows, cols, block)."""
    if query.shape[1] != reference.shape[1]:
        raise ValueError(f"features differ in dimension: {query.shape[1]} vs {reference.shape[1]}")
    ref_sq = np.einsum("ij,ij->i", reference, reference)
    for i in range(0, len(query), chunk):
        q = query[i:i + chunk]
        q_sq = np.einsum("ij,ij->i", q, q)[:, None]
        for j in range(0, len(reference), 4 * chunk):
            r = reference[j:j + 4 * chunk]
            block = q_sq + ref_sq[None, j:j + len(r)] - 2 * (q @ r.T)
            yield slice(i, i + len(q)), slice(j, j + len(r)), np.maximum(block, 0, out=block)


def nearest(query, reference, k: int = 1, query_groups=None, reference_groups=None,
            chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of `reference` (R, D) to each row of `query` (Q, D): Euclidean distances float64
    (Q, k) ascending and their indices int64 (Q, k). With groups (one id per row), a reference row of the
    query row's own group never counts: ids 0..N-1 on both sides leave out self-matches, patient ids leave
    out the same patient. Missing neighbours (too few rows) are inf with index -1."""
    q, r = _as_features(query), _as_features(reference)
    grouped = query_groups is not None
    if grouped:
        both = np.concatenate([np.asarray(query_groups, object), np.asarray(reference_groups, object)])
        codes = pd.factorize(both)[0]
        q_codes, r_codes = codes[:len(q)], codes[len(q):]
    best_d, best_i = np.full((len(q), k), np.inf), np.full((len(q), k), -1, np.int64)
    for rows, cols, block in _distance_blocks(q, r, chunk):
        if grouped:
            block[q_codes[rows, None] == r_codes[None, cols]] = np.inf
        # the block's k smallest (unordered) merged with the k best so far, then ordered
        part = np.argpartition(block, k - 1, axis=1)[:, :k] if block.shape[1] > k else np.indices(block.shape)[1]
        cand_d = np.concatenate([best_d[rows], np.take_along_axis(block, part, 1)], 1)
        cand_i = np.concatenate([best_i[rows], part + cols.start], 1)
        top = np.argsort(cand_d, axis=1, kind="stable")[:, :k]
        best_d[rows], best_i[rows] = np.take_along_axis(cand_d, top, 1), np.take_along_axis(cand_i, top, 1)
    best_i[np.isinf(best_d)] = -1
    return np.sqrt(best_d), best_i


def _kth_neighbour_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Each row's distance to its k-th nearest other row of the same set."""
    ids = np.arange(len(x))
    return nearest(x, x, k, ids, ids)[0][:, k - 1]


# ---- fidelity and diversity ----

def prdc(real, fake, k: int = 5, chunk: int = 1024) -> dict[str, float]:
    """Precision, recall, density and coverage of `fake` against `real` (Naeem et al. 2020).

    A real sample's ball reaches its k-th nearest other real sample (strictly inside counts), a fake
    sample's ball its k-th nearest other fake sample. precision: share of fake samples inside some real
    ball; recall: share of real samples inside some fake ball; density: fake-in-real-ball memberships
    per fake sample, divided by k (~1 when fake matches real, above 1 when fake crowds real modes);
    coverage: share of real balls holding at least one fake sample. A set against itself scores 1 on all four."""
    real, fake = _as_features(real), _as_features(fake)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"PRDC with k={k} needs more than {k} samples per set, "
                         f"got {len(real)} real and {len(fake)} fake")
    real_r, fake_r = _kth_neighbour_radius(real, k), _kth_neighbour_radius(fake, k)
    in_real_balls = np.zeros(len(fake), np.int64)     # per fake sample
    real_covered = np.zeros(len(real), bool)          # a fake sample inside the real sample's ball
    real_recalled = np.zeros(len(real), bool)         # the real sample inside some fake sample's ball
    for rows, cols, block in _distance_blocks(real, fake, chunk):
        d = np.sqrt(block)
        inside = d < real_r[rows, None]
        in_real_balls[cols] += inside.sum(0)
        real_covered[rows] |= inside.any(1)
        real_recalled[rows] |= (d < fake_r[None, cols]).any(1)
    return {"precision": float(np.mean(in_real_balls > 0)), "recall": float(real_recalled.mean()),
            "density": float(in_real_balls.sum() / (k * len(fake))), "coverage": float(real_covered.mean())}


# ---- memorisation ----

def mann_whitney_z(synthetic, heldout) -> float:
    """Z of the Mann-Whitney U counting pairs where the synthetic value exceeds the held-out one (ties
    count half), by the normal approximation without tie correction: negative when synthetic values are
    smaller, e.g. synthetic images closer to the training set than held-out real images."""
    m, n = len(synthetic), len(heldout)
    ranks = rankdata(np.concatenate([synthetic, heldout]))
    u = ranks[:m].sum() - m * (m + 1) / 2
    return float((u - m * n / 2) / np.sqrt(m * n * (m + n + 1) / 12))


def copying_statistic(heldout_cells, heldout_distance, synthetic_cells, synthetic_distance, n_cells: int,
                      min_synthetic: int = MIN_SYNTHETIC_PER_CELL) -> dict:
    """Meehan et al.'s C_T from each image's cell and distance to its nearest training image: per cell
    with at least `min_synthetic` synthetic and one held-out image, the Mann-Whitney Z of synthetic vs
    held-out distances; C_T is their average weighted by the held-out mass of each cell (renormalised
    over the cells used). None when no cell qualifies."""
    heldout_cells, synthetic_cells = np.asarray(heldout_cells), np.asarray(synthetic_cells)
    heldout_distance, synthetic_distance = np.asarray(heldout_distance), np.asarray(synthetic_distance)
    weights, zs = [], []
    for cell in range(n_cells):
        p, q = heldout_distance[heldout_cells == cell], synthetic_distance[synthetic_cells == cell]
        if len(q) >= min_synthetic and len(p):
            weights.append(len(p) / len(heldout_distance))
            zs.append(mann_whitney_z(q, p))
    used_mass = float(np.sum(weights))
    return {"c_t": float(np.dot(weights, zs) / used_mass) if zs else None, "c_t_cells": int(n_cells),
            "c_t_cells_used": len(zs), "c_t_heldout_mass_used": used_mass}


def _closest_record(heldout_d: np.ndarray, synthetic_d: np.ndarray) -> dict:
    """Distance to the closest training record: synthetic against the held-out quantiles and medians."""
    q01, q05 = np.quantile(heldout_d, [0.01, 0.05])
    return {"dcr_heldout_q01": float(q01), "dcr_heldout_q05": float(q05),
            "dcr_share_below_q01": float(np.mean(synthetic_d < q01)),
            "dcr_share_below_q05": float(np.mean(synthetic_d < q05)),
            "dcr_median": float(np.median(synthetic_d)), "dcr_median_heldout": float(np.median(heldout_d))}


@dataclass
class Neighbours:
    """Per query image: its nearest training image, the distance to it, the distance to the nearest training
    image of another patient than that one's, and that nearest image's own distance to another patient."""
    index: np.ndarray
    distance: np.ndarray
    other_patient: np.ndarray
    train_radius: np.ndarray

    @property
    def ratio(self) -> np.ndarray:
        """NN ratio; 0 where both distances are 0 (an exact copy of an image two patients share)."""
        return np.divide(self.distance, self.other_patient, out=np.zeros_like(self.distance),
                         where=self.other_patient > 0)

    @property
    def authentic(self) -> np.ndarray:
        return self.distance >= self.train_radius

    @property
    def near_copy(self) -> np.ndarray:
        return ~self.authentic & (self.ratio < RATIO_THRESHOLD)


def training_neighbours(query, train, train_groups, chunk: int = 1024) -> Neighbours:
    """Neighbours of each query row among the training rows, `train_groups` holding their patient/slide ids."""
    train_groups = np.asarray(train_groups, object)
    d, idx = nearest(query, train, 1, chunk=chunk)
    d, idx = d[:, 0], idx[:, 0]
    other, _ = nearest(query, train, 1, train_groups[idx], train_groups, chunk)
    # the comparison radius belongs to the training image T_j (Alaa et al.), computed once per distinct j
    used, where = np.unique(idx, return_inverse=True)
    radius, _ = nearest(np.asarray(train)[used], train, 1, train_groups[used], train_groups, chunk)
    return Neighbours(idx, d, other[:, 0], radius[where, 0])


def design_effect(flags, groups=None) -> float:
    """Rao & Scott's design effect of the share of `flags` (bool per image) when images come in clusters (`groups`:
    a patient id per image; None: independent images): the cluster-robust variance of the share over the binomial
    one, at least 1. A patient whose scans are all near copies counts about once, not once per scan."""
    flags = np.asarray(flags, float)
    share = flags.mean() if len(flags) else 0.0
    if groups is None or share in (0.0, 1.0):
        return 1.0
    codes = pd.factorize(np.asarray(groups, object))[0]
    hits, sizes = np.bincount(codes, flags), np.bincount(codes)
    if len(sizes) < 2:
        return 1.0
    robust = len(sizes) / (len(sizes) - 1) * np.sum((hits - share * sizes) ** 2) / len(flags) ** 2
    return float(max(1.0, robust / (share * (1 - share) / len(flags))))


def _sample_rates(heldout: Neighbours, synthetic: Neighbours, heldout_groups, synthetic_groups=None) -> dict:
    """NN ratio, authenticity and near-copy shares of the synthetic images beside the held-out ones, with the design
    effects of the shares the verdict tests (synthetic images drawn one by one: 1, unless `synthetic_groups`)."""
    low_ratio = {"heldout": heldout.ratio < RATIO_THRESHOLD, "synthetic": synthetic.ratio < RATIO_THRESHOLD}
    groups = {"heldout": heldout_groups, "synthetic": synthetic_groups}
    near = {"heldout": heldout.near_copy, "synthetic": synthetic.near_copy}
    return {"nn_ratio_threshold": RATIO_THRESHOLD,
            "nn_ratio_share": float(np.mean(low_ratio["synthetic"])),
            "nn_ratio_share_heldout": float(np.mean(low_ratio["heldout"])),
            "nn_ratio_median": float(np.median(synthetic.ratio)),
            "nn_ratio_median_heldout": float(np.median(heldout.ratio)),
            "authentic": float(np.mean(synthetic.authentic)), "authentic_heldout": float(np.mean(heldout.authentic)),
            "near_copies": int(synthetic.near_copy.sum()),
            "near_copy_share": float(np.mean(synthetic.near_copy)),
            "near_copy_share_heldout": float(np.mean(heldout.near_copy)),
            "design_effect": {f"{what}_{side}": design_effect(flags[side], groups[side])
                              for what, flags in (("nn_ratio", low_ratio), ("near_copy", near))
                              for side in ("synthetic", "heldout")}}


def excess_p(count: int, n: int, count_heldout: int, n_heldout: int, deff: float = 1.0,
             deff_heldout: float = 1.0) -> float:
    """One-sided p of Fisher's exact test that `count` of n synthetic images is a larger share than `count_heldout`
    of n_heldout held-out ones. Exact (conditional on the total), so it keeps its level at the small counts near
    copies come in, where a z test does not; conservative there. Clustered images (a design effect above 1) enter
    as their effective numbers, count / deff of n / deff (Rao & Scott 1992)."""
    def effective(k: int, size: int, d: float) -> tuple[int, int]:
        size_eff = max(1, round(size / d))
        return min(round(k / d), size_eff), size_eff

    (k, m), (k_h, m_h) = effective(count, n, deff), effective(count_heldout, n_heldout, deff_heldout)
    return float(fisher_exact([[k, m - k], [k_h, m_h - k_h]], alternative="greater").pvalue)


def excess(share: float, n: int, share_heldout: float, n_heldout: int, deff: float = 1.0,
           deff_heldout: float = 1.0) -> bool:
    """Whether a share of n synthetic images exceeds the share of n_heldout held-out images at one-sided ALPHA."""
    return excess_p(round(share * n), n, round(share_heldout * n_heldout), n_heldout, deff, deff_heldout) < ALPHA


def copying_verdict(m: dict, n: int, n_heldout: int) -> bool:
    """RULE on one space's measures of n synthetic and n_heldout held-out images: closer to the training
    set than held-out real images are, and that to single images or patients (the NN ratio), not to the
    middle of the data as smooth outputs are; or many near-copies."""
    d = m["design_effect"]
    closer = m["c_t"] is not None and m["c_t"] < C_T_LIMIT
    singled_out = excess(m["nn_ratio_share"], n, m["nn_ratio_share_heldout"], n_heldout,
                         d["nn_ratio_synthetic"], d["nn_ratio_heldout"])
    copies = excess(m["near_copy_share"], n, m["near_copy_share_heldout"], n_heldout,
                    d["near_copy_synthetic"], d["near_copy_heldout"])
    return bool((closer and singled_out) or copies)


def membership_auc(train, train_groups, heldout, heldout_groups, synthetic, *, seed: int = 0,
                   n_boot: int = MEMBERSHIP_BOOTSTRAP, chunk: int = 1024) -> dict:
    """GAN-Leaks' full black-box membership attack: each real image scores minus its distance to the closest
    synthetic image. The AUC at telling members (a seeded sample of the training images, as many as the held-out
    ones) from non-members (the held-out images), with a 95% interval from a cluster bootstrap over patients
    (classify.metrics). 0.5: the synthetic images lie no closer to training images than to other patients'."""
    train, heldout, synthetic = _as_features(train), _as_features(heldout), _as_features(synthetic)
    pick = np.sort(np.random.default_rng([seed, 3]).choice(len(train), min(len(train), len(heldout)), replace=False))
    score = -nearest(np.concatenate([train[pick], heldout]), synthetic, 1, chunk=chunk)[0][:, 0]
    member = np.r_[np.ones(len(pick), int), np.zeros(len(heldout), int)]
    # a patient is on one side of the split; the side's prefix keeps sets that reuse id strings apart
    groups = np.r_[[f"member:{g}" for g in np.asarray(train_groups)[pick]],
                   [f"heldout:{g}" for g in np.asarray(heldout_groups)]]
    weights = cluster_weights(member, groups, n_boot, seed)
    aucs = weighted_metrics(member, np.zeros_like(member), score, weights)["auc"]  # only the AUC is read
    rule = interval_rule(member, groups)
    return {**interval(aucs, rule=rule, bounds=(0.0, 1.0)), "interval": describe(rule),
            "members": int(len(pick)), "nonmembers": int(len(heldout))}


# ---- one space ----

@dataclass
class Evidence:
    """One space's measures (JSON-ready), the synthetic and held-out images' training neighbours (for figures,
    counts) and the held-out images' k-means cells of C_T (for the false-positive rate)."""
    metrics: dict
    synthetic: Neighbours
    heldout: Neighbours
    heldout_cells: np.ndarray
    cells: int


def _prdc_block(train, heldout, synthetic, labels, k: int) -> dict:
    """PRDC of synthetic and (the floor) held-out against `train`, overall and per label where every set
    of the label has more than k samples."""
    out = {"prdc": prdc(train, synthetic, k), "prdc_heldout": prdc(train, heldout, k), "prdc_per_label": {}}
    if labels is not None:
        train_l, heldout_l, synthetic_l = (np.asarray(v) for v in labels)
        for label in sorted(set(synthetic_l)):
            sets = train[train_l == label], heldout[heldout_l == label], synthetic[synthetic_l == label]
            if min(map(len, sets)) > k:
                out["prdc_per_label"][str(label)] = {"synthetic": prdc(sets[0], sets[2], k),
                                                     "heldout": prdc(sets[0], sets[1], k)}
    return out


def _copying_measures(heldout: Neighbours, heldout_cells, heldout_groups, synthetic: Neighbours, synthetic_cells,
                      n_cells: int, synthetic_groups=None) -> dict:
    return {**copying_statistic(heldout_cells, heldout.distance, synthetic_cells, synthetic.distance, n_cells),
            **_sample_rates(heldout, synthetic, heldout_groups, synthetic_groups)}


def assess(train, train_groups, heldout, synthetic, *, heldout_groups, labels=None, k: int = 5, cells: int = 50,
           seed: int = 0, chunk: int = 1024) -> Evidence:
    """Every measure of this module in one feature space, and the verdict (RULE).

    train (N, D) with `train_groups` (N,) patient/slide ids; heldout (P, D) real images of other patients, with
    `heldout_groups` (P,); synthetic (Q, D). PRDC compares each of heldout and synthetic with a seeded sample of
    `train` as large as the synthetic set (equal heldout and synthetic sizes make the held-out floor comparable);
    labels: optional (train, heldout, synthetic) label arrays for PRDC per label. C_T uses k-means on all of
    `train` with min(cells, len(heldout) // 20) cells, so every cell can hold held-out images."""
    train, heldout, synthetic = _as_features(train), _as_features(heldout), _as_features(synthetic)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(train), min(len(train), len(synthetic)), replace=False))
    sample_labels = None if labels is None else (np.asarray(labels[0])[sample], labels[1], labels[2])
    metrics = {"dims": int(train.shape[1]), **_prdc_block(train[sample], heldout, synthetic, sample_labels, k)}

    held_nb = training_neighbours(heldout, train, train_groups, chunk)
    syn_nb = training_neighbours(synthetic, train, train_groups, chunk)
    n_cells = int(np.clip(len(heldout) // HELDOUT_PER_CELL, 1, cells))
    kmeans = KMeans(n_clusters=min(n_cells, len(train)), n_init=1, random_state=seed).fit(train)
    held_cells = kmeans.predict(heldout)
    metrics.update(_copying_measures(held_nb, held_cells, heldout_groups, syn_nb, kmeans.predict(synthetic),
                                     kmeans.n_clusters))
    metrics.update(_closest_record(held_nb.distance, syn_nb.distance))
    metrics["near_copy_p"] = excess_p(metrics["near_copies"], len(synthetic), int(held_nb.near_copy.sum()),
                                      len(heldout), 1.0, metrics["design_effect"]["near_copy_heldout"])
    metrics["copying"] = copying_verdict(metrics, len(synthetic), len(heldout))
    metrics["membership"] = membership_auc(train, train_groups, heldout, heldout_groups, synthetic, seed=seed,
                                           chunk=chunk)
    return Evidence(metrics, syn_nb, held_nb, held_cells, kmeans.n_clusters)


def false_positive_rate(found: dict[str, Evidence], heldout_groups, splits: int = FALSE_POSITIVE_SPLITS,
                        seed: int = 0) -> dict:
    """How often RULE flags a set that copies nothing: the held-out images' patients split at random into two halves,
    one half judged as if synthetic against the other, in every space of `found` (assess's results on the same
    held-out images) as the verdict is; the share of `splits` such splits flagged in any space. Each half is about
    half the held-out sample, and the halves lie as far from the training images as a generator that memorised
    nothing would."""
    groups = np.asarray(heldout_groups)
    patients = np.unique(groups)
    if len(patients) < 2:
        raise ValueError(f"the false-positive rate needs held-out images of 2 or more patients, got {len(patients)}")
    rng = np.random.default_rng([seed, 4])
    flagged, sizes = 0, []
    for _ in range(splits):
        half = np.isin(groups, rng.permutation(patients)[:len(patients) // 2])
        sizes.append(int(half.sum()))
        for ev in found.values():
            m = _copying_measures(_subset(ev.heldout, ~half), ev.heldout_cells[~half], groups[~half],
                                  _subset(ev.heldout, half), ev.heldout_cells[half], ev.cells, groups[half])
            if copying_verdict(m, int(half.sum()), int((~half).sum())):
                flagged += 1
                break
    return {"rate": flagged / splits, "splits": int(splits), "flagged": int(flagged),
            "half_images": [int(min(sizes)), int(max(sizes))], "of_heldout": int(len(groups))}


def _subset(nb: Neighbours, rows: np.ndarray) -> Neighbours:
    return Neighbours(nb.index[rows], nb.distance[rows], nb.other_patient[rows], nb.train_radius[rows])


# ---- offline feature spaces ----

def _pixels(images: torch.Tensor, side: int) -> np.ndarray:
    """Float (N, C, H, W) -> float32 (N, C * side * side): area-downsampled, flattened pixels."""
    x = images.float()
    if tuple(x.shape[-2:]) != (side, side):
        x = F.interpolate(x, size=(side, side), mode="area")
    return x.flatten(1).numpy()


class PixelPCA:
    """Pixels area-downsampled to `side` px, projected on the principal axes of the training set's pixels."""

    def __init__(self, side: int, mean: np.ndarray, axes: np.ndarray):
        self.side, self.mean, self.axes = side, mean, axes

    @property
    def dims(self) -> int:
        return len(self.axes)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return (_pixels(images, self.side) - self.mean) @ self.axes.T


def pixel_pca(train_images: torch.Tensor, side: int, dims: int, seed: int = 0) -> PixelPCA:
    """Fit a PixelPCA on float (N, C, H, W) training images in [0, 1]: grayscale or RGB pixels at `side` px,
    `dims` axes at most (fewer when there are fewer images or pixels). A randomized SVD seeded by `seed`."""
    x = _pixels(train_images, side)
    dims = min(dims, *x.shape)
    pca = PCA(n_components=dims, svd_solver="randomized", random_state=seed).fit(x)
    return PixelPCA(side, pca.mean_, pca.components_)


def feature_net_space(path: Path, device: str | torch.device = "cpu") -> Space:
    """The feature space of a saved FeatureNet (the KID feature net; score.load_feature_net reads it):
    float images in [0, 1] -> its globally pooled last conv layer."""
    net = load_feature_net(path, device)
    return lambda images: extract_features(net, images.float() * 2 - 1)

"""The feature_net stage: one KID feature space per modality, trained once and reused by every GAN stage
of the modality (SPEC section 7: KID in the feature space of a network trained here, since no pretrained
weights can be downloaded).

The net learns every label the data carries, one head each: X-rays their sex and age decade, tiles normal vs
tumour (H-Norm and H-Tumor pooled). It trains on the `train` sides of the modality's study groups, with
augmentation that keeps the label: small random shifts for X-rays (no flips: a mirrored chest has its heart
on the wrong side, which a GAN must not be rewarded for), shifts, flips and quarter turns for tiles (tissue
has no orientation). No rescaling crops: thorax size carries sex, nucleus size carries tumour. Its held-out
accuracy is measured on the `val` sides, whose patients or slides it never saw; the test sides stay
untouched for the benchmark. A head whose held-out accuracy is not clearly above chance (`better_than_chance`)
is flagged in the metrics, with a warning line: KID, PRDC and the copying statistic computed in this space then
measure little, and synthesize, the report and the datasheet say so.

Images are read once at the GAN's side (area-downsampled, as the GANs and their scorer see them), resized
to the net's input side when larger, and kept in a memory-mapped temporary file, so memory stays flat.
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from biomedsynth.gan import score
from biomedsynth.store import ImageSet, write_json

MODALITY_GROUPS = {"xray": ("x_norm", "x_norm_l"), "histology": ("h_norm", "h_tumor")}
INPUT_SIZE = 64   # the net's input side: 32 to 512 px images are resized to it
WIDTH = 16        # feature maps of the first layer (features: 8 x WIDTH)
MAX_SHIFT = 1 / 8  # random shifts move an image by up to this share of its side
CHANCE_ALPHA = 0.05  # a head is better than chance when the binomial test rejects "at most chance" at this level
CHANCE_TEST = ("one-sided exact binomial test of the held-out correct count against chance (the share of the "
               f"head's most frequent held-out value), better than chance when p < {CHANCE_ALPHA}: the same as the "
               f"lower end of the {1 - 2 * CHANCE_ALPHA:.0%} Clopper-Pearson interval lying above chance. Held-out "
               "images of one patient or slide count as independent, so it leans towards 'better'")
MODALITY_NAME = {"xray": "X-rays", "histology": "histology tiles"}


def attributes(meta: pd.DataFrame, modality: str) -> pd.DataFrame:
    """The labels the net learns, one column each: X-ray sex and age decade ("30s"); histology tissue."""
    if modality == "xray":
        decade = (meta["age"].astype(float) // 10 * 10).astype(int).astype(str) + "s"
        return pd.DataFrame({"sex": meta["sex"].to_numpy(), "age": decade.to_numpy()})
    return pd.DataFrame({"tissue": meta["label"].to_numpy()})


def pooled(sets: list[ImageSet]) -> tuple[list[tuple[ImageSet, int]], pd.DataFrame]:
    """(set, index) and metadata of every image of the sets once: the X-ray groups share scans, kept by image_id."""
    refs, rows, seen = [], [], set()
    for images in sets:
        for i, row in enumerate(images.meta.to_dict("records")):
            if row["image_id"] not in seen:
                seen.add(row["image_id"])
                refs.append((images, i))
                rows.append(row)
    return refs, pd.DataFrame(rows)


def read_resized(refs: list[tuple[ImageSet, int]], resolution: int, path: Path, batch_size: int = 256) -> np.ndarray:
    """The images at the GAN's side (area), then at most INPUT_SIZE as FeatureNet.features resizes them, as
    uint8 (N, S, S, C) in a memory-mapped .npy at `path`."""
    side = min(resolution, INPUT_SIZE)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                                    shape=(len(refs), side, side, refs[0][0].shape[2]))
    for start in range(0, len(refs), batch_size):
        x = score.as_model_images(np.stack([images[i] for images, i in refs[start:start + batch_size]]))
        x = F.interpolate(x, size=resolution, mode="area") if x.shape[-1] != resolution else x
        if side != resolution:
            x = F.interpolate(x, size=side, mode="bilinear", antialias=True, align_corners=False)
        out[start:start + len(x)] = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out.flush()
    return out


def random_shifts(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each image moved by up to MAX_SHIFT of its side in x and y, the border pixels repeated into the gap."""
    side = x.shape[-1]
    pad = max(1, round(MAX_SHIFT * side))
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    offsets = rng.integers(0, 2 * pad + 1, (len(x), 2))
    return torch.stack([p[:, dy:dy + side, dx:dx + side] for p, (dy, dx) in zip(padded, offsets)])


def dihedral(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each image in one of its 8 orientations (quarter turns, with or without a mirror)."""
    turns, mirror = rng.integers(0, 4, len(x)), rng.integers(0, 2, len(x))
    return torch.stack([torch.rot90(img.flip(-1) if m else img, int(k), (1, 2)) for img, k, m in zip(x, turns, mirror)])


def augmentation(modality: str):
    """The label-keeping transforms of a modality: augment(x, rng) on float (N, C, H, W) batches."""
    if modality == "xray":
        return random_shifts
    return lambda x, rng: dihedral(random_shifts(x, rng), rng)


@torch.no_grad()
def heldout_accuracy(net: score.FeatureNet, images, attrs: pd.DataFrame, classes: list[list[str]],
                     batch_size: int = 256) -> dict:
    """Per attribute, the accuracy of its head on held-out images, and chance (the share of the most
    frequent value there)."""
    device = next(net.parameters()).device
    logits = torch.cat([net(score.as_model_images(images[s:s + batch_size]).to(device)).cpu()
                        for s in range(0, len(images), batch_size)])
    out = {}
    for name, values, z in zip(attrs.columns, classes, logits.split([len(c) for c in classes], 1)):
        truth = attrs[name].astype(str).to_numpy()
        correct = int((np.asarray(values)[z.argmax(1).numpy()] == truth).sum())
        out[name] = {"accuracy": round(correct / len(truth), 4), "correct": correct, "images": len(truth),
                     "chance": round(float(pd.Series(truth).value_counts(normalize=True).iloc[0]), 4)}
    return out


def chance_test(correct: int, images: int, chance: float, alpha: float = CHANCE_ALPHA) -> dict:
    """Whether `correct` right of `images` held-out images is better than `chance` (CHANCE_TEST): the one-sided
    exact binomial p-value, the two-sided 1 - 2 alpha Clopper-Pearson interval of the accuracy (its lower end is the
    one-sided 1 - alpha bound the test compares with chance) and the verdict."""
    from scipy.stats import binomtest

    if not 0 <= correct <= images or images < 1:
        raise ValueError(f"chance_test: {correct} correct of {images} held-out images is not a count")
    test = binomtest(correct, images, chance, alternative="greater")
    ci = binomtest(correct, images, chance).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
    return {"p_value": round(float(test.pvalue), 4), "low": round(float(ci.low), 4), "high": round(float(ci.high), 4),
            "better_than_chance": bool(test.pvalue < alpha)}


def chance_warnings(modality: str, accuracy: dict, tests: dict) -> list[str]:
    """One line per head that is not better than chance, with its numbers and what it makes unreliable."""
    return [f"the {head} head's held-out accuracy {a['accuracy']:.3f} ({a['correct']} of {a['images']} right; "
            f"{1 - 2 * CHANCE_ALPHA:.0%} Clopper-Pearson interval [{t['low']:.3f}, {t['high']:.3f}]) is not above "
            f"chance {a['chance']:.3f}: one-sided exact binomial p = {t['p_value']:.3f}, needs p < {CHANCE_ALPHA}; "
            f"KID, PRDC coverage and C_T for {MODALITY_NAME[modality]} are computed in its space and are unreliable"
            for head, a in accuracy.items() if not (t := tests[head])["better_than_chance"]]


def chance_summary(modality: str, accuracy: dict) -> dict:
    """The metrics' better_than_chance block (per head and overall: every head) and warning lines, from
    heldout_accuracy's counts per head."""
    tests = {k: chance_test(v["correct"], v["images"], v["chance"]) for k, v in accuracy.items()}
    return {"better_than_chance": {"overall": all(t["better_than_chance"] for t in tests.values()),
                                   "heads": {k: t["better_than_chance"] for k, t in tests.items()},
                                   "p_value": {k: t["p_value"] for k, t in tests.items()},
                                   "interval": {k: {"low": t["low"], "high": t["high"]} for k, t in tests.items()},
                                   "test": CHANCE_TEST, "alpha": CHANCE_ALPHA},
            "warnings": chance_warnings(modality, accuracy, tests)}


def build_feature_net(modality: str, groups_dir: Path, resolution: int, epochs: int, seed: int, out: Path,
                      metrics_path: Path, device: torch.device | str = "cpu") -> dict:
    """Train the modality's net on its groups' training sides, test it on their validation sides, save it
    to `out` (score.load_feature_net reads it) and its summary to `metrics_path`; return the summary: per head the
    held-out accuracy, chance and correct count, whether it is better than chance (chance_test; `overall`: every
    head is) and a warning line for each head that is not."""
    train_refs, train_meta = pooled([ImageSet(groups_dir / g / "train") for g in MODALITY_GROUPS[modality]])
    val_refs, val_meta = pooled([ImageSet(groups_dir / g / "val") for g in MODALITY_GROUPS[modality]])
    train_attrs = attributes(train_meta, modality)
    classes = [np.unique(train_attrs[c].astype(str)).tolist() for c in train_attrs.columns]
    with tempfile.TemporaryDirectory(prefix="feature_net-") as tmp:
        train_images = read_resized(train_refs, resolution, Path(tmp) / "train.npy")
        net = score.train_feature_net(train_images, train_attrs.astype(str).to_numpy(), epochs=epochs, width=WIDTH,
                                      input_size=INPUT_SIZE, seed=seed, device=device,
                                      augment=augmentation(modality))
        accuracy = heldout_accuracy(net, read_resized(val_refs, resolution, Path(tmp) / "val.npy"),
                                    attributes(val_meta, modality), classes)
    score.save_feature_net(net, out, modality=modality, resolution=resolution,
                           heads=dict(zip(train_attrs.columns, classes)))
    summary = {"modality": modality, "resolution": resolution, "epochs": epochs,
               "images": {"train": len(train_refs), "heldout": len(val_refs)},
               "accuracy": {k: v["accuracy"] for k, v in accuracy.items()},
               "chance": {k: v["chance"] for k, v in accuracy.items()},
               "correct": {k: v["correct"] for k, v in accuracy.items()},
               **chance_summary(modality, accuracy), "fingerprint": fingerprint(out)}
    write_json(metrics_path, summary)
    return summary


def fingerprint(path: Path) -> str:
    """A short hash of a saved net, recorded in the GAN stages' options: under a retrained net a GAN run's kept
    generators are scored again (gan/train.py rescored), since KID in its space would not compare with the epochs
    already logged."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

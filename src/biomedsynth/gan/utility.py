"""Checkpoint choice by utility (`synthesize.checkpoint: utility`): the epoch whose samples best train a quick
classifier of the labels, tested on real validation images. SWD picks the epoch whose images look most like
real ones; this picks the one whose images teach most about the labels, which is what the benchmark asks
of a synthetic set.

The classifier is a linear probe (logistic regression on standardised features of the modality's feature
net), trained on the same latents at every epoch, scored by balanced accuracy on the stage's validation
side. It needs labels: a conditional stage, or an unconditional one with several per-label models (then
one epoch number is chosen for all of them, and an epoch counts only where every model has a snapshot).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from biomedsynth.gan import score
from biomedsynth.gan.checkpoint import COND_MODEL, Options, best_epoch, epoch_file, generate, generator, read_log
from biomedsynth.store import ImageSet, load_weights


def candidate_epochs(model_dirs: list) -> list[int]:
    """Epochs every model has a generator snapshot of, at its full side (a PGGAN still growing is left out)."""
    found = None
    for d in model_dirs:
        rows = read_log(d)
        top = max((r.get("side", 0) for r in rows), default=0)
        grown = {r["epoch"] for r in rows if r.get("side", 0) == top and r.get("alpha", 1.0) == 1.0
                 and epoch_file(d, r["epoch"]).is_file()}
        found = grown if found is None else found & grown
    return sorted(found or ())


def _generator(model_dir, opt: Options, epoch: int, device):
    snap = load_weights(epoch_file(model_dir, epoch))
    G = generator(opt)
    G.load_state_dict(snap["state_dict"])
    return G.to(device).eval(), snap["depth"], snap["alpha"]


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    """Balanced accuracy on (val_x, val_y) of a logistic regression fitted on (train_x, train_y)."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_x, train_y)
    return float(balanced_accuracy_score(val_y, probe.predict(val_x)))


@torch.no_grad()
def utility_by_epoch(model_root, opt: Options, net: score.FeatureNet, val: ImageSet, per_label: int = 64,
                     seed: int = 0, device="cpu") -> dict[int, float]:
    """{epoch: balanced accuracy on `val` of a probe trained on `per_label` samples per label of that epoch}."""
    if len(opt.labels) < 2:
        raise ValueError(f"{model_root}: one label ({opt.labels[0]}); utility needs a labelled setup")
    cond = opt.setup == "cond"
    dirs = {lb: model_root / (COND_MODEL if cond else lb) for lb in opt.labels}
    epochs = candidate_epochs(list(dict.fromkeys(dirs.values())))
    if not epochs:
        raise ValueError(f"{model_root}: no epoch with a snapshot at the full side in every model")
    val_y = np.searchsorted(np.asarray(opt.labels), val.meta["label"].to_numpy())
    val_x = np.concatenate([score.extract_features(net, score.read_batch(val, idx, opt.resolution).to(device))
                            for idx in np.array_split(np.arange(len(val)), max(1, len(val) // 512))])
    z = torch.randn(per_label * len(opt.labels), opt.latent_dim, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(len(opt.labels)).repeat_interleave(per_label)
    out = {}
    for epoch in epochs:
        images = []
        for k, label in enumerate(opt.labels):
            G, depth, alpha = _generator(dirs[label], opt, epoch, device)
            rows = slice(k * per_label, (k + 1) * per_label)
            labels = y[rows].to(device) if cond else None
            images.append(generate(G, opt, z[rows].to(device), labels, depth, alpha))
        feats = score.extract_features(net, torch.cat(images).to(device))
        out[epoch] = round(probe_accuracy(feats, y.numpy(), val_x, val_y), 4)
    return out


def utility_epoch(scores: dict[int, float]) -> int:
    """The epoch of the highest utility (the latest on a tie: it trained longest)."""
    return max(scores, key=lambda e: (scores[e], e))


def choose_checkpoint(checkpoint: str, model_root: Path, feature_net: Path, val_dir: Path) -> tuple[str | int, dict]:
    """(what the Synthesizer samples from, how it was chosen). `utility` scores every full-size epoch with
    the probe and picks one epoch for the stage, next to the epochs SWD would pick; a one-label stage has
    nothing to probe and takes `best`. Any other choice passes through."""
    if checkpoint != "utility":
        return checkpoint, {"rule": checkpoint}
    opt = Options.from_json(json.loads((Path(model_root) / "options.json").read_text()))
    if len(opt.labels) < 2:
        return "best", {"rule": "best", "why": f"utility needs labels; {Path(model_root).name} has one"}
    scores = utility_by_epoch(Path(model_root), opt, score.load_feature_net(feature_net), ImageSet(val_dir),
                              seed=opt.seed)
    swd = {m.name: best_epoch(read_log(m)) for m in sorted(Path(model_root).iterdir()) if (m / "log.jsonl").is_file()}
    return utility_epoch(scores), {"rule": "utility", "balanced_accuracy_by_epoch": scores, "swd_best_epochs": swd}

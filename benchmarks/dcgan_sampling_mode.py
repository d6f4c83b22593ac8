"""Which BatchNorm mode should a trained DCGAN sample in? Scores of the chosen checkpoint's samples drawn in eval
mode (BatchNorm's running statistics: what the synthesize stage does) and in train mode (each batch's own
statistics: the function the discriminator was trained against), against the group's validation images.

    .venv/bin/python benchmarks/dcgan_sampling_mode.py [--stages dcgan-h_norm-uncond dcgan-h_tumor-uncond]
                                                        [--images 256] [--seeds 0 1 2]

Run after `make repro`: it reads models/gan/<stage>, models/feature_net/<modality>.pt and data/studygroups.
Prints per stage, mode and seed the SWD (lower is better), KID in the modality's feature space and PRDC
coverage (higher is better), with the real floor (training vs validation images) beside them.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from biomedsynth.evidence import prdc
from biomedsynth.gan import score
from biomedsynth.gan.checkpoint import COND_MODEL, Options, epoch_file, generator, resolve_checkpoint
from biomedsynth.gan.score import read_batch
from biomedsynth.store import ImageSet

MODALITY = {"x_norm": "xray", "x_norm_l": "xray", "h_norm": "histology", "h_tumor": "histology"}


def generators(stage: Path) -> tuple[Options, dict[str, torch.nn.Module]]:
    """The stage's options and, per model, the generator of its best epoch."""
    opt = Options.from_json(json.loads((stage / "options.json").read_text()))
    out = {}
    for name in ([*opt.labels] if opt.setup == "uncond" else [COND_MODEL]):
        snap = torch.load(epoch_file(stage / name, resolve_checkpoint(stage / name, "best")), map_location="cpu",
                          weights_only=False)
        G = generator(opt)
        G.load_state_dict(snap["state_dict"])
        out[name] = G
    return opt, out


@torch.no_grad()
def draw(G: torch.nn.Module, opt: Options, n: int, train_mode: bool, seed: int, batch: int = 64) -> torch.Tensor:
    """n images in [-1, 1] from a copy of G (train-mode BatchNorm updates running statistics: not G's)."""
    G = copy.deepcopy(G).train(train_mode)
    z = torch.randn(n, opt.latent_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([G(z[s:s + batch], None).float().clamp(-1, 1) for s in range(0, n, batch)])


def scores(real: torch.Tensor, fake: torch.Tensor, net, seed: int) -> dict:
    real_f, fake_f = score.extract_features(net, real), score.extract_features(net, fake)
    return {"swd": score.sliced_wasserstein(real, fake, seed=seed)[1], "kid": score.kid(real_f, fake_f, seed=seed)[0],
            "coverage": prdc(real_f, fake_f)["coverage"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", default=["dcgan-h_norm-uncond", "dcgan-h_tumor-uncond"])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    for name in args.stages:
        group = name.split("-")[1]
        opt, models = generators(Path("models/gan") / name)
        net = score.load_feature_net(Path("models/feature_net") / f"{MODALITY[group]}.pt", "cpu")
        val, train = (ImageSet(Path("data/studygroups") / group / side) for side in ("val", "train"))
        n = min(args.images, len(val), len(train))  # SWD compares sets of one size
        pick = lambda ds: np.sort(np.random.default_rng(0).choice(len(ds), n, replace=False))  # noqa: E731
        real = read_batch(val, pick(val), opt.resolution)
        floor = scores(real, read_batch(train, pick(train), opt.resolution), net, 0)
        print(f"{name}: floor (train vs val) " + ", ".join(f"{k} {v:.4f}" for k, v in floor.items()))
        for mode in ("eval", "train"):
            rows = [scores(real, draw(G, opt, len(real), mode == "train", seed), net, seed)
                    for seed in args.seeds for G in models.values()]
            print(f"  {mode:5s} " + ", ".join(f"{k} {np.mean([r[k] for r in rows]):.4f} +- {np.std([r[k] for r in rows]):.4f}"
                                           for k in rows[0]))


if __name__ == "__main__":
    main()

"""How good a GAN run is: every epoch of a model scored against validation images of patients or slides the GAN
never saw (Scorer: SWD and KID, beside the scores of real training images, noise and blur), then, per model and
per stage, the best epoch, the trend and whether it learnt anything (model_summary, summarise). The train_gan
stage writes these; synthesize and export read the `learnt` rule back."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from biomedsynth.gan import score
from biomedsynth.gan.checkpoint import Options, best_epoch, generate
from biomedsynth.store import ImageSet

# `learnt`: the best SWD lies less than this share of the way from the real floor (0) to the better of the
# noise and blur baselines (1). Half way, not "below the baseline": a collapsed GAN drawing checkerboard
# noise scores within a few percent of noise, on either side depending on the scoring seed (measured).
LEARNT_BELOW = 0.5


def _cycled(x: torch.Tensor, n: int) -> torch.Tensor:
    """x repeated end to end along its first axis, cut to n."""
    return x.repeat(-(-n // len(x)), *[1] * (x.ndim - 1))[:n]


@dataclass
class Reference:
    """What one model's epochs are compared with, and the scores that say what good and bad are (`scores`:
    the floor, real training images; noise with their colours; the same images blurred)."""
    real: torch.Tensor                # score_images validation images: the distinct ones, repeated up to that count
    feats: np.ndarray                 # features of the distinct ones (KID's unbiased estimate needs no repeats)
    class_ids: torch.Tensor | None    # conditional models: the class of each of `real`
    scores: dict


class Scorer:
    """Per-epoch SWD and KID of a generator against its model's validation images.

    Each epoch draws opt.score_images images from the generator. SWD compares them with as many validation
    images: the model's (at most that many), repeated when it has fewer, each repeat with new random
    neighbourhoods, so the generated side is never cut to the few validation images a label may have (with
    25 generated images per epoch the chosen epoch moved with the scoring seed, with 64 or more it did not:
    measured). KID compares features of distinct images only. `seed` fixes everything random in a score
    (the subsets, SWD's neighbourhoods and directions, KID's subsets, the generator's latents), so epochs
    differ by their generator only."""

    def __init__(self, train: ImageSet, val: ImageSet, feature_net: score.FeatureNet, device: torch.device,
                 seed: int):
        self.train, self.val, self.net, self.device, self.seed = train, val, feature_net, device, seed
        self._refs: dict[str, Reference] = {}

    def _compare(self, opt: Options, ref: Reference, images: torch.Tensor) -> dict:
        """SWD and KID of distinct images (at most score_images, repeated up to it for SWD) against the reference."""
        # on the GPU when training there: SWD sorts millions of projections at the paper's image count
        _, swd = score.sliced_wasserstein(ref.real, _cycled(images, len(ref.real)),
                                          dir_repeats=max(1, opt.swd_directions // 128), seed=self.seed)
        kid_mean, _ = score.kid(ref.feats, score.extract_features(self.net, images), n_subsets=50, seed=self.seed)
        return {"swd": round(swd, 6), "kid": round(kid_mean, 6)}

    def _distinct(self, images: ImageSet, indices: np.ndarray, opt: Options, rng: np.random.Generator):
        """At most score_images of `indices`, drawn at random and sorted, and their images."""
        pick = np.sort(rng.permutation(len(indices))[:opt.score_images])
        return pick, score.read_batch(images, indices[pick], opt.resolution).to(self.device)

    def reference(self, opt: Options, data) -> Reference:  # data: a train.ModelData (name, indices, val_indices...)
        """The model's validation images and its floor, noise and blur scores (computed once per model)."""
        if data.name not in self._refs:
            rng = np.random.default_rng((self.seed, len(data.val_indices)))
            pick, val = self._distinct(self.val, data.val_indices, opt, rng)
            y = None if data.val_class_ids is None else _cycled(torch.from_numpy(data.val_class_ids[pick]),
                                                                 opt.score_images)
            ref = Reference(_cycled(val, opt.score_images), score.extract_features(self.net, val), y,
                            {"images": opt.score_images, "val_images": len(pick)})
            _, train = self._distinct(self.train, data.indices, opt, rng)
            noise = score.noise_images(_cycled(train, opt.score_images), self.seed)
            for name, imitation in (("floor", train), ("noise", noise), ("blur", score.blurred(train))):
                ref.scores.update({f"{k}_{name}": v for k, v in self._compare(opt, ref, imitation).items()})
            self._refs[data.name] = ref
        return self._refs[data.name]

    def score(self, G, opt: Options, data, depth, alpha, epoch: int) -> dict:
        """The epoch's SWD and KID, with the model's floor beside them."""
        ref = self.reference(opt, data)
        g = torch.Generator().manual_seed(self.seed + 1)  # the same latents every epoch: epochs differ by G only
        z = torch.randn(opt.score_images, opt.latent_dim, generator=g).to(self.device)
        y = None if ref.class_ids is None else ref.class_ids.to(self.device)
        noise = torch.Generator(self.device).manual_seed(self.seed + 2)  # sg2ada's noise maps: likewise the same
        fake = generate(G, opt, z, y, depth, alpha, noise=noise).to(self.device)
        return {**self._compare(opt, ref, fake), "swd_floor": ref.scores["swd_floor"],
                "kid_floor": ref.scores["kid_floor"]}


def trend(rows: list[dict], tail: float) -> dict:
    """Whether a model was still improving when training stopped: its best epoch lies in the last `tail`
    share of the epochs (at least the last 2) and its SWD still falls there (least-squares slope per epoch)."""
    last = rows[-max(2, math.ceil(tail * len(rows))):]
    last = [r for r in last if r["swd"] is not None]  # a rescored run's epochs without a kept generator
    slope = float(np.polyfit([r["epoch"] for r in last], [r["swd"] for r in last], 1)[0]) if len(last) > 1 else 0.0
    return {"swd_tail_slope": round(slope, 6),
            "still_improving": bool(best_epoch(rows) >= last[0]["epoch"] and slope < 0)}


def model_summary(rows: list[dict], ref: dict, tail: float) -> dict:
    """One model's best and last scores, its real floor, the baseline (the better of two trivial imitations:
    noise with the real colours, blurred real images), its trend, `swd_relative` (the best SWD on a scale
    where real images score 0 and the baseline 1) and `learnt` (swd_relative below LEARNT_BELOW)."""
    best = next(r for r in rows if r["epoch"] == best_epoch(rows))
    baseline = min(ref["swd_noise"], ref["swd_blur"])
    relative = (best["swd"] - ref["swd_floor"]) / max(baseline - ref["swd_floor"], 1e-12)
    return {"best_epoch": best["epoch"], "swd_best": best["swd"], "kid_best": best["kid"], "swd_last": rows[-1]["swd"],
            "kid_last": rows[-1]["kid"], **ref, "swd_baseline": baseline,
            "swd_best_over_floor": round(best["swd"] / max(ref["swd_floor"], 1e-12), 3),
            "swd_relative": round(relative, 3), **trend(rows, tail), "learnt": bool(relative < LEARNT_BELOW)}


def summarise(results: dict[str, list[dict]], refs: dict[str, dict], plans: dict, opt: Options,
              tail: float) -> dict:
    """Stage metrics: per model (`per_model`) its model_summary and, for PGGAN, its EMA half-life and the least
    share of a growth phase in its sampled generator; over the models, the mean of the scores, floors and
    baselines, `learnt` (every model learnt) and `still_improving` (any model still was)."""
    per_model = {name: model_summary(rows, refs[name], tail) for name, rows in results.items()}
    for name, plan in plans.items():
        if plan.ema_half_life is not None:
            per_model[name].update(ema_half_life=round(plan.ema_half_life, 1),
                                   ema_phase_share_min=min(plan.ema_phase_shares.values()))
    mean = lambda k: round(float(np.mean([m[k] for m in per_model.values()])), 6)  # noqa: E731
    count = lambda k: sum(m[k] for m in per_model.values())  # noqa: E731
    return {"models": len(results), "epochs": opt.total_epochs, "score_images": opt.score_images,
            "val_images": min(m["val_images"] for m in per_model.values()),
            **{k: mean(k) for k in ("swd_best", "kid_best", "swd_last", "kid_last", "swd_floor", "kid_floor",
                                    "swd_baseline", "swd_relative")},
            "best_epoch_mean": round(float(np.mean([m["best_epoch"] for m in per_model.values()])), 2),
            "models_learnt": count("learnt"), "learnt": count("learnt") == len(per_model),
            "models_still_improving": count("still_improving"), "still_improving": count("still_improving") > 0,
            "per_model": per_model}


def not_learnt_rule(m: dict) -> str:
    """The `learnt` rule in words and this model's numbers: its best SWD lies more than LEARNT_BELOW of the way
    from real images' SWD toward noise or blur's (swd_relative)."""
    return (f"its best SWD {m['swd_best']:.4f} lies {m['swd_relative']:.0%} of the way from real images' "
            f"{m['swd_floor']:.4f} toward noise or blur's {m['swd_baseline']:.4f}; a model that learnt lies under "
            f"{LEARNT_BELOW:.0%}")


def warn(summary: dict, log) -> None:
    """One line per model that learnt nothing or was still improving at its last epoch."""
    for name, m in summary["per_model"].items():
        if not m["learnt"]:
            log(f"WARNING {name} learnt nothing (best epoch {m['best_epoch']}): {not_learnt_rule(m)}")
        if m["still_improving"]:
            log(f"WARNING {name} was still improving at its last epoch (best epoch {m['best_epoch']} of "
                f"{summary['epochs']}, SWD falling {-m['swd_tail_slope']:.4f} per epoch); train it longer")

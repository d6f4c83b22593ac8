"""Which library's UNet and schedulers the diffusion architecture is built on: diffusers or MONAI (its generative
networks, merged into MONAI core since 1.4), measured at 64 px on the same images, objective and budget.

    .venv/bin/pip install monai einops   # MONAI is not a dependency: only this comparison needs it
    .venv/bin/python benchmarks/diffusion_libraries.py --train data/studygroups/x_norm/train \
        --val data/studygroups/x_norm/val --feature-net models/feature_net/xray.pt [--steps 200] [--batch 16]

For each library: a class-conditional UNet of the same shape (widths 32-64-64-64, one residual block per level,
self-attention at the two coarsest levels, GroupNorm of 8 groups), the same v-prediction loss on the library's own
DDPM schedule (cosine, 1,000 steps), Adam 2e-4, --steps steps of --batch images, the same seed and batches. It
prints parameters, training img/s, sampling img/s with the library's DDIM at 25 steps (and diffusers' DPM-Solver++,
which MONAI lacks), and the sample quality after training: SWD and KID of 128 samples against the validation
images (gan/score.py, the pipeline's own scores), beside the same scores of real training images (the floor).
The two libraries are timed in turns, step by step, so a busy machine slows both alike.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biomedsynth.gan import score
from biomedsynth.store import ImageSet

WIDTHS = (32, 64, 64, 64)
ATTENTION = (False, False, True, True)


def diffusers_net(channels: int, classes: int):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

    net = UNet2DModel(sample_size=64, in_channels=channels, out_channels=channels, layers_per_block=1,
                      block_out_channels=WIDTHS, norm_num_groups=8, attention_head_dim=32,
                      down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in ATTENTION),
                      up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(ATTENTION)),
                      num_class_embeds=classes)
    kw = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    samplers = {"ddim": DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=False),
                "dpm++": DPMSolverMultistepScheduler(**kw)}
    return net, DDPMScheduler(**kw), samplers, lambda x, t, y: net(x, t, class_labels=y).sample


def monai_net(channels: int, classes: int):
    from monai.networks.nets import DiffusionModelUNet
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    net = DiffusionModelUNet(spatial_dims=2, in_channels=channels, out_channels=channels, num_res_blocks=1,
                             channels=WIDTHS, attention_levels=ATTENTION, norm_num_groups=8, num_head_channels=32,
                             num_class_embeds=classes)
    kw = dict(num_train_timesteps=1000, schedule="cosine", prediction_type="v_prediction")
    return (net, DDPMScheduler(**kw), {"ddim": DDIMScheduler(**kw, clip_sample=False)},
            lambda x, t, y: net(x, t, class_labels=y))


@torch.no_grad()
def sample(call, sampler, z: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    sampler.set_timesteps(steps)
    x = z
    for t in sampler.timesteps:
        out = sampler.step(call(x, t.expand(len(x)), y), t, x)
        x = out.prev_sample if hasattr(out, "prev_sample") else out[0]
    return x.clamp(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--feature-net", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--score-images", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    train, val = ImageSet(args.train), ImageSet(args.val)
    labels = sorted(train.meta["label"].unique())
    y_all = torch.from_numpy(np.searchsorted(labels, train.meta["label"].to_numpy()))
    channels = train.shape[2]
    fnet = score.load_feature_net(args.feature_net)
    nets = {}
    for name, build in (("diffusers", diffusers_net), ("monai", monai_net)):
        torch.manual_seed(0)
        net, ddpm, samplers, call = build(channels, len(labels))
        nets[name] = dict(net=net, ddpm=ddpm, samplers=samplers, call=call, seconds=0.0,
                          adam=torch.optim.Adam(net.parameters(), lr=2e-4), losses=[])
    rng = np.random.default_rng(0)
    for step in range(args.steps):
        idx = np.sort(rng.choice(len(train.meta), args.batch, replace=False))
        x = score.read_batch(train, idx, 64)
        y = y_all[idx]
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(step))
        t = torch.from_numpy(rng.integers(0, 1000, args.batch))
        for m in nets.values():
            t0 = time.perf_counter()
            loss = F.mse_loss(m["call"](m["ddpm"].add_noise(x, noise, t), t, y), m["ddpm"].get_velocity(x, noise, t))
            m["adam"].zero_grad()
            loss.backward()
            m["adam"].step()
            m["seconds"] += time.perf_counter() - t0
            m["losses"].append(loss.item())
    pick = np.sort(np.random.default_rng(1).permutation(len(val.meta))[:args.score_images])
    real_val = score.read_batch(val, pick, 64)
    val_feats = score.extract_features(fnet, real_val)
    floor = score.read_batch(train, np.sort(rng.choice(len(train.meta), len(pick), replace=False)), 64)
    yv = torch.from_numpy(np.searchsorted(labels, val.meta["label"].to_numpy()[pick]))
    z = torch.randn(real_val.shape, generator=torch.Generator().manual_seed(7))

    def scores(images: torch.Tensor) -> str:
        _, swd = score.sliced_wasserstein(real_val, images, seed=0)
        kid, _ = score.kid(val_feats, score.extract_features(fnet, images), n_subsets=50, seed=0)
        return f"SWD {swd:.4f} KID {kid:.4f}"

    print(f"{args.steps} steps of {args.batch} images, 64 px, {channels} channel(s), {len(labels)} classes; "
          f"{torch.get_num_threads()} CPU threads; real training images: {scores(floor)}")
    for name, m in nets.items():
        m["net"].eval()
        params = sum(p.numel() for p in m["net"].parameters()) / 1e6
        print(f"{name}: {params:.2f} M parameters, train {args.steps * args.batch / m['seconds']:.1f} img/s, "
              f"loss first/last 20 steps {np.mean(m['losses'][:20]):.4f}/{np.mean(m['losses'][-20:]):.4f}")
        for sampler_name, sampler in m["samplers"].items():
            t0 = time.perf_counter()
            fake = sample(m["call"], sampler, z, yv, 25)
            seconds = time.perf_counter() - t0
            print(f"  {sampler_name} 25 steps: {len(z) / seconds:.2f} img/s, {scores(fake)}")


if __name__ == "__main__":
    main()

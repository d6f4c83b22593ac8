"""Training and sampling throughput of the diffusion architecture: sampling, not training, is its cost.

    .venv/bin/python benchmarks/diffusion_speed.py [--res 64 256] [--widths default paper] [--steps 3]

Per side and profile widths (gan.diffusion of profiles/<name>.yaml: UNet widths, sampler, its steps, guidance) it
prints the UNet's parameters, the images/s of the pipeline's own training step (gan/losses.DiffusionLoss, a
conditional model of two labels, EMA included) and of drawing images (gan/diffusion.Generator: `steps` sampler steps,
each two network evaluations under guidance; timed over 2 steps and scaled), and on CUDA the peak memory of each; fp32 on the CPU, bf16 autocast
on CUDA for training (sampling runs in fp32, as synthesize does). Training at batch 16; sampling hands over 64
latents at once, as scoring and synthesize hand over theirs (on a CPU the sampler runs them 16 network inputs at a
time: diffusion.CPU_BATCH); one untimed warm-up each.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from biomedsynth.distributed import pick_device
from biomedsynth.gan import checkpoint as C
from biomedsynth.gan import diffusion
from biomedsynth.gan import train as T
from biomedsynth.params_edit import profile_values
from timing import images_per_s  # benchmarks/timing.py, beside this script

BATCH = 16
DRAWN = 64  # latents per sampling call
SAMPLED_STEPS = 2  # sampler steps timed; every step costs the same (one or, under guidance, two evaluations)


def options(res: int, profile: str) -> C.Options:
    """A conditional model at `res` px with the profile's gan.diffusion (params.yaml's for keys it leaves)."""
    p = {**yaml.safe_load(Path("params.yaml").read_text())["gan"]["diffusion"],
         **profile_values(profile)["gan"]["diffusion"]}
    return C.Options(arch="diffusion", setup="cond", labels=("a", "b"), resolution=res, channels=1,
                     latent_dim=diffusion.latent_dim(res, 1), batch_size=BATCH, epochs=1, seed=0, lr=p["lr"],
                     betas=tuple(p["betas"]), ema_half_life=10_000.0, label_dropout=p["label_dropout"],
                     net={k: p[k] for k in ("base_width", "width_max", "attention_below", "layers_per_block")},
                     sampling=dict(sampler=p["sampler"], steps=p["steps"], guidance=p["guidance"]))


def measure(opt: C.Options, device: torch.device, steps: int) -> dict:
    torch.manual_seed(0)
    nets = T.build(opt, device, opt.ema_half_life)
    G, loss = nets[0], nets[5]
    real = torch.rand(BATCH, 1, opt.resolution, opt.resolution, device=device) * 2 - 1
    y = torch.arange(BATCH, device=device) % 2
    rng = torch.Generator(device).manual_seed(0)
    seen = [0]

    def train():
        loss.train_step(nets, real, y, (), seen[0], rng, device.type == "cuda")
        seen[0] += BATCH
    train_rate, train_peak = images_per_s(train, BATCH, steps, device)
    sampler = nets[4].model
    sampler.steps = SAMPLED_STEPS  # timed over a few sampler steps, scaled to the profile's
    z = torch.randn(DRAWN, opt.latent_dim, device=device)
    y = torch.arange(DRAWN, device=device) % 2
    rate, sample_peak = images_per_s(lambda: C.generate(sampler, opt, z, y), DRAWN, 1, device)
    sample_rate = rate * SAMPLED_STEPS / opt.sampling["steps"]
    return {"params": sum(p.numel() for p in G.parameters()) / 1e6, "train": train_rate, "train_peak": train_peak,
            "sample": sample_rate, "sample_peak": sample_peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--res", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--widths", nargs="+", default=["default", "paper"])
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    args = ap.parse_args()
    device = pick_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"diffusion on {name}, training batch {BATCH}, {DRAWN} latents per sampling call, conditional (2 labels)")
    print("side  widths   UNet M   sampler      train img/s  sample img/s  peak MiB train/sample")
    for res in args.res:
        for widths in args.widths:
            opt = options(res, widths)
            m = measure(opt, device, args.steps)
            s = opt.sampling
            print(f"{res:4d}  {widths:7s} {m['params']:7.2f}   {s['sampler']:5s} x{s['steps']:<3d}  "
                  f"{m['train']:11.2f}  {m['sample']:12.3f}  {m['train_peak']:.0f}/{m['sample_peak']:.0f}")


if __name__ == "__main__":
    main()

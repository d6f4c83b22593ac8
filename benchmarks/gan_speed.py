"""Training throughput of DCGAN and PGGAN (one D step + one G step, + EMA for PGGAN) at batch 32.

    .venv/bin/python benchmarks/gan_speed.py [--res 64 256] [--steps 5] [--channels 1] [--widths paper|default]

On CPU it measures fp32; on CUDA fp32 and bf16 autocast + channels_last side by side, in one run.
PGGAN runs at its full depth (alpha 1), with the WGAN-GP penalty's double backward.
"""
from __future__ import annotations

import argparse

import torch

from biomedsynth.gan import dcgan, pggan
from timing import images_per_s as time_steps  # benchmarks/timing.py, beside this script


# network widths: the papers' (the paper profile) and the default profile's CPU-sized ones
WIDTHS = {"paper": dict(latent=512, dcgan=dict(base_width=64), pggan=dict(fmap_base=8192, fmap_max=512)),
          "default": dict(latent=128, dcgan=dict(base_width=16), pggan=dict(fmap_base=256, fmap_max=32))}


def build(arch: str, res: int, channels: int, device: torch.device, channels_last: bool, widths: str = "paper"):
    w = WIDTHS[widths]
    latent = w["latent"]
    if arch == "dcgan":
        G, D = dcgan.Generator(res, channels, latent, **w["dcgan"]), dcgan.Discriminator(res, channels, **w["dcgan"])
        mod, extra = dcgan, ()
    else:
        G, D = pggan.Generator(res, channels, latent, **w["pggan"]), pggan.Discriminator(res, channels, **w["pggan"])
        mod, extra = pggan, (None, 1.0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    G, D = G.to(device, memory_format=fmt), D.to(device, memory_format=fmt)
    return G, D, mod, extra, latent, fmt


def images_per_s(arch: str, res: int, channels: int, batch: int, steps: int, device: torch.device,
                 bf16: bool, widths: str = "paper") -> tuple[float, float]:
    """(images/s, peak GPU MiB or nan) of `steps` timed training steps after one warm-up step."""
    torch.manual_seed(0)
    G, D, mod, extra, latent, fmt = build(arch, res, channels, device, channels_last=bf16, widths=widths)
    ema = pggan.EMA(G) if arch == "pggan" else None
    opt_g, opt_d = mod.make_optimizers(G, D)
    real = (torch.rand(batch, channels, res, res, device=device) * 2 - 1).to(memory_format=fmt)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                fake = G(torch.randn(batch, latent, device=device), None, *extra)
            loss_d = mod.d_loss(D, real, fake, None, *extra)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss_g = mod.g_loss(D, G(torch.randn(batch, latent, device=device), None, *extra), None, *extra)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if ema is not None:
            ema.update(G)

    return time_steps(step, batch, steps, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--arch", nargs="+", default=["dcgan", "pggan"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--widths", choices=sorted(WIDTHS), default="paper", help="network widths of this profile")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    modes = [False, True] if device.type == "cuda" else [False]
    print(f"torch {torch.__version__} on {name}; batch {args.batch}, {args.channels} channel(s), {args.steps} steps, "
          f"{args.widths} widths {WIDTHS[args.widths]}")
    print(f"{'arch':6} {'px':>4} {'mode':>13} {'img/s':>9} {'peak MiB':>9}")
    for arch in args.arch:
        for res in args.res:
            for bf16 in modes:
                ips, peak = images_per_s(arch, res, args.channels, args.batch, args.steps, device, bf16, args.widths)
                mode = "bf16+chlast" if bf16 else "fp32"
                print(f"{arch:6} {res:>4} {mode:>13} {ips:>9.1f} {peak:>9.0f}", flush=True)


if __name__ == "__main__":
    main()

"""Training throughput of DCGAN and PGGAN: the pipeline's step against a plain reference step, and a whole stage;
sg2ada's pipeline step alone (no reference: `-`).

    .venv/bin/python benchmarks/gan_speed.py [--res 64 256] [--arch dcgan pggan sg2ada] [--steps 5]
                                             [--widths paper|default] [--stage-models 4] [--no-stage]
                                             [--peak-tflops T]

Per architecture, side and mode (CPU: fp32; CUDA: fp32 and bf16 + channels_last) it prints the images/s of
- `before`, the plain step: every batch converted and resized on the host and copied from pageable memory,
  D's weight gradients computed in the G step, two host syncs per step (the losses), nearest upsampling
  then a 3x3 conv, pixel norm in fp32 under autocast, for-each Adam, an EMA loop over the tensors;
- `after`, the pipeline's own step (the loss object's train_step on gan/train.TrainingImages): the same algorithm;
their ratio, the peak GPU memory of `after`, and MFU: the plain step's model FLOPs per image (torch's
flop formulas over one step, the penalty's double backward included) times images/s over the card's bf16
dense peak (known for H100, H200, A100; else --peak-tflops). Batch 32, full depth, WGAN-GP every step.
Then a whole-stage figure: an unconditional stage of --stage-models per-label models (train_gan, scoring
included) trained one after another and `models_per_device` at a time, in images/s over the stage.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from biomedsynth.gan import pggan, score
from biomedsynth.gan import checkpoint as C
from biomedsynth.gan import train as T
from biomedsynth.gan.ema import EMA
from biomedsynth.store import ImageSetWriter
from timing import images_per_s as time_steps  # benchmarks/timing.py, beside this script

# network widths: the papers' (the paper profile) and the default profile's CPU-sized ones
WIDTHS = {"paper": dict(latent=512, dcgan=dict(base_width=64), pggan=dict(fmap_base=8192, fmap_max=512),
                       sg2ada=dict(channel_base=16384, channel_max=512, mapping_layers=8)),
          "default": dict(latent=128, dcgan=dict(base_width=16), pggan=dict(fmap_base=256, fmap_max=32),
                         sg2ada=dict(channel_base=512, channel_max=32, mapping_layers=8))}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def options(arch: str, res: int, batch: int, widths: str, channels: int = 1, **kw) -> C.Options:
    w = WIDTHS[widths]
    base = dict(arch=arch, setup="uncond", labels=("a",), resolution=res, channels=channels, latent_dim=w["latent"],
                batch_size=batch, epochs=1, seed=0, lr=2e-4 if arch == "dcgan" else 1e-3,
                betas=(0.5, 0.999) if arch == "dcgan" else (0.0, 0.99), net=w[arch])
    if arch == "sg2ada":  # the params' defaults: lr 0.0025, R1 by the heuristic, the modality's augmentations
        base.update(lr=0.0025, r1_gamma=C.r1_gamma_heuristic(res, batch),
                    augment="xray" if channels == 1 else "histology")
    return C.Options(**{**base, **kw})


class Stored:
    """uint8 (N, side, side, C) images as the store serves them, one by one from host memory."""

    def __init__(self, n: int, side: int, channels: int):
        self.images = np.random.default_rng(0).integers(0, 256, (n, side, side, channels), dtype=np.uint8)
        self.shape = self.images.shape[1:]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[i]


class FlopCount(TorchDispatchMode):
    """FLOPs of the matmuls and convolutions run under it, by torch's own formulas, counted below autograd:
    FlopCounterMode's module hooks refuse the penalty's autograd.grad on a leaf."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
        return out


@contextlib.contextmanager
def plain_generator():
    """PGGAN's generator as it was: upsampling then the 3x3 conv, pixel norm as autocast runs it (fp32)."""
    fused, norm = pggan.upsample_conv, pggan.pixel_norm
    pggan.upsample_conv = lambda x, conv: conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    pggan.pixel_norm = lambda x, eps=1e-8: x * torch.rsqrt(x.square().mean(1, keepdim=True) + eps)
    try:
        yield
    finally:
        pggan.upsample_conv, pggan.pixel_norm = fused, norm


def plain_step(opt: C.Options, nets, stored: Stored, rng: np.random.Generator, extra: tuple, bf16: bool) -> None:
    """The reference: the same losses and updates, written the plain way (see the module's docstring)."""
    G, D, opt_g, opt_d, ema = nets
    device = next(G.parameters()).device
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    real = score.as_model_images(np.stack([stored[int(i)] for i in np.sort(rng.choice(len(stored.images),
                                                                                     opt.batch_size))]))
    if real.shape[-1] != opt.resolution:
        real = F.interpolate(real, size=opt.resolution, mode="area")
    real = real.to(device, memory_format=fmt)
    z = torch.randn(opt.batch_size, opt.latent_dim, device=device)
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            fake = G(z, None, *extra)
        loss_d = (pggan.d_loss(D, real, fake, None, *extra)[0] if opt.arch == "pggan"
                  else T.dcgan.d_loss(D, real, fake))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        loss_g = (pggan if opt.arch == "pggan" else T.dcgan).g_loss(D, G(torch.randn_like(z), None, *extra), None,
                                                                    *extra)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    if ema is not None:
        with torch.no_grad():
            for p_ema, p in zip(ema.model.parameters(), G.parameters()):
                p_ema.lerp_(p, 1 - 0.999)
    loss_d.item(), loss_g.item()


def plain_nets(opt: C.Options, device: torch.device):
    G, D = T.build(opt, torch.device("cpu"))[:2]
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    G, D = G.to(device, memory_format=fmt), D.to(device, memory_format=fmt)
    mod = pggan if opt.arch == "pggan" else T.dcgan
    return (G, D, *mod.make_optimizers(G, D, opt.lr, opt.betas), EMA(G, 1e4, None) if opt.arch == "pggan" else None)


def measure(arch: str, res: int, channels: int, batch: int, steps: int, device: torch.device, bf16: bool,
            widths: str, stored_side: int) -> dict:
    """{before, after, peak, flops_per_image} of one architecture and side on `device`."""
    opt = options(arch, res, batch, widths, channels)
    extra = (pggan.check_shape(res, channels), 1.0) if arch == "pggan" else ()
    stored = Stored(4 * batch, stored_side, channels)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    counter, before = FlopCount(), None
    if arch != "sg2ada":
        with plain_generator():
            nets = plain_nets(opt, device)
            with counter:
                plain_step(opt, nets, stored, rng, extra, bf16)
            before, _ = time_steps(lambda: plain_step(opt, nets, stored, rng, extra, bf16), batch, steps, device)
        del nets
    nets = T.build(opt, device, 1e4)
    images = T.TrainingImages(stored, np.arange(len(stored.images)), res, device)
    gen = torch.Generator(device).manual_seed(0)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    seen = [0]

    def after():
        real = images.batch(np.sort(rng.choice(len(stored.images), batch))).contiguous(memory_format=fmt)
        nets[5].train_step(nets, real, None, extra, seen[0], gen, bf16)  # the loss object's step
        seen[0] += batch
    if before is None:  # sg2ada: FLOPs of the pipeline's own step (R1's and path length's lazy ones included)
        with counter:
            after()
    after_rate, peak = time_steps(after, batch, steps, device)
    return {"before": before, "after": after_rate, "peak": peak, "flops_per_image": counter.flops / batch}


def stage_rate(models: int, per_model: int, res: int, arch: str, widths: str, per_device: int, root: Path) -> float:
    """Images/s of a whole train_gan stage of `models` per-label models, 2 epochs each, scoring included."""
    labels = tuple(f"L{k}" for k in range(models))
    group = root / "group"
    if not (group / "val").exists():
        rng = np.random.default_rng(0)
        for side, n in (("train", per_model), ("val", 16)):
            with ImageSetWriter(group / side, (res, res, 1)) as w:
                for k, label in enumerate(labels):
                    for i in range(n):
                        w.add(rng.integers(0, 256, (res, res, 1), dtype=np.uint8), label=label,
                              patient_id=f"{side}-{k}-{i}")
        train = score.as_model_images(np.stack([np.zeros((res, res, 1), np.uint8)] * 8 + [
            np.full((res, res, 1), 255, np.uint8)] * 8))
        net = score.train_feature_net(train, np.repeat([0, 1], 8), epochs=1, input_size=res)
        score.save_feature_net(net, root / "feature_net.pt", resolution=res)
    opt = options(arch, res, 16, widths, labels=labels, epochs=2, score_images=16)
    out = root / f"run{per_device}"
    t0 = time.perf_counter()
    T.train_gan(opt, group / "train", group / "val", root / "feature_net.pt", out / "models", out / "m.json",
                out / "s.csv", out / "l.csv", out / "states", models_per_device=per_device, log=lambda m: None)
    return models * 2 * (per_model // 16 * 16) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--arch", nargs="+", default=["dcgan", "pggan", "sg2ada"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--widths", choices=sorted(WIDTHS), default="paper", help="network widths of this profile")
    ap.add_argument("--stored-side", type=int, default=0, help="side of the stored images (0: 2x the GAN side)")
    ap.add_argument("--stage-models", type=int, default=4)
    ap.add_argument("--stage-per-device", type=int, default=2, help="models at once per device in the stage figure")
    ap.add_argument("--no-stage", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 dense peak, for MFU")
    args = ap.parse_args()
    os.environ.setdefault("BIOMEDSYNTH_MLFLOW", "0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    modes = [False, True] if device.type == "cuda" else [False]
    print(f"torch {torch.__version__} on {name}; batch {args.batch}, {args.channels} channel(s), {args.steps} steps, "
          f"{args.widths} widths {WIDTHS[args.widths]}; bf16 peak {peak or '?'} TFLOPS")
    print(f"{'arch':6} {'px':>4} {'mode':>11} {'before':>8} {'after':>8} {'ratio':>6} {'peak MiB':>9} "
          f"{'GFLOP/img':>10} {'MFU':>6}")
    torch.backends.cudnn.benchmark = True
    for arch in args.arch:
        for res in args.res:
            for bf16 in modes:
                r = measure(arch, res, args.channels, args.batch, args.steps, device, bf16, args.widths,
                            args.stored_side or 2 * res)
                mfu = f"{r['flops_per_image'] * r['after'] / (peak * 1e12):6.1%}" if peak else "     -"
                before, ratio = ((f"{r['before']:8.1f}", f"{r['after'] / r['before']:6.2f}") if r["before"]
                                 else (f"{'-':>8}", f"{'-':>6}"))
                print(f"{arch:6} {res:>4} {'bf16+chlast' if bf16 else 'fp32':>11} {before} "
                      f"{r['after']:8.1f} {ratio} {r['peak']:9.0f} "
                      f"{r['flops_per_image'] / 1e9:10.1f} {mfu}", flush=True)
    if not args.no_stage:
        with tempfile.TemporaryDirectory() as tmp:
            res, per_model = (32, 64) if device.type == "cpu" else (64, 1024)
            one = stage_rate(args.stage_models, per_model, res, "pggan", "default", 1, Path(tmp))
            many = stage_rate(args.stage_models, per_model, res, "pggan", "default", args.stage_per_device, Path(tmp))
            print(f"stage: {args.stage_models} unconditional PGGAN models ({res} px, default widths, {per_model} images "
                  f"each, 2 epochs, scored): one after another {one:.1f} img/s, {args.stage_per_device} at a time per "
                  f"device {many:.1f} img/s ({many / one:.2f}x)")


if __name__ == "__main__":
    main()

"""Training throughput of VGG16 (forward, cross-entropy, backward, fused Adam step) at batch 32.

    .venv/bin/python benchmarks/vgg_speed.py [--res 32 64 256] [--steps 3] [--channels 1] [--batch 32]

fp32 and, where `classify.vgg16.precision: auto` picks it (a GPU, a CPU with AMX tiles), bf16 autocast +
channels_last side by side, in one run; --head small for the 512-512 head of the default profile.
Inputs are random tensors already at the input size, so the figure is the network's, not the store's.
"""
from __future__ import annotations

import argparse

import torch

from biomedsynth.classify.vgg import build_vgg, make_optimizer, resolve_precision, train_step
from biomedsynth.distributed import pick_device
from timing import images_per_s as time_steps  # benchmarks/timing.py, beside this script


def images_per_s(res: int, channels: int, batch: int, steps: int, device: torch.device,
                 bf16: bool, head: str) -> tuple[float, float]:
    """(images/s, peak GPU MiB or nan) of `steps` timed training steps after one warm-up step."""
    torch.manual_seed(0)
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    model = build_vgg(channels, input_size=res, head=head).to(device, memory_format=fmt)
    opt = make_optimizer(model, 1e-4)
    x = torch.rand(batch, channels, res, res, device=device).mul(2).sub(1).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch,), device=device)
    return time_steps(lambda: train_step(model, opt, x, y, bf16), batch, steps, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, nargs="+", default=[32, 64, 256])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--head", choices=["torchvision", "small"], default="torchvision")
    args = ap.parse_args()
    device = pick_device()
    modes = [False, True] if resolve_precision("auto", device) == "bf16" else [False]
    print(f"VGG16 ({args.head} head) training, batch {args.batch}, {args.channels} channel(s), {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}")
    print(f"{'px':>5} " + " ".join(f"{'bf16+cl' if m else 'fp32':>16}" for m in modes))
    for res in args.res:
        cells = []
        for bf16 in modes:
            ips, peak = images_per_s(res, args.channels, args.batch, args.steps, device, bf16, args.head)
            cells.append(f"{ips:9.1f} img/s" + (f" {peak:6.0f} MiB" if peak == peak else ""))
        print(f"{res:>5} " + " ".join(f"{c:>16}" for c in cells), flush=True)


if __name__ == "__main__":
    main()

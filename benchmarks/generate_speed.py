"""Throughput of `biomedsynth generate`: images/s of drawing alone and of drawing and writing them in the export
layout (PNGs with their text chunk, metadata.csv, SHA256SUMS), for DCGAN and PGGAN generators.

    .venv/bin/python benchmarks/generate_speed.py [--res 64 256] [--n 512] [--batch 256] [--widths default|paper]

On the CPU it measures fp32; on CUDA also bf16 autocast, as `generate` runs there. The generators have random
weights (speed does not depend on training); each is saved and loaded the way a trained stage is.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from biomedsynth.generate import Source, generate
from biomedsynth.gan.checkpoint import Options, Synthesizer, epoch_file
from biomedsynth.gan.train import build
from biomedsynth.store import save_torch

# network widths and latent sizes: the paper profile's and the default profile's
WIDTHS = {"paper": dict(latent=512, dcgan=dict(base_width=64), pggan=dict(fmap_base=8192, fmap_max=512)),
          "default": dict(latent=128, dcgan=dict(base_width=16), pggan=dict(fmap_base=256, fmap_max=32))}


def stage(root: Path, arch: str, res: int, label: str, channels: int, widths: str) -> Path:
    """A one-label stage folder holding one epoch of a randomly initialised generator, as train_gan writes one."""
    w = WIDTHS[widths]
    opt = Options(arch=arch, setup="uncond", labels=(label,), resolution=res, channels=channels,
                  latent_dim=w["latent"], batch_size=32, epochs=1, seed=0, lr=1e-3, betas=(0.0, 0.99), net=w[arch])
    root.mkdir()
    (root / "options.json").write_text(json.dumps(opt.to_json()))
    model = root / label
    model.mkdir()
    (model / "log.jsonl").write_text(json.dumps({"epoch": 1, "snapshot": True, "swd": 0.0}) + "\n")
    G = build(opt)[0]
    save_torch({"state_dict": G.state_dict(), "depth": None, "alpha": 1.0}, epoch_file(model, 1))
    return root


def draw_rate(gen: Synthesizer, label: str, n: int, batch: int, bf16: bool) -> float:
    """Images/s of sampling alone (uint8 on the host), after one warm-up batch."""
    rng = np.random.default_rng(0)

    def run(k: int) -> None:
        with torch.autocast(gen.device.type, dtype=torch.bfloat16, enabled=bf16):
            gen.sample(label, k, rng)

    run(min(batch, n))
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        run(min(batch, n - start))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--arch", nargs="+", default=["dcgan", "pggan"])
    ap.add_argument("--n", type=int, default=512, help="images per measurement")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--widths", choices=sorted(WIDTHS), default="default")
    args = ap.parse_args()
    modality, label = ("xray", "F_18-38") if args.channels == 1 else ("histology", "normal")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}; CPU {torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
          + f"; {args.n} images, batch {args.batch}, {args.channels} channel(s), {args.widths} widths")
    print(f"{'arch':6} {'px':>4} {'device':>12} {'draw img/s':>11} {'generate img/s':>15}")
    for arch in args.arch:
        for res in args.res:
            with tempfile.TemporaryDirectory() as tmp:
                root = stage(Path(tmp) / "stage", arch, res, label, args.channels, args.widths)
                for device in devices:
                    gen = Synthesizer(root, "last", device)
                    cuda = device.type == "cuda"
                    drawn = draw_rate(gen, label, args.n, args.batch, bf16=cuda)
                    unjudged = {"flagged": False, "overridden": False, "evidence": "none: a benchmark's stage"}
                    summary = generate(Source(gen, "benchmark", modality, None, "none", "none", unjudged),
                                       Path(tmp) / f"out-{device.type}", args.n, batch_size=args.batch)
                    mode = "cuda bf16" if cuda else "cpu fp32"
                    print(f"{arch:6} {res:4d} {mode:>12} {drawn:11.1f} {summary['images_per_s']:15.1f}")


if __name__ == "__main__":
    main()

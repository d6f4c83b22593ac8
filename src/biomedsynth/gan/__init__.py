"""The generators: the study's GANs (dcgan.py, pggan.py), StyleGAN2-ADA (sg2ada.py) and a diffusion model
(diffusion.py), and the scores that pick their checkpoints (score.py)."""
import math

# the architectures, named once: params, the CLI, checkpoint.ARCHS (each a module of this name) and losses.LOSSES
ARCH_NAMES = ("dcgan", "pggan", "sg2ada", "diffusion")


def doublings(resolution: int, channels: int, lo: int, hi: int) -> int:
    """Number of 2x steps from 4x4 to `resolution`; ValueError for sizes a model does not build."""
    if not (lo <= resolution <= hi and resolution & (resolution - 1) == 0):
        raise ValueError(f"resolution must be a power of two in {lo}..{hi}, got {resolution}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return int(math.log2(resolution)) - 2

"""A denoising diffusion model as the fourth architecture beside the GANs: diffusers' UNet2DModel and schedulers
(chosen over MONAI's generative networks by benchmarks/diffusion_libraries.py), with only the glue written here.

- Objective: v-prediction (Salimans & Ho 2022) on a cosine schedule of 1,000 steps; training lives in
  gan/losses.DiffusionLoss, the loop's one object per architecture, so train.py treats it as any generator.
- Conditioning: a class embedding with one extra "no label" class; training drops the label with probability
  `label_dropout`, so one network also denoises without it and sampling can apply classifier-free guidance
  (Ho & Salimans 2022): v = v_uncond + guidance * (v_cond - v_uncond). guidance 1 is the plain conditional model.
- EMA weights are sampled (gan/ema.py's half-life in images, as sg2ada's).
- Sampling: DDIM (eta 0) or DPM-Solver++ (2nd order), `steps` network evaluations (twice that with guidance).

`Generator.forward(z, labels)` draws images from the initial noise: the latent of this architecture is the noise
image itself, flattened (latent_dim = channels * side^2), so every sampler of a GAN (epoch grids and scores,
synthesize, export, generate) draws from it unchanged, and a latent always gives the same image: both samplers
are deterministic given their start. The sampler, steps and guidance shape samples, not weights: the run key leaves
them out (gan/run_state.SCORING), so changing them rescores a trained run instead of training it again.
"""
from __future__ import annotations

import torch
from torch import nn

from biomedsynth.gan import doublings

TIMESTEPS = 1000
SAMPLERS = ("ddim", "dpm++")
LOWEST_SIDE = 8  # the UNet halves the side down to 8 px: 4 levels at 64 px, 6 at 256
# Network inputs per evaluation when sampling on a CPU: oneDNN's convolutions draw ~1.8x more images/s at 16 than at
# the 256 synthesize and scoring hand over, whose activations outgrow the cache (benchmarks/diffusion_speed.py)
CPU_BATCH = 16


def check_shape(resolution: int, channels: int) -> int:
    return doublings(resolution, channels, 32, 256)


def latent_dim(resolution: int, channels: int) -> int:
    """The latent of a diffusion model: its initial noise image, flattened."""
    return channels * resolution * resolution


def widths(resolution: int, base_width: int, width_max: int) -> list[int]:
    """Feature maps per UNet level, from the full side down to LOWEST_SIDE: base_width doubling, at most width_max;
    ValueError unless every width splits into GroupNorm's 8 groups and attention heads of min(32, base_width)."""
    if base_width % 8 or width_max % base_width:
        raise ValueError(f"diffusion's base_width must be a multiple of 8 and width_max a multiple of it, got "
                         f"{base_width} and {width_max}")
    levels = (resolution // LOWEST_SIDE).bit_length()
    return [min(base_width << k, width_max) for k in range(levels)]


def _schedule_args() -> dict:
    return dict(num_train_timesteps=TIMESTEPS, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


class Generator(nn.Module):
    """The denoiser (`unet`) with its noise schedule (`schedule`, for training) and sampler; forward samples."""

    def __init__(self, resolution: int, channels: int, latent_dim: int, n_classes: int = 0, base_width: int = 32,
                 width_max: int = 128, attention_below: int = 16, layers_per_block: int = 1, sampler: str = "ddim",
                 steps: int = 25, guidance: float = 1.0):
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel  # ~4 s to import

        super().__init__()  # sampler and latent_dim as checkpoint.Options checked them
        self.shape, self.n_classes = (channels, resolution, resolution), n_classes
        self.steps, self.guidance = steps, guidance
        level_widths = widths(resolution, base_width, width_max)
        attention = [resolution >> k <= attention_below for k in range(len(level_widths))]
        self.unet = UNet2DModel(
            sample_size=resolution, in_channels=channels, out_channels=channels, layers_per_block=layers_per_block,
            block_out_channels=tuple(level_widths), norm_num_groups=8, attention_head_dim=min(32, base_width),
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            num_class_embeds=n_classes + 1 if n_classes else None)  # the last class: "no label"
        self.schedule = DDPMScheduler(**_schedule_args())
        self.sampler = (DDIMScheduler(**_schedule_args(), clip_sample=False, set_alpha_to_one=False)
                        if sampler == "ddim" else DPMSolverMultistepScheduler(**_schedule_args()))

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The network's v-prediction for noisy images x at timesteps t (labels n_classes: no label)."""
        return self.unet(x, t, class_labels=labels).sample

    def guided(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """v with classifier-free guidance: the conditional and label-free predictions in one batch."""
        if labels is None or self.guidance == 1.0:
            return self.denoise(x, t, labels)
        both = self.denoise(torch.cat([x, x]), torch.cat([t, t]),
                            torch.cat([labels, torch.full_like(labels, self.n_classes)]))
        cond, free = both.chunk(2)
        return free + self.guidance * (cond - free)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images in about [-1, 1] from the initial noise z (N, latent_dim), `steps` steps of the sampler."""
        if (labels is None) != (self.n_classes == 0):
            raise ValueError("a conditional diffusion model needs labels, an unconditional one takes none")
        chunk = CPU_BATCH // 2 if labels is not None and self.guidance != 1.0 else CPU_BATCH  # guidance doubles it
        if z.device.type == "cpu" and len(z) > chunk:  # every image depends on its own latent and label only
            return torch.cat([self(z[s:s + chunk], None if labels is None else labels[s:s + chunk])
                              for s in range(0, len(z), chunk)])
        x = z.reshape(len(z), *self.shape)
        self.sampler.set_timesteps(self.steps, device=x.device)  # resets the multistep solver's history too
        for t in self.sampler.timesteps:
            x = self.sampler.step(self.guided(x, t.expand(len(x)), labels), t, x).prev_sample
        return x


def make_optimizers(G: nn.Module, D: None, lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.999),
                    fused: bool = False) -> tuple[torch.optim.Optimizer, None]:
    """Adam on the denoiser; no discriminator."""
    return torch.optim.Adam(G.parameters(), lr=lr, betas=betas, fused=fused or None), None

"""One training object per architecture, as stylegan2-ada-pytorch keeps one loss object per network: what the
training loop (gan/train.py) asks of an architecture, with the same methods for each, so the loop never asks
which architecture it trains.

    adversarial, uses_ema, grows
                             whether there is a discriminator (not for the diffusion model), whether the sampled
                             generator is an exponential moving average of G, and whether the networks grow
                             through phases (PGGAN)
    train_step(...)          one optimisation step on a batch of real images: (loss D, loss G, the penalty's
                             gradient norm or None), left on the device; a GAN's is one D step and one G step
    epoch_row(grad_norm)     what an epoch's log line adds: the penalty's mean gradient norm under its name
                             (PGGAN gp_grad_norm, sg2ada r1, with ADA's p and r_t)
    state_dict(), load_state_dict(state)
                             what the resume state keeps besides the networks (sg2ada: ADA and path length)

A GAN's train_step asks its object for the parts that differ:
    g_inputs(rng)            the keyword inputs G draws from the step's random stream besides z (sg2ada's noise)
    d_loss(...)              D's loss on a real and a fake batch, with its lazy regulariser on the steps it falls
                             on: (loss, the penalty's gradient norm or None)
    after_d_step()           what follows D's optimiser step (sg2ada: ADA moves its augmentation probability)
    g_loss(...)              G's loss, with its lazy regulariser

Every random draw comes from the step's generator `rng`, in the order the loop has always drawn them, so a run
gives the same weights as before this split (and a resumed run those of a straight one).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from biomedsynth.distributed import average_gradients
from biomedsynth.gan import ada, dcgan, pggan, sg2ada
from biomedsynth.gan.checkpoint import Options, cpu_weights

GP_LAMBDA = 10.0  # WGAN-GP's penalty weight (Gulrajani et al.; PGGAN keeps it)
PL_INTERVAL = 4  # sg2ada: path length every 4th G step on half the batch, weighted 4 (StyleGAN2's lazy regularisation)


class DcganLoss:
    """Radford et al.: the non-saturating GAN loss, no regulariser, G sampled as trained."""
    adversarial, uses_ema, grows = True, False, False

    def __init__(self, opt: Options, device: torch.device):
        self.opt = opt

    def train_step(self, nets: tuple, real: torch.Tensor, y: torch.Tensor | None, extra: tuple, images_seen: int,
                   rng: torch.Generator, use_amp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One D step and one G step (and the EMA's) on this rank's `real` batch. use_amp: under bf16 autocast.
        The lazy penalties fall on steps counted from images_seen, so on the same steps on every rank and on
        resume."""
        G, D, opt_g, opt_d, ema, _ = nets
        opt, device, per_rank = self.opt, real.device, len(real)
        step = images_seen // opt.batch_size
        g_inputs = self.g_inputs(rng)  # every random draw from rng: sg2ada's noise maps and augmentations too
        z = torch.randn(per_rank, opt.latent_dim, device=device, generator=rng)
        G.requires_grad_(False), D.requires_grad_(True)  # each step computes its own network's gradients only
        with torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
            with torch.no_grad():
                fake = G(z, y, *extra, **g_inputs)
            loss_d, norm = self.d_loss(D, real, fake, y, extra, step, rng)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        average_gradients(D, opt.world)
        opt_d.step()
        self.after_d_step()
        G.requires_grad_(True), D.requires_grad_(False)
        with torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
            z = torch.randn(per_rank, opt.latent_dim, device=device, generator=rng)
            fake = G(z, y, *extra, **g_inputs)
            loss_g = self.g_loss(G, D, z, fake, y, extra, step, rng)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        average_gradients(G, opt.world)
        opt_g.step()
        if ema is not None:
            ema.update(G, images_seen, opt.batch_size)
        return loss_d.detach(), loss_g.detach(), norm

    def g_inputs(self, rng: torch.Generator) -> dict:
        return {}

    def d_loss(self, D, real, fake, y, extra: tuple, step: int, rng: torch.Generator):
        return dcgan.d_loss(D, real, fake, y), None

    def after_d_step(self) -> None:
        pass

    def g_loss(self, G, D, z, fake, y, extra: tuple, step: int, rng: torch.Generator):
        return dcgan.g_loss(D, fake, y, *extra)

    def epoch_row(self, grad_norm: float) -> dict:
        return {}

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state) -> None:
        pass


class PgganLoss(DcganLoss):
    """Karras et al. 2018: WGAN-GP (its penalty every gp_interval-th D step, weighted gp_interval) on networks
    that grow through fade-in and stabilisation phases; G sampled as an EMA."""
    uses_ema, grows = True, True

    def d_loss(self, D, real, fake, y, extra: tuple, step: int, rng: torch.Generator):
        lazy = step % self.opt.gp_interval == 0
        return pggan.d_loss(D, real, fake, y, *extra, generator=rng,
                            gp_weight=GP_LAMBDA * self.opt.gp_interval if lazy else 0.0)

    def g_loss(self, G, D, z, fake, y, extra: tuple, step: int, rng: torch.Generator):
        return pggan.g_loss(D, fake, y, *extra)

    def epoch_row(self, grad_norm: float) -> dict:
        return {"gp_grad_norm": grad_norm}


class Sg2adaLoss(DcganLoss):
    """Karras et al. 2020: the non-saturating loss seen through ADA's augmentations, lazy R1 on D and lazy path
    length on G; G draws per-pixel noise; sampled as an EMA. Holds ADA's controller of the augmentation
    probability (the pipe reads its p tensor) and the path-length regulariser's running mean."""
    uses_ema, grows = True, False

    def __init__(self, opt: Options, device: torch.device):
        super().__init__(opt, device)
        self.adaptive = ada.AdaptiveP(opt.ada_target, opt.ada_interval, opt.ada_speed_images, device=device,
                                      sync=opt.world > 1)  # ranks share this model's batches, or train models alone
        self.pipe = ada.for_modality(opt.augment, p=self.adaptive.p)
        self.path_length = sg2ada.PathLengthPenalty().to(device)
        self._real_logits = None

    def g_inputs(self, rng: torch.Generator) -> dict:
        return {"generator": rng}

    def d_loss(self, D, real, fake, y, extra: tuple, step: int, rng: torch.Generator):
        d = sg2ada.d_loss(D, real, fake, y, augment=functools.partial(self.pipe, generator=rng),
                          r1_gamma=self.opt.r1_gamma, do_r1=step % self.opt.r1_interval == 0,
                          r1_interval=self.opt.r1_interval)
        self._real_logits = d.real_logits
        return d.total, d.r1

    def after_d_step(self) -> None:
        self.adaptive.observe(self._real_logits)  # moves p, which the pipe reads, every ada_interval D steps

    def g_loss(self, G, D, z, fake, y, extra: tuple, step: int, rng: torch.Generator):
        loss = sg2ada.g_loss(D, fake, y, augment=functools.partial(self.pipe, generator=rng))
        if self.opt.pl_weight and step % PL_INTERVAL == 0:
            half = slice(0, len(z) // 2)
            loss = loss + self.opt.pl_weight * PL_INTERVAL * self.path_length(
                G, z[half], None if y is None else y[half], generator=rng)
        return loss

    def epoch_row(self, grad_norm: float) -> dict:
        """ADA's p and overfitting heuristic at the epoch's end (r_t: None before its first), the mean R1."""
        r_t = self.adaptive.r_t.item()
        return {"ada_p": round(self.adaptive.p.item(), 4), "ada_rt": None if math.isnan(r_t) else round(r_t, 4),
                "r1": grad_norm}

    def state_dict(self) -> dict:
        return {"ada": self.adaptive.state_dict(), "path_length": cpu_weights(self.path_length)}

    def load_state_dict(self, state: dict) -> None:
        self.adaptive.load_state_dict(state["ada"])
        self.path_length.load_state_dict(state["path_length"])


class DiffusionLoss:
    """A denoising diffusion model (gan/diffusion.py): the v-prediction loss at a uniformly drawn timestep, the label
    dropped with probability label_dropout (the "no label" class, for classifier-free guidance); no discriminator;
    sampled as an EMA. Its loss is logged as loss_g; loss_d is None."""
    adversarial, uses_ema, grows = False, True, False

    def __init__(self, opt: Options, device: torch.device):
        self.opt = opt

    def train_step(self, nets: tuple, real: torch.Tensor, y: torch.Tensor | None, extra: tuple, images_seen: int,
                   rng: torch.Generator, use_amp: bool) -> tuple[torch.Tensor, torch.Tensor, None]:
        G, _, opt_g, _, ema, _ = nets
        device, n = real.device, len(real)
        t = torch.randint(0, G.schedule.config.num_train_timesteps, (n,), device=device, generator=rng)
        noise = torch.randn(real.shape, device=device, generator=rng)
        if y is not None:
            dropped = torch.rand(n, device=device, generator=rng) < self.opt.label_dropout
            y = torch.where(dropped, G.n_classes, y)
        with torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
            v = G.denoise(G.schedule.add_noise(real, noise, t), t, y)
        loss = F.mse_loss(v.float(), G.schedule.get_velocity(real, noise, t))
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(G, self.opt.world)
        opt_g.step()
        ema.update(G, images_seen, self.opt.batch_size)
        loss = loss.detach()
        return torch.zeros_like(loss), loss, None

    def epoch_row(self, grad_norm: float) -> dict:
        return {"loss_d": None}

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state) -> None:
        pass


# the keys of checkpoint.ARCHS
LOSSES = {"dcgan": DcganLoss, "pggan": PgganLoss, "sg2ada": Sg2adaLoss, "diffusion": DiffusionLoss}

"""The diffusion architecture (gan/diffusion.py, gan/losses.DiffusionLoss): its conditioning works, a model that
copies its few training images is flagged by the memorisation test, and its sampler is what the Options say.
Resume after a kill and the stage's layout are tested with the GANs' (test_gan_train.py)."""
import numpy as np
import pytest
import torch

from biomedsynth.evidence import assess, pixel_pca
from biomedsynth.gan import checkpoint as C
from biomedsynth.gan import diffusion
from biomedsynth.gan import train as T

SIDE = 32


def options(setup: str, labels: tuple[str, ...], **kw) -> C.Options:
    """The smallest UNet (8-16 maps, no attention) at 32 px, 8 DDIM steps."""
    base = dict(arch="diffusion", setup=setup, labels=labels, resolution=SIDE, channels=1, latent_dim=SIDE * SIDE,
                batch_size=8, epochs=1, seed=0, lr=2e-3, betas=(0.9, 0.999), ema_half_life=200.0,
                net=dict(base_width=8, width_max=16, attention_below=0, layers_per_block=1),
                label_dropout=0.1 if setup == "cond" else 0.0,
                sampling=dict(sampler="ddim", steps=8, guidance=1.0))
    return C.Options(**{**base, **kw})


def trained(opt: C.Options, images: torch.Tensor, y: torch.Tensor | None, steps: int) -> torch.nn.Module:
    """The EMA denoiser after `steps` of the pipeline's own step (DiffusionLoss.train_step) on batches of `images`."""
    torch.manual_seed(0)
    nets = T.build(opt, ema_half_life=opt.ema_half_life)
    rng = torch.Generator().manual_seed(1)
    for step in range(steps):
        pick = torch.randint(0, len(images), (opt.batch_size,), generator=rng)
        nets[5].train_step(nets, images[pick], None if y is None else y[pick], (), step * opt.batch_size, rng, False)
    return nets[4].model


def samples(G, opt: C.Options, n: int, label: int | None = None, seed: int = 2) -> torch.Tensor:
    z = torch.randn(n, opt.latent_dim, generator=torch.Generator().manual_seed(seed))
    return C.generate(G, opt, z, None if label is None else torch.full((n,), label))


@pytest.mark.e2e  # a minute of training
@pytest.mark.usefixtures("one_thread")
def test_a_conditional_model_draws_each_label_as_trained_and_guidance_sharpens_it():
    """A planted two-class set: bright discs (label 1) and dark ones (label 0) on the same background. The mean of
    the disc's pixels in each label's samples recovers the label far above chance."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    disc = torch.from_numpy(((yy - SIDE / 2) ** 2 + (xx - SIDE / 2) ** 2 < (SIDE / 3) ** 2).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 2, 256))
    images = (-0.6 + disc * torch.where(y == 1, 1.4, 0.4)[:, None, None]
              + 0.05 * torch.from_numpy(rng.standard_normal((256, SIDE, SIDE)).astype(np.float32)))[:, None]
    opt = options("cond", ("dark", "bright"))
    G = trained(opt, images.clamp(-1, 1), y, steps=300)
    inside = images[:, 0][:, disc.bool()].mean(1)
    threshold = (inside[y == 0].mean() + inside[y == 1].mean()) / 2  # half way between the labels' disc brightness
    drawn = {label: samples(G, opt, 16, label)[:, 0][:, disc.bool()].mean(1) for label in (0, 1)}
    accuracy = ((drawn[1] > threshold).float().mean() + (drawn[0] <= threshold).float().mean()) / 2
    assert accuracy >= 0.9, (drawn, threshold)
    guided = C.generator(opt)  # the same weights sampled with guidance 3: the labels further apart
    guided.load_state_dict(G.state_dict())
    guided.guidance = 3.0
    gap = drawn[1].mean() - drawn[0].mean()
    assert samples(guided, opt, 16, 1)[:, 0][:, disc.bool()].mean() - samples(guided, opt, 16, 0)[:, 0][
        :, disc.bool()].mean() > gap * 0.9


def blob_scans(rng: np.random.Generator, patients: int) -> torch.Tensor:
    """One scan per patient in [-1, 1]: three bright blobs at random places."""
    yy, xx = (np.mgrid[:SIDE, :SIDE] + 0.5) / SIDE
    out = []
    for _ in range(patients):
        centres, widths = rng.uniform(0.2, 0.8, (3, 2)), rng.uniform(0.08, 0.2, 3)
        img = sum(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w ** 2)) for (cx, cy), w in zip(centres, widths))
        out.append(np.clip(1.2 * img - 1 + rng.normal(0, 0.02, img.shape), -1, 1))
    return torch.tensor(np.stack(out)[:, None], dtype=torch.float32)


@pytest.mark.e2e  # minutes of training
@pytest.mark.usefixtures("one_thread")
def test_a_diffusion_model_trained_long_on_a_handful_of_scans_copies_them_and_is_flagged():
    """Diffusion models memorise small training sets (Carlini et al. 2023): trained 1,500 steps on 6 patients'
    scans, its samples are near copies (measured: 45-65% of them, as 14% of held-out scans), which the memorisation
    test (evidence.assess, as the synthesize stage runs it) flags against held-out scans of 150 other patients."""
    rng = np.random.default_rng(0)
    train, heldout = blob_scans(rng, 6), blob_scans(rng, 150)
    opt = options("uncond", ("a",), lr=1e-3, net=dict(base_width=16, width_max=32, attention_below=0,
                                                      layers_per_block=1),
                  sampling=dict(sampler="ddim", steps=16, guidance=1.0))
    G = trained(opt, train, None, steps=1500)
    synthetic = samples(G, opt, 40)
    space = pixel_pca((train + 1) / 2, 16, 3, seed=0)
    m = assess(space((train + 1) / 2), np.arange(6), space((heldout + 1) / 2), space((synthetic + 1) / 2),
               heldout_groups=np.arange(150) + 100, seed=0).metrics
    assert m["copying"] and m["near_copy_share"] > 2 * m["near_copy_share_heldout"], m


def test_the_sampler_steps_and_guidance_come_from_the_options_and_a_latent_gives_one_image():
    opt = options("cond", ("a", "b"), sampling=dict(sampler="dpm++", steps=3, guidance=2.0))
    G = C.generator(opt)
    assert (G.steps, G.guidance, type(G.sampler).__name__) == (3, 2.0, "DPMSolverMultistepScheduler")
    assert torch.equal(samples(G, opt, 2, 1), samples(G, opt, 2, 1))  # deterministic given its start
    with pytest.raises(ValueError, match="latent_dim must be 1024"):
        options("cond", ("a", "b"), latent_dim=128)
    with pytest.raises(ValueError, match="multiple of 8"):
        options("cond", ("a", "b"), net=dict(base_width=12, width_max=24, attention_below=0, layers_per_block=1))
    assert diffusion.widths(256, 128, 256) == [128, 256, 256, 256, 256, 256]  # 256 px down to 8 px


def test_a_large_draw_on_the_cpu_gives_each_latent_the_image_it_gives_alone():
    """The sampler runs a CPU batch in chunks of diffusion.CPU_BATCH network inputs (guidance doubles each): every
    image still comes from its own latent and label, whatever the batch around it."""
    opt = options("cond", ("a", "b"), sampling=dict(sampler="dpm++", steps=2, guidance=2.0))
    G = C.generator(opt).eval()
    n = diffusion.CPU_BATCH + 3  # two chunks under guidance: 8 latents, then the other 11
    z = torch.randn(n, opt.latent_dim, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % 2
    together = C.generate(G, opt, z, y)
    alone = torch.cat([C.generate(G, opt, z[i:i + 1], y[i:i + 1]) for i in (0, 8, n - 1)])
    torch.testing.assert_close(together[[0, 8, n - 1]], alone, atol=1e-5, rtol=0)
    swapped = C.generate(G, opt, z[n - 1:], 1 - y[n - 1:])  # the label counts: another label, another image
    assert (swapped - together[n - 1:]).abs().max() > 1e-3

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from biomedsynth.gan import ada, sg2ada

pytestmark = pytest.mark.usefixtures("one_thread")
GEOMETRY_ONLY = dict(translate=0.0, scale=0.0, brightness=0.0, contrast=0.0)


def asymmetric(n=1, side=8, channels=1):
    """Every pixel distinct, so each flip, rotation and shift gives a different image."""
    return torch.arange(n * channels * side * side, dtype=torch.float32).reshape(n, channels, side, side) / 100


def dihedral(x):
    """The 8 images a square can become by flips and quarter turns."""
    turns = [torch.rot90(x, k, (-2, -1)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


def match(out, candidates):
    """Index of the candidate each output image equals exactly (-1: none)."""
    found = torch.full((len(out),), -1)
    for i, c in enumerate(candidates):
        found[(out == c).flatten(1).all(1) & (found < 0)] = i
    return found


@pytest.mark.parametrize("modality", ["xray", "histology"])
def test_p_zero_is_the_identity_exactly(modality):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    for p in (0.0, torch.tensor(0.0)):
        assert torch.equal(ada.for_modality(modality, p=p, padding="wrap")(x), x)
        assert torch.equal(ada.for_modality(modality, p=p)(x), x)


def test_xflip_at_p_one_flips_half_the_images_exactly():
    """As in the paper an applied flip is drawn from {identity, flip}: at p = 1 each image is itself or its exact
    mirror, about half of each (so the identity stays the likeliest outcome for every p < 1)."""
    torch.manual_seed(0)
    x = asymmetric(1, 8).expand(400, 1, 8, 8)
    found = match(ada.AugmentPipe(p=1.0, xflip=1.0, **GEOMETRY_ONLY)(x), [x, x.flip(-1)])
    assert (found >= 0).all()
    assert 0.4 < (found == 1).float().mean() < 0.6
    found = match(ada.AugmentPipe(p=0.3, xflip=1.0, **GEOMETRY_ONLY)(x), [x, x.flip(-1)])
    assert (found >= 0).all() and 0.09 < (found == 1).float().mean() < 0.21  # p / 2


def test_xray_never_flips_vertically_nor_rotates_histology_does_all():
    torch.manual_seed(0)
    x = asymmetric(1, 8).expand(400, 1, 8, 8)
    xray = replace(ada.for_modality("xray", p=1.0), **GEOMETRY_ONLY)
    assert xray.yflip == 0 and xray.rotate90 == 0 and xray.xflip == 1
    found = match(xray(x), dihedral(x))
    assert set(found.tolist()) == {0, 4}  # itself or its left-right mirror, nothing else
    histology = replace(ada.for_modality("histology", p=1.0), **GEOMETRY_ONLY)
    found = match(histology(x), dihedral(x))
    assert (found >= 0).all() and set(found.tolist()) == set(range(8))
    with pytest.raises(ValueError, match="modality"):
        ada.for_modality("mri")


@pytest.mark.parametrize("padding", ["wrap", "reflect"])
def test_integer_translation(padding):
    torch.manual_seed(0)
    side, n = 16, 200
    x = asymmetric(1, side).expand(n, 1, side, side)
    out = ada.AugmentPipe(p=1.0, xflip=0.0, translate=1.0, scale=0.0, brightness=0.0, contrast=0.0,
                          padding=padding)(x)
    limit = side // 8  # up to 1/8 of the side
    pad = F.pad(x[:1], (limit,) * 4, mode="reflect")
    shifts = {}
    for dy in range(-limit, limit + 1):
        for dx in range(-limit, limit + 1):
            if padding == "wrap":
                moved = torch.roll(x[:1], (dy, dx), (-2, -1))
            else:  # content moves by (dy, dx); the uncovered border is mirrored
                moved = pad[..., limit - dy:limit - dy + side, limit - dx:limit - dx + side]
            shifts[dy, dx] = match(out, [moved])[0:n] == 0
    which = torch.stack(list(shifts.values()))
    assert (which.sum(0) == 1).all()  # every output is exactly one shift of the input
    assert (which.sum(1) > 0).sum() > 15  # and many different shifts occur


def test_scale_brightness_contrast_distributions():
    torch.manual_seed(0)
    side, n = 16, 2000
    ramp = ((torch.arange(side) - (side - 1) / 2) / side).expand(n, 1, side, side).contiguous()
    zoom = ada.AugmentPipe(p=1.0, xflip=0.0, translate=0.0, brightness=0.0, contrast=0.0)
    out = zoom(ramp)
    # zooming by s about the centre divides the ramp's slope by s (bilinear is exact on a ramp inside the image)
    log2_s = -torch.log2((out[:, 0, 8, 9] - out[:, 0, 8, 6]) / (ramp[:, 0, 8, 9] - ramp[:, 0, 8, 6]))
    assert abs(log2_s.std().item() - 0.2) < 0.02 and abs(log2_s.mean().item()) < 0.02
    torch.testing.assert_close(zoom(torch.full((4, 3, 8, 8), 0.3)), torch.full((4, 3, 8, 8), 0.3))  # reflection pad

    flat = torch.zeros(n, 1, 2, 2)
    b = ada.AugmentPipe(p=1.0, xflip=0.0, translate=0.0, scale=0.0, contrast=0.0)(flat)[:, 0, 0, 0]
    assert abs(b.std().item() - 0.2) < 0.02 and abs(b.mean().item()) < 0.02
    c = ada.AugmentPipe(p=1.0, xflip=0.0, translate=0.0, scale=0.0, brightness=0.0)(flat + 1)[:, 0, 0, 0]
    assert abs(torch.log2(c).std().item() - 0.5) < 0.04  # lognormal, sigma 0.5 ln 2
    rgb = ada.AugmentPipe(p=1.0, xflip=0.0, translate=0.0, scale=0.0)(torch.zeros(8, 3, 4, 4) + 0.5)
    assert (rgb == rgb[:, :1]).all()  # the same brightness and contrast on every channel
    changed = ada.AugmentPipe(p=0.3, xflip=0.0, translate=0.0, scale=0.0, contrast=0.0)(flat)[:, 0, 0, 0] != 0
    assert 0.25 < changed.float().mean() < 0.35  # each image with probability p


def test_gradients_flow_through_the_augmentations():
    torch.manual_seed(0)
    x = asymmetric(64, 8).requires_grad_(True)
    weights = torch.randn(64, 1, 8, 8)
    out = ada.AugmentPipe(p=1.0, xflip=1.0, **GEOMETRY_ONLY)(x)
    (out * weights).sum().backward()
    flipped = (out != x).flatten(1).any(1)
    expected = torch.where(flipped[:, None, None, None], weights.flip(-1), weights)
    assert flipped.any() and torch.equal(x.grad, expected)  # the flip's gradient is the flipped upstream gradient
    x.grad = None
    out = ada.for_modality("histology", p=0.8)(x)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad.flatten(1).abs().sum(1) > 0).all()
    # R1 takes D's gradient through the augmentation and then differentiates it again (grid_sample included)
    D = sg2ada.Discriminator(32, 3, channel_base=256, channel_max=8)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    r1, _ = sg2ada.r1_penalty(D, real, augment=ada.for_modality("histology", p=1.0))
    r1.backward()
    assert torch.isfinite(r1) and all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None)
    assert D.from_rgb.weight.grad.abs().sum() > 0


def test_augment_refuses_bad_input():
    with pytest.raises(ValueError, match="square"):
        ada.AugmentPipe()(torch.zeros(2, 1, 8, 6))
    with pytest.raises(ValueError, match="padding"):
        ada.AugmentPipe(padding="zeros")
    with pytest.raises(ValueError, match="xflip"):
        ada.AugmentPipe(xflip=2.0)
    with pytest.raises(ValueError, match="augment p"):
        ada.for_modality("xray", p=-0.1)


def test_adaptive_p_grows_when_d_overfits_and_falls_to_zero_when_not():
    batch, interval, speed = 8, 4, 320  # each interval moves p by 8 * 4 / 320 = 0.1
    up = ada.AdaptiveP(target=0.6, interval=interval, speed_images=speed)
    assert math.isnan(up.r_t.item())
    for step in range(1, 13):
        up.observe(torch.rand(batch) + 0.1)  # every real judged real: r_t = 1 > 0.6
        assert up.p.item() == pytest.approx(0.1 * (step // interval), abs=1e-6)
    assert up.r_t.item() == 1.0

    down = ada.AdaptiveP(target=0.6, interval=interval, speed_images=speed, p=0.25)
    half = torch.tensor([1.0, -2.0] * (batch // 2))  # r_t = 0 < 0.6
    expected = [0.25] * 3 + [0.15] * 4 + [0.05] * 4 + [0.0] * 5
    for p in expected:
        down.observe(half)
        assert down.p.item() == pytest.approx(p, abs=1e-6)
    assert down.r_t.item() == 0.0

    top = ada.AdaptiveP(interval=1, speed_images=16, p=0.9)
    top.observe(torch.ones(8))
    assert top.p.item() == 1.0  # clamped
    at_target = ada.AdaptiveP(target=0.5, interval=1, p=0.4)
    at_target.observe(torch.tensor([1.0, 1.0, 1.0, -1.0]))  # r_t = 0.5: sign 0, p stays
    assert at_target.p.item() == pytest.approx(0.4)


def test_adaptive_p_resumes_exactly_and_drives_the_pipe():
    torch.manual_seed(0)
    logits = [torch.randn(8) + 1.0 for _ in range(22)]  # r_t 0.56, 0.75, 0.75, 0.62, 0.62: p moves both ways
    settings = dict(target=0.7, interval=4, speed_images=1000)
    whole = ada.AdaptiveP(p=0.5, **settings)
    for x in logits:
        whole.observe(x)
    first = ada.AdaptiveP(p=0.5, **settings)
    for x in logits[:10]:  # stop half-way through an interval
        first.observe(x)
    resumed = ada.AdaptiveP(**settings)
    resumed.load_state_dict(first.state_dict())
    for x in logits[10:]:
        resumed.observe(x)
    assert torch.equal(resumed.p, whole.p) and torch.equal(resumed.r_t, whole.r_t)
    assert whole.p.item() == pytest.approx(0.5 - 0.032, abs=1e-6)  # down, up, up, down, down by 32 / 1000

    pipe = ada.for_modality("xray")
    pipe.p = whole.p  # the same tensor: later adjustments reach the pipe
    x = torch.rand(16, 1, 8, 8)
    whole.load_state_dict({**whole.state_dict(), "p": torch.tensor(0.0)})
    assert torch.equal(pipe(x), x)
    for _ in range(4):
        whole.observe(torch.ones(16))
    assert pipe.p.item() > 0 and not torch.equal(pipe(x), x)
    with pytest.raises(ValueError, match="target"):
        ada.AdaptiveP(target=1.5)


def test_overfitting_heuristic_rises_and_p_grows_on_a_tiny_training_set():
    """Issue 16: on a tiny training set D's overfitting heuristic rises and p grows. D is twice G's width so it
    memorises the 8 reals within 48 steps (checked on 24 seeds: p > 0 on every one)."""
    torch.manual_seed(0)
    G = sg2ada.Generator(32, 1, 16, mapping_layers=2, channel_base=256, channel_max=16)
    D = sg2ada.Discriminator(32, 1, channel_base=512, channel_max=32)
    opt_g, opt_d = sg2ada.make_optimizers(G, D)
    reals = F.avg_pool2d(torch.randn(8, 1, 40, 40), 9, 1).mul(3).clamp(-1, 1)  # 8 smooth random images
    adaptive, pipe = ada.AdaptiveP(target=0.6, interval=4, speed_images=2_000), ada.for_modality("xray")
    pipe.p = adaptive.p
    r_t = []
    for step in range(48):
        fake = G(torch.randn(8, 16)).detach()
        d = sg2ada.d_loss(D, reals, fake, augment=pipe, r1_gamma=0.025, do_r1=step % 16 == 0)
        opt_d.zero_grad(); d.total.backward(); opt_d.step()
        adaptive.observe(d.real_logits)
        if step % 4 == 3:
            r_t.append(adaptive.r_t.item())
        loss_g = sg2ada.g_loss(D, G(torch.randn(8, 16)), augment=pipe)
        opt_g.zero_grad(); loss_g.backward(); opt_g.step()
    assert max(r_t) > 0.6 and adaptive.p.item() > 0, r_t

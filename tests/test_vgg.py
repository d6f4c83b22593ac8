import math

import numpy as np
import pytest
import torch
import torchvision

from biomedsynth.classify import vgg
from biomedsynth.store import ImageSet, ImageSetWriter


def write_set(path, n: int, side: int, channels: int, seed: int = 0):
    """n images, half per class; class 1 is brighter. Returns (ImageSet, labels)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    with ImageSetWriter(path, (side, side, channels)) as w:
        for i, y in enumerate(labels):
            w.add(rng.integers(0, 150, (side, side, channels), dtype=np.uint8) + np.uint8(80 * y), image_id=f"im{i}")
    return ImageSet(path), labels


@pytest.fixture(autouse=True)
def cpu(monkeypatch):
    monkeypatch.setenv("BIOMEDSYNTH_DEVICE", "cpu")


@pytest.mark.parametrize("channels", [1, 3])
def test_training_steps_give_finite_losses_and_scores(tmp_path, channels):
    images, labels = write_set(tmp_path / "set", 12, 40, channels)  # 40 px stored, resized to 32
    lines = []
    model, history = vgg.train_vgg(images, labels, input_size=32, epochs=1, batch_size=8, val_fraction=0.25,
                                   seed=0, log=lines.append)
    if channels == 1:  # the same seed on the CPU gives the same model
        again, history_again = vgg.train_vgg(images, labels, input_size=32, epochs=1, batch_size=8,
                                             val_fraction=0.25, seed=0, log=lambda _: None)
        assert history_again[0]["val_loss"] == history[0]["val_loss"]
        assert torch.equal(again.features[0].weight, model.features[0].weight)
        del again
    assert model.features[0].in_channels == channels
    assert len(history) == 1 and len(lines) == 1 and "val loss" in lines[0]
    assert all(np.isfinite(history[0][k]) for k in ("train_loss", "val_loss", "val_acc"))
    scores = vgg.predict_scores(model, images, input_size=32, batch_size=5)
    assert scores.shape == (12,) and scores.dtype == np.float64
    assert ((scores >= 0) & (scores <= 1)).all()


def test_best_validation_loss_is_restored_and_checkpointed(tmp_path, monkeypatch):
    images, labels = write_set(tmp_path / "set", 16, 32, 1)
    real_logits, calls, last_state = vgg._logits, [], {}

    def sabotaged(model, *args):  # epoch 2's validation sees confidently wrong logits: epoch 1 must win
        calls.append(1)
        out = real_logits(model, *args)
        if len(calls) == 2:
            last_state.update({k: v.clone() for k, v in model.state_dict().items()})
            out = out + torch.tensor([50.0, -50.0])
        return out

    monkeypatch.setattr(vgg, "_logits", sabotaged)
    model, history = vgg.train_vgg(images, labels, input_size=32, epochs=2, batch_size=8, val_fraction=0.25,
                                   seed=1, checkpoint=tmp_path / "best.pt", log=lambda _: None)
    losses = [r["val_loss"] for r in history]
    assert losses[1] > 10 * losses[0]
    _, val_idx = vgg.split_validation(labels, None, 0.25, seed=1)
    val_loss = torch.nn.functional.cross_entropy(real_logits(model, images, val_idx, 32, 8, history[0]["precision"]),
                                                 torch.from_numpy(labels[val_idx]))
    assert val_loss.item() == pytest.approx(min(losses), rel=1e-5)
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["val_loss"] == losses[0]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["state_dict"].items())
    assert not torch.equal(state["features.0.weight"], last_state["features.0.weight"])  # epoch 2 undone


def test_precision_auto_follows_the_device_and_bf16_trains_on_the_cpu(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert vgg.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert vgg.resolve_precision("auto", cpu) == "bf16" and vgg.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert vgg.resolve_precision("fp32", torch.device("cuda")) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        vgg.resolve_precision("fp16", cpu)
    images, labels = write_set(tmp_path / "set", 12, 32, 1)
    trained = {}
    for precision in ("fp32", "bf16"):
        model, history = vgg.train_vgg(images, labels, input_size=32, epochs=1, batch_size=8, val_fraction=0.25,
                                       seed=0, precision=precision, checkpoint=tmp_path / f"{precision}.pt",
                                       log=lambda _: None)
        assert history[0]["precision"] == precision and np.isfinite(history[0]["val_loss"])
        assert torch.load(tmp_path / f"{precision}.pt", weights_only=True)["precision"] == precision
        assert model.features[0].weight.dtype == torch.float32  # autocast: the weights stay fp32
        trained[precision] = model.features[0].weight
    assert not torch.equal(trained["fp32"], trained["bf16"])  # bf16 arithmetic really ran


def test_validation_split_keeps_groups_apart():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"p{i}" for i in range(40)], rng.integers(1, 6, 40))
    labels = rng.integers(0, 2, len(groups))
    train, val = vgg.split_validation(labels, groups, 0.2, seed=0)
    assert len(train) + len(val) == len(groups) and not set(train) & set(val)
    assert not set(groups[train]) & set(groups[val])
    assert 0.1 < len(val) / len(groups) < 0.3 and set(labels[val]) == {0, 1}
    train, val = vgg.split_validation(labels, None, 0.2, seed=0)  # no ids: plain stratified split
    assert len(val) == math.ceil(0.2 * len(labels))
    assert abs(labels[val].mean() - labels.mean()) < 0.05


def test_train_vgg_refuses_bad_input(tmp_path):
    images, labels = write_set(tmp_path / "set", 8, 32, 1)
    with pytest.raises(ValueError, match="groups: 1 distinct ids"):
        vgg.train_vgg(images, labels, groups=np.array(["synthetic"] * 8), input_size=32)
    with pytest.raises(ValueError, match="at least 32 px"):
        vgg.train_vgg(images, labels, input_size=16)
    with pytest.raises(ValueError, match="labels must be 8 values of 0/1"):
        vgg.train_vgg(images, labels[:7], input_size=32)
    with pytest.raises(ValueError, match="only class 1"):
        vgg.train_vgg(images, np.ones(8, int), input_size=32)


def test_local_weights_are_loaded(tmp_path):
    torch.manual_seed(0)
    rgb = torchvision.models.vgg16(weights=None)  # an ImageNet-shaped model: 1000-class head
    torch.save(rgb.state_dict(), tmp_path / "vgg16.pt")
    want = rgb.state_dict()
    for channels in (3, 1):
        got = vgg.build_vgg(channels, tmp_path / "vgg16.pt").state_dict()
        first = want["features.0.weight"] if channels == 3 else want["features.0.weight"].sum(1, keepdim=True)
        assert torch.equal(got["features.0.weight"], first)
        assert torch.equal(got["features.28.weight"], want["features.28.weight"])
        assert torch.equal(got["classifier.3.weight"], want["classifier.3.weight"])
        assert got["classifier.6.weight"].shape == (2, 4096)
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="not a VGG16 state dict, missing"):
        vgg.build_vgg(3, tmp_path / "partial.pt")


@pytest.mark.parametrize("side", [32, 64, 96])
def test_head_sized_for_the_input_computes_what_torchvision_would(tmp_path, side):
    """Below 224 px the first classifier layer takes the feature map at its own side; loaded weights are
    folded through torchvision's 7 x 7 pool, so outputs match torchvision's model exactly."""
    torch.manual_seed(0)
    ref = torchvision.models.vgg16(weights=None)
    torch.save(ref.state_dict(), tmp_path / "vgg16.pt")
    net = vgg.build_vgg(3, tmp_path / "vgg16.pt", input_size=side).eval()
    assert net.classifier[0].in_features == 512 * (side // 32) ** 2
    ref.classifier[6] = net.classifier[6]  # the two-class head is fresh in both
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref.eval()(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in vgg.build_vgg(1, input_size=32).parameters()) < 35e6
    assert vgg.build_vgg(1, input_size=224).classifier[0].in_features == 512 * 49  # torchvision's at 224 px


@pytest.mark.parametrize("side", [32, 64])
def test_small_head_is_512_wide_on_the_feature_map_and_loads_only_the_convolutions(tmp_path, side):
    """`head: small`: 512 -> 512 -> 2 on the map at its own side (15 M weights at 32 px, against 34 M with
    torchvision's widths); a torchvision weights file gives its convolutions, and the head stays fresh."""
    torch.manual_seed(0)
    ref = torchvision.models.vgg16(weights=None)
    torch.save(ref.state_dict(), tmp_path / "vgg16.pt")
    net = vgg.build_vgg(1, tmp_path / "vgg16.pt", input_size=side, head="small")
    linear = [m for m in net.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(512 * (side // 32) ** 2, 512), (512, 512), (512, 2)]
    assert torch.equal(net.state_dict()["features.28.weight"], ref.state_dict()["features.28.weight"])
    assert net(torch.randn(2, 1, side, side)).shape == (2, 2)
    if side == 32:
        assert 15e6 < sum(p.numel() for p in net.parameters()) < 16e6
    with pytest.raises(ValueError, match="head must be one of"):
        vgg.build_vgg(1, input_size=side, head="wide")

"""VGG16 on whole images (SPEC 5): torchvision's architecture trained from scratch (or from a local weights
file), the model of the epoch with the best validation loss kept, as the study did.

Images stream from the memory-mapped store by index and are resized on the device (bilinear, antialiased)
to `input_size`; pixels map to [-1, 1]. The optimiser is Adam (lr 1e-4 by default): the BatchNorm-free VGG16
starts on a plateau at chance from torchvision's initialisation; on the phantom X-ray sex task at 32 px Adam
left it in the 4th epoch, SGD with momentum 0.9 (lr 1e-2 or 1e-3) had not after 4. No augmentation (the study
had none).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from sklearn.model_selection import StratifiedGroupKFold, train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from biomedsynth.distributed import dist_info, pick_device
from biomedsynth.store import ImageSet, load_weights, save_torch

MIN_INPUT = 32  # VGG16's five 2x poolings need at least 32 px to leave a 1x1 map
HEAD = "classifier.6"  # the last linear layer: re-initialised for two classes when weights are loaded
POOLED = 7  # torchvision pools the last feature map to 7 x 7 (its 224 px side) before the classifier
HEAD_WIDTHS = {"torchvision": 4096, "small": 512}  # classifier widths: the study's (ImageNet) and the usual for small images
MODEL_NAMES = {"torchvision": "VGG16", "small": "VGG16 (512-512 head)"}  # how Table 3 names each
PRECISIONS = ("auto", "fp32", "bf16")


def pooled_side(input_size: int) -> int:
    """The side the last feature map is pooled to before the classifier: its own side (input / 32) up to 7.

    Below 224 px torchvision's adaptive pool only repeats a smaller map up to 7 x 7 (at 32 px one value 49
    times), so its first classifier layer is a linear map of the small map with 49x the weights. Sizing that
    layer to the map gives the same family of functions at 1/4 of the weights at 32 px (34 M instead of 134 M),
    and ~5x the training speed on a CPU."""
    return min(POOLED, input_size // 32)


def _pool_matrix(side: int) -> torch.Tensor:
    """(49, side * side): torchvision's adaptive average pool from side x side to 7 x 7 as a matrix."""
    basis = torch.eye(side * side).reshape(side * side, 1, side, side)
    return nn.functional.adaptive_avg_pool2d(basis, POOLED).reshape(side * side, POOLED * POOLED).T


def _small_head(in_features: int) -> nn.Sequential:
    """torchvision's classifier layout (so `HEAD` is its last layer) at width 512: the VGG16 head usual for
    images far below 224 px (CIFAR-sized), where 4096-wide layers only add weights to fit.

    He initialisation, which keeps the signal's variance through ReLU layers: torchvision's N(0, 0.01) suits
    its 4096-wide layers, but shrinks a 512-wide layer's output ~4x, and left this head at chance for all 6
    epochs of the default's X-ray sex task (validation accuracy 0.509 each epoch; 0.684 after 6 with He)."""
    width = HEAD_WIDTHS["small"]
    head = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(True), nn.Dropout(), nn.Linear(width, width),
                         nn.ReLU(True), nn.Dropout(), nn.Linear(width, 2))
    for layer in head:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return head


def build_vgg(channels: int, weights: Path | None = None, input_size: int = 224, head: str = "torchvision") -> nn.Module:
    """torchvision VGG16 with 2 outputs, a `channels`-input first conv and its first classifier layer sized
    for `input_size` (see pooled_side), on the CPU. `head`: torchvision (4096 -> 4096 -> 2, the study's) or
    small (512 -> 512 -> 2).

    `weights`: a torch.save'd state dict of a torchvision VGG16 (any head size). All layers but the head's
    last are loaded (with the small head, the convolutions only); RGB first-conv weights become one channel
    by summing over RGB (a gray image seen as equal R, G, B gives the same response); the first classifier
    layer is folded through the 7 x 7 pool, so the loaded network computes exactly what torchvision's would
    on the same input.
    """
    if head not in HEAD_WIDTHS:
        raise ValueError(f"head must be one of {', '.join(HEAD_WIDTHS)}, got {head!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    model = torchvision.models.vgg16(weights=None, num_classes=2)
    if channels != 3:
        old = model.features[0]
        model.features[0] = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    side = pooled_side(input_size)
    if side < POOLED:
        first = model.classifier[0]
        model.avgpool = nn.AdaptiveAvgPool2d(side)
        model.classifier[0] = nn.Linear(512 * side * side, first.out_features)
        nn.init.normal_(model.classifier[0].weight, 0, 0.01)  # torchvision's initialisation of its linear layers
        nn.init.zeros_(model.classifier[0].bias)
    if head == "small":
        model.classifier = _small_head(512 * side * side)
    if weights is None:
        return model
    state = load_weights(weights)
    if not isinstance(state, dict):
        raise ValueError(f"{weights}: expected a state dict of a torchvision VGG16, got {type(state).__name__}")
    fresh = HEAD + "." if head == "torchvision" else "classifier."  # the layers left as initialised
    state = {k: v for k, v in state.items() if not k.startswith(fresh)}
    fc = state.get("classifier.0.weight")
    if side < POOLED and fc is not None and fc.shape[1] == 512 * POOLED * POOLED:
        folded = fc.reshape(len(fc), 512, POOLED * POOLED) @ _pool_matrix(side).to(fc.dtype)
        state["classifier.0.weight"] = folded.reshape(len(fc), 512 * side * side)
    first = state.get("features.0.weight")
    if first is not None and first.shape[1] != channels:
        if channels != 1:
            raise ValueError(f"{weights}: first conv has {first.shape[1]} input channels, the images have {channels}")
        state["features.0.weight"] = first.sum(1, keepdim=True)
    expected = {k for k in model.state_dict() if not k.startswith(fresh)}
    if missing := sorted(expected - state.keys()):
        raise ValueError(f"{weights}: not a VGG16 state dict, missing {missing[0]} (+{len(missing) - 1} more)")
    if extra := sorted(state.keys() - expected):
        raise ValueError(f"{weights}: not a VGG16 state dict, unexpected key {extra[0]}")
    model.load_state_dict(state, strict=False)  # only the `fresh` layers keep their initialisation
    return model


def split_validation(labels: np.ndarray, groups: np.ndarray | None, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), sorted, stratified by label.

    With `groups` (patient or slide ids) the split is by id, so no id is on both sides; the validation
    share is then 1/k of the ids' images for k = round(1 / fraction) (StratifiedGroupKFold's first fold).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {fraction}")
    idx = np.arange(len(labels))
    if groups is None:
        train, val = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
        return np.sort(train), np.sort(val)
    groups = np.asarray(groups)
    k = max(2, round(1 / fraction))
    if len(np.unique(groups)) < k:
        raise ValueError(f"groups: {len(np.unique(groups))} distinct ids, a validation fraction of {fraction} "
                         f"splits by id into {k} parts; pass groups=None for sets without patients/slides")
    train, val = next(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(idx, labels, groups))
    return np.sort(train), np.sort(val)


def _device_batch(images: ImageSet, idx: np.ndarray, input_size: int, device: torch.device,
                  fmt: torch.memory_format) -> torch.Tensor:
    """Stored uint8 images at idx -> float (N, C, input_size, input_size) in [-1, 1] on the device."""
    x = torch.from_numpy(np.stack([images[int(i)] for i in idx])).to(device).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    return (x / 127.5 - 1).contiguous(memory_format=fmt)


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 or bf16; `auto`: bf16 where the device computes it natively, a GPU or a CPU with AMX tiles (oneDNN
    runs bf16 convolutions there: VGG16 training at 32 px ~1.6x fp32's speed on the 2-core AMX CPU), else fp32
    (a CPU without AMX emulates bf16 and gains little or nothing)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and torch.cpu._is_amx_tile_supported()) else "fp32"


def _precision(precision: str) -> tuple[bool, torch.memory_format]:
    """(bf16 autocast?, memory format) of a resolved precision: bf16 goes with channels_last, oneDNN's and
    cuDNN's fast layout for it."""
    amp = precision == "bf16"
    return amp, torch.channels_last if amp else torch.contiguous_format


@torch.no_grad()
def _logits(model: nn.Module, images: ImageSet, idx: np.ndarray, input_size: int, batch_size: int,
            precision: str) -> torch.Tensor:
    device = next(model.parameters()).device
    amp, fmt = _precision(precision)
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(idx), batch_size):
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            out.append(model(_device_batch(images, idx[s:s + batch_size], input_size, device, fmt)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 2)


def predict_scores(model: nn.Module, image_set: Path | ImageSet, input_size: int, batch_size: int = 64,
                   precision: str = "auto") -> np.ndarray:
    """Probability of class 1 for every image of the set, in order (float64, shape (N,))."""
    images = image_set if isinstance(image_set, ImageSet) else ImageSet(image_set)
    precision = resolve_precision(precision, next(model.parameters()).device)
    logits = _logits(model, images, np.arange(len(images)), input_size, batch_size, precision)
    return torch.softmax(logits, 1)[:, 1].double().numpy()


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam; fused: one kernel over VGG16's 138M weights instead of a loop per tensor (~10x faster on CPU)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=next(model.parameters()).device.type in ("cpu", "cuda"))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               amp: bool) -> torch.Tensor:
    """One optimiser step on a batch (under bf16 autocast when amp); returns the batch's mean cross-entropy."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train_vgg(train_set: Path | ImageSet, labels: np.ndarray, *, groups: np.ndarray | None = None,
              input_size: int = 224, epochs: int = 20, batch_size: int = 32, lr: float = 1e-4,
              val_fraction: float = 0.1, seed: int = 0, weights: Path | None = None, head: str = "torchvision",
              precision: str = "auto", checkpoint: Path | None = None, log=print) -> tuple[nn.Module, list[dict]]:
    """Train VGG16 on a stored set with 0/1 `labels`; returns (the model of the best-validation-loss epoch,
    one history row per epoch: epoch, train_loss, val_loss, val_acc, seconds, images_per_s, precision).

    Under torchrun each rank trains on its share of every epoch (DistributedDataParallel); rank 0 validates,
    restores the best state and writes the checkpoint, the other ranks return an empty history.
    The input channels are the set's; `head` as in build_vgg; `precision` fp32, bf16 (autocast) or auto
    (resolve_precision). `checkpoint`: the returned state is written there atomically at the end
    ({"state_dict", "epoch", "val_loss", "channels", "input_size", "head", "precision"}).
    """
    images = train_set if isinstance(train_set, ImageSet) else ImageSet(train_set)
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be {len(images)} values of 0/1 (one per image of {images.path}), "
                         f"got shape {labels.shape} with values {np.unique(labels)[:5]}")
    if len(np.unique(labels)) < 2:
        raise ValueError(f"labels of {images.path}: only class {labels[0]} present; VGG16 needs both")
    if input_size < MIN_INPUT:
        raise ValueError(f"input_size must be at least {MIN_INPUT} px for VGG16, got {input_size}")
    train_idx, val_idx = split_validation(labels, groups, val_fraction, seed)

    rank, world = dist_info()
    torch.manual_seed(seed)  # every rank builds the same initial weights
    device = pick_device(rank)
    precision = resolve_precision(precision, device)
    amp, fmt = _precision(precision)
    model = build_vgg(images.shape[2], weights, input_size, head).to(device, memory_format=fmt)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    opt = make_optimizer(model, lr)
    y_all = torch.from_numpy(labels.astype(np.int64))
    y_val = y_all[val_idx]
    history, best, best_loss, best_epoch = [], None, float("inf"), epochs
    for epoch in range(1, epochs + 1):
        model.train()
        order = np.random.default_rng((seed, epoch)).permutation(train_idx)
        # each rank takes every world-th image (padded by wrapping, as torch's DistributedSampler does), so all
        # ranks step equally often; `batch_size` is per process
        mine = np.resize(order, -(-len(order) // world) * world)[rank::world]
        total, t0 = 0.0, time.perf_counter()
        for s in tqdm(range(0, len(mine), batch_size), desc=f"vgg16 epoch {epoch}", unit="batch",
                      leave=False, disable=None if rank == 0 else True):  # None: shown on a terminal only
            idx = np.sort(mine[s:s + batch_size])  # sorted reads are kinder to memory-maps
            x = _device_batch(images, idx, input_size, device, fmt)
            loss = train_step(net, opt, x, y_all[idx].to(device), amp)
            total += loss.item() * len(idx)
        seconds = time.perf_counter() - t0
        if rank > 0:  # rank 0 alone validates, keeps the best state and writes; the others only train
            continue
        logits = _logits(model, images, val_idx, input_size, batch_size, precision)
        val_loss = F.cross_entropy(logits, y_val).item()
        row = {"epoch": epoch, "train_loss": total / len(mine), "val_loss": val_loss,
               "val_acc": (logits.argmax(1) == y_val).float().mean().item(), "seconds": round(seconds, 2),
               "images_per_s": round(len(train_idx) / seconds, 1), "precision": precision}
        history.append(row)
        improved = val_loss < best_loss
        if improved:
            best_loss, best_epoch = val_loss, epoch
            best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        log(f"vgg16 epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f}, val loss {val_loss:.4f}"
            f"{' (best)' if improved else ''}, val acc {row['val_acc']:.3f}, {row['images_per_s']} img/s")
    if best is not None:  # a NaN validation loss never improves: keep the last state then
        model.load_state_dict(best)
    if checkpoint is not None and rank == 0:  # written once: VGG16 is 0.5 GB whatever the input size
        save_torch({"state_dict": best or model.state_dict(), "epoch": best_epoch,
                    "val_loss": best_loss, "channels": images.shape[2], "input_size": input_size,
                    "head": head, "precision": precision}, Path(checkpoint))
    return model, history

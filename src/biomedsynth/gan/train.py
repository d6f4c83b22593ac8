"""Training loop of the train_gan stage: the models of one (architecture, study group, setup).

Setups (SPEC section 3): `uncond` trains one unconditional model per label of the group (the study's
64 sex-age models per architecture; a histology group has one label, so one model); `cond` trains one
model conditional on the label. The stage's output (models/gan/<name>) holds what later stages read:

    options.json              the stage's resolved settings
    <model>/epochs/NNN.pt     the sampling generator of every epoch (what `checkpoint: epoch_N` picks)
    <model>/grids/NNN.png     samples of a fixed latent per epoch
    <model>/log.jsonl         per epoch: losses, PGGAN depth/alpha, SWD, KID and their real floor
                              (deterministic for a seed on CPU)
    <model>/speed.jsonl       per epoch: seconds and images/s; kept out of DVC's hash (.dvcignore), so
                              retraining on another machine or load changes no hash when the weights agree

The GANs learn from the group's `train` side only. Each epoch is scored against its `val` side (real images
of patients or slides the GAN never saw), in KID's case in the feature space of the modality's net (the
feature_net stage), so a generator is not rewarded for copying its training images. Beside the curve, each
model gets the same scores of real training images against the validation images (the floor: what a
perfect generator gets) and of noise and heavily blurred images (what one that learnt nothing gets).

Training happens in a resume state outside the DVC output, .cache/gan/<name>/<hash of the options>/: the
same files plus <model>/checkpoint.pt (G, D, EMA, optimisers, RNG state, images seen, after the last complete
epoch). A run killed at any moment continues from there when the stage runs again, and the output is
written from it, whole, once every model is trained; so the output is the same bytes whether the run was
interrupted or not, DVC's run cache can restore it (it skips persistent outputs), and a change of options
trains under a new hash beside the old run's state instead of deleting it. Under torchrun every rank trains
on its share of each batch list and gradients are averaged across ranks; rank 0 alone writes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from biomedsynth.distributed import average_gradients, dist_info, pick_device
from biomedsynth.gan import dcgan, pggan, score
from biomedsynth.gan.curves import write_curves
from biomedsynth.gan.feature_net import fingerprint
from biomedsynth.store import ImageSet, atomic_write_text, remove_tree, save_torch, write_json

COND_MODEL = "conditional"  # folder of the one model of the `cond` setup
GRID_COLUMNS = 8
# `learnt`: the best SWD lies less than this share of the way from the real floor (0) to the better of the
# noise and blur baselines (1). Half way, not "below the baseline": a collapsed GAN drawing checkerboard
# noise scores within a few percent of noise, on either side depending on the scoring seed (measured).
LEARNT_BELOW = 0.5


@dataclass(frozen=True)
class Options:
    """Everything that decides a model's weights; saved beside the outputs and compared on resume."""
    arch: str                  # dcgan | pggan
    setup: str                 # uncond | cond
    labels: tuple[str, ...]    # the group's labels, sorted (class ids of conditional models)
    resolution: int
    channels: int
    latent_dim: int
    batch_size: int
    epochs: int
    seed: int
    lr: float
    betas: tuple[float, float]
    net: dict = field(default_factory=dict)   # dcgan: base_width; pggan: fmap_base, fmap_max
    ema_decay: float = 0.0                    # pggan only
    images_per_phase: int | None = None       # pggan only; None: epochs spread evenly over the phases
    score_images: int = 128
    swd_directions: int = 512
    feature_net: str = ""   # fingerprint of the KID feature net, set by train_gan (a new net starts over)

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))  # Adam refuses int betas
        if self.arch not in ("dcgan", "pggan"):
            raise ValueError(f"arch must be dcgan or pggan, got {self.arch!r}")
        if self.setup not in ("uncond", "cond"):
            raise ValueError(f"setup must be uncond or cond, got {self.setup!r}")
        (dcgan if self.arch == "dcgan" else pggan).check_shape(self.resolution, self.channels)
        bad = [lb for lb in self.labels if not re.fullmatch(r"[A-Za-z0-9_.+-]+", lb) or lb == COND_MODEL]
        if bad:
            raise ValueError(f"label {bad[0]!r} cannot name a model folder (letters, digits, _ . + - only)")
        if self.arch == "pggan" and self.batch_size % 4:
            raise ValueError(f"PGGAN's minibatch stddev groups 4 images: batch_size must be a multiple of 4, "
                             f"got {self.batch_size}")

    @property
    def n_classes(self) -> int:
        return len(self.labels) if self.setup == "cond" else 0

    @classmethod
    def from_params(cls, p, arch: str, modality: str, setup: str, labels: tuple[str, ...], channels: int) -> Options:
        """The options of one train_gan stage from the params models (params.Params)."""
        data, net = getattr(p.gan, modality), getattr(p.gan, arch)
        if modality == "histology":
            epochs = data.epochs
        else:
            epochs = data.epochs_cond if setup == "cond" else data.epochs_uncond
        arch_opts = (dict(net=dict(base_width=net.base_width)) if arch == "dcgan" else
                     dict(net=dict(fmap_base=net.fmap_base, fmap_max=net.fmap_max), ema_decay=net.ema_decay,
                          images_per_phase=net.images_per_phase))
        return cls(arch=arch, setup=setup, labels=labels, resolution=data.resolution, channels=channels,
                   latent_dim=data.latent_dim, batch_size=data.batch_size, epochs=epochs, seed=p.seed, lr=net.lr,
                   betas=tuple(net.betas), score_images=p.gan.score.images,
                   swd_directions=p.gan.score.swd_directions, **arch_opts)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, d: dict) -> Options:
        return cls(**{**d, "labels": tuple(d["labels"]), "betas": tuple(d["betas"])})


# ---- models ----

def build(opt: Options):
    """(G, D, opt_g, opt_d, ema or None) on the CPU with the options' seed."""
    torch.manual_seed(opt.seed)
    if opt.arch == "dcgan":
        G = dcgan.Generator(opt.resolution, opt.channels, opt.latent_dim, n_classes=opt.n_classes, **opt.net)
        D = dcgan.Discriminator(opt.resolution, opt.channels, n_classes=opt.n_classes, **opt.net)
        return (G, D, *dcgan.make_optimizers(G, D, opt.lr, opt.betas), None)
    G = pggan.Generator(opt.resolution, opt.channels, opt.latent_dim, n_classes=opt.n_classes, **opt.net)
    D = pggan.Discriminator(opt.resolution, opt.channels, n_classes=opt.n_classes, **opt.net)
    return (G, D, *pggan.make_optimizers(G, D, opt.lr, opt.betas), pggan.EMA(G, opt.ema_decay))


def phase_schedule(opt: Options, images_per_epoch: int) -> pggan.PhaseSchedule:
    """PGGAN's growth; by default the epochs spread evenly over the 2 * depths + 1 phases, so every
    depth trains on the same number of images (the study: same batch and epochs at every depth)."""
    max_depth = pggan.check_shape(opt.resolution, opt.channels)
    total = opt.epochs * images_per_epoch
    per_phase = opt.images_per_phase or max(1, total // (2 * max_depth + 1))
    if per_phase * 2 * max_depth > total:
        raise ValueError(f"PGGAN: {opt.epochs} epochs of {images_per_epoch} images end before the growth to "
                         f"{opt.resolution} px ({per_phase} images per phase x {2 * max_depth} phases); "
                         "lower images_per_phase or raise the epochs")
    return pggan.PhaseSchedule(opt.resolution, per_phase)


@torch.no_grad()
def generate(G: torch.nn.Module, opt: Options, z: torch.Tensor, labels: torch.Tensor | None,
             depth: int | None = None, alpha: float = 1.0, batch_size: int = 256) -> torch.Tensor:
    """Float (N, C, resolution, resolution) images in [-1, 1]; a PGGAN below full depth is upsampled."""
    was_training = G.training
    G.eval()  # DCGAN samples with BatchNorm's running statistics, so a sample never changes the model
    out = []
    for s in range(0, len(z), batch_size):
        y = None if labels is None else labels[s:s + batch_size]
        x = G(z[s:s + batch_size], y) if opt.arch == "dcgan" else G(z[s:s + batch_size], y, depth, alpha)
        x = x.float().clamp(-1, 1)
        if x.shape[-1] != opt.resolution:
            x = F.interpolate(x, size=opt.resolution, mode="nearest")
        out.append(x.cpu())
    G.train(was_training)
    return torch.cat(out)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), the store's layout."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def save_grid(images: np.ndarray, path: Path, columns: int = GRID_COLUMNS) -> None:
    """uint8 (N, H, W, C) images tiled row-major into one PNG, 2 px gaps."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, q * (w + 2):q * (w + 2) + w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # replaced, never rewritten: the output may link to it
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(tmp, format="PNG")
    os.replace(tmp, path)


def read_batch(images: ImageSet, idx: np.ndarray, resolution: int) -> torch.Tensor:
    """Stored images at idx (in that order) -> float (N, C, resolution, resolution) in [-1, 1], area-downsampled."""
    x = score.as_model_images(np.stack([images[int(i)] for i in idx]))
    return F.interpolate(x, size=resolution, mode="area") if x.shape[-1] != resolution else x


# ---- checkpoints ----

def _weights(module: torch.nn.Module) -> dict:
    """A module's state as contiguous CPU tensors, each with a storage of its own, in the module's order: the
    saved bytes then depend on the values only, not on the device, memory format or storage sharing of the run
    (torch.save writes all three; a resumed and an uninterrupted run must give the same file)."""
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in module.state_dict().items()}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_file(model_dir: Path, epoch: int) -> Path:
    return model_dir / "epochs" / f"{epoch:03d}.pt"


def read_log(model_dir: Path, name: str = "log.jsonl") -> list[dict]:
    path = model_dir / name
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ---- one model ----

@dataclass
class ModelData:
    """The real images of one model: indices into the group's training set (what it learns from) and
    validation set (what its epochs are scored against), with class ids (conditional models only)."""
    name: str
    indices: np.ndarray
    class_ids: np.ndarray | None
    val_indices: np.ndarray
    val_class_ids: np.ndarray | None


def plan_epochs(opt: Options, data: ModelData, world: int = 1) -> tuple[int, pggan.PhaseSchedule | None]:
    """(steps per epoch, PGGAN's growth schedule or None); ValueError when the model's images do not fill
    one batch per rank or, for PGGAN, its epochs end before the full side."""
    n = len(data.indices)
    if n < opt.batch_size * world:
        raise ValueError(f"model {data.name}: {n} training images, fewer than one batch of {opt.batch_size}"
                         f"{f' x {world} ranks' if world > 1 else ''}; lower the batch size or enlarge the group")
    steps_per_epoch = n // (opt.batch_size * world)
    images_per_epoch = steps_per_epoch * opt.batch_size * world
    return steps_per_epoch, phase_schedule(opt, images_per_epoch) if opt.arch == "pggan" else None


def train_model(opt: Options, data: ModelData, images: ImageSet, model_dir: Path, scorer: Scorer,
                device: torch.device, rank: int = 0, world: int = 1, log=print, tracker=None) -> list[dict]:
    """Train one model to opt.epochs in model_dir (its resume state), resuming from model_dir/checkpoint.pt;
    returns its log rows up to opt.epochs (a state trained further serves fewer epochs: its first ones)."""
    G, D, opt_g, opt_d, ema = build(opt)
    n = len(data.indices)
    steps_per_epoch, schedule = plan_epochs(opt, data, world)
    images_per_epoch = steps_per_epoch * opt.batch_size * world
    start_epoch, images_seen = 0, 0
    ckpt_path = model_dir / "checkpoint.pt"
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        G.load_state_dict(ck["G"]), D.load_state_dict(ck["D"])
        opt_g.load_state_dict(ck["opt_g"]), opt_d.load_state_dict(ck["opt_d"])
        if ema is not None:
            ema.model.load_state_dict(ck["ema"])
        start_epoch, images_seen = ck["epoch"], ck["images_seen"]
        _set_rng_state(ck["rng"])
        log(f"{data.name}: " + (f"resuming after epoch {start_epoch} of {opt.epochs}" if start_epoch < opt.epochs
                                else f"already trained ({start_epoch} epochs, {opt.epochs} asked for)"))
    rows = [r for r in read_log(model_dir) if r["epoch"] <= start_epoch]  # drop a half-written epoch's line
    if start_epoch >= opt.epochs:
        return rows[:opt.epochs]
    use_amp = device.type == "cuda"  # bf16 autocast + channels_last on GPU; fp32 on CPU
    fmt = torch.channels_last if use_amp else torch.contiguous_format
    for m in (G, D) + ((ema.model,) if ema else ()):
        m.to(device, memory_format=fmt)
    for o in (opt_g, opt_d):  # optimiser state loaded on the CPU follows the parameters
        for st in o.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and k != "step":
                    st[k] = v.to(device)
    loss_fns = dcgan if opt.arch == "dcgan" else pggan
    sampler = ema.model if ema is not None else G
    g_fixed = torch.Generator().manual_seed(opt.seed)  # the grid's latent: the same every epoch and run
    grid_labels = _grid_labels(opt, data)
    z_grid = torch.randn(len(grid_labels) if grid_labels is not None else 2 * GRID_COLUMNS, opt.latent_dim,
                         generator=g_fixed)
    y_all = None if data.class_ids is None else torch.from_numpy(data.class_ids)

    for epoch in range(start_epoch + 1, opt.epochs + 1):
        order = np.random.default_rng((opt.seed, epoch)).permutation(n)  # resumable without saved state
        sums, t0 = {"loss_d": 0.0, "loss_g": 0.0}, time.perf_counter()
        for step in tqdm(range(steps_per_epoch), desc=f"{data.name} epoch {epoch}", unit="step", leave=False,
                         disable=None if rank == 0 else True):  # None: shown on a terminal only
            chunk = order[(step * world + rank) * opt.batch_size:(step * world + rank + 1) * opt.batch_size]
            chunk = np.sort(chunk)  # sorted reads are kinder to memory-maps; the set is still random
            real = read_batch(images, data.indices[chunk], opt.resolution).to(device, memory_format=fmt)
            y = None if y_all is None else y_all[chunk].to(device)
            extra = ()
            if schedule is not None:
                depth, alpha = schedule(images_seen)
                real, extra = pggan.fade_reals(real, depth, alpha), (depth, alpha)
            z = torch.randn(len(real), opt.latent_dim, device=device)
            with torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                with torch.no_grad():
                    fake = G(z, y, *extra)
                loss_d = loss_fns.d_loss(D, real, fake, y, *extra)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            average_gradients(D, world)
            opt_d.step()
            with torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                loss_g = loss_fns.g_loss(D, G(torch.randn_like(z), y, *extra), y, *extra)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            average_gradients(G, world)
            opt_g.step()
            if ema is not None:
                ema.update(G)
            images_seen += len(real) * world
            sums["loss_d"] += loss_d.item()
            sums["loss_g"] += loss_g.item()
        seconds = time.perf_counter() - t0
        depth, alpha = schedule(images_seen) if schedule is not None else (None, 1.0)
        if rank == 0:
            speed = {"epoch": epoch, "seconds": round(seconds, 2), "images_per_s": round(images_per_epoch / seconds, 1)}
            # every file here is replaced, never written in place: the stage output may hard-link to it
            atomic_write_text(model_dir / "speed.jsonl", _jsonl(read_log(model_dir, "speed.jsonl") + [speed]))
            row = {"epoch": epoch, "images_seen": images_seen, **{k: v / steps_per_epoch for k, v in sums.items()}}
            if depth is not None:
                row.update(depth=depth, side=4 << depth, alpha=round(alpha, 4))
            save_torch({"state_dict": _weights(sampler), "depth": depth, "alpha": alpha}, epoch_file(model_dir, epoch))
            y_grid = None if grid_labels is None else torch.from_numpy(grid_labels).to(device)
            save_grid(to_uint8(generate(sampler, opt, z_grid.to(device), y_grid, depth, alpha)),
                      model_dir / "grids" / f"{epoch:03d}.png")
            row.update(scorer.score(sampler, opt, data, depth, alpha, epoch))
            rows.append(row)
            atomic_write_text(model_dir / "log.jsonl", _jsonl(rows))
            save_torch({"G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(),
                          "opt_d": opt_d.state_dict(), "ema": ema.model.state_dict() if ema else None,
                          "epoch": epoch, "images_seen": images_seen, "rng": _rng_state()}, ckpt_path)
            log(f"{data.name} epoch {epoch}/{opt.epochs}: loss D {row['loss_d']:.3f} G {row['loss_g']:.3f}, "
                f"SWD {row['swd']:.4f} (real {row['swd_floor']:.4f}), KID {row['kid']:.4f} "
                f"(real {row['kid_floor']:.4f}), {speed['images_per_s']} img/s"
                + (f", {row['side']} px alpha {row['alpha']:.2f}" if depth is not None else ""))
            if tracker is not None:
                tracker.log_metrics({f"{data.name}.{k}": v for k, v in {**row, **speed}.items()
                                     if k != "epoch" and isinstance(v, (int, float))}, step=epoch)
        if world > 1:
            dist.barrier()  # ranks leave an epoch together, so none reads a checkpoint being written
    return rows


def _grid_labels(opt: Options, data: ModelData) -> np.ndarray | None:
    """Class ids for the grid: one row of GRID_COLUMNS samples per label (conditional models only)."""
    if data.class_ids is None:
        return None
    return np.repeat(np.arange(len(opt.labels)), GRID_COLUMNS)


# ---- scoring ----

def _cycled(x: torch.Tensor, n: int) -> torch.Tensor:
    """x repeated end to end along its first axis, cut to n."""
    return x.repeat(-(-n // len(x)), *[1] * (x.ndim - 1))[:n]


@dataclass
class Reference:
    """What one model's epochs are compared with, and the scores that say what good and bad are (`scores`:
    the floor, real training images; noise with their colours; the same images blurred)."""
    real: torch.Tensor                # score_images validation images: the distinct ones, repeated up to that count
    feats: np.ndarray                 # features of the distinct ones (KID's unbiased estimate needs no repeats)
    class_ids: torch.Tensor | None    # conditional models: the class of each of `real`
    scores: dict


class Scorer:
    """Per-epoch SWD and KID of a generator against its model's validation images.

    Each epoch draws opt.score_images images from the generator. SWD compares them with as many validation
    images: the model's (at most that many), repeated when it has fewer, each repeat with new random
    neighbourhoods, so the generated side is never cut to the few validation images a label may have (with
    25 generated images per epoch the chosen epoch moved with the scoring seed, with 64 or more it did not:
    measured). KID compares features of distinct images only. `seed` fixes everything random in a score
    (the subsets, SWD's neighbourhoods and directions, KID's subsets, the generator's latents), so epochs
    differ by their generator only."""

    def __init__(self, train: ImageSet, val: ImageSet, feature_net: score.FeatureNet, device: torch.device,
                 seed: int):
        self.train, self.val, self.net, self.device, self.seed = train, val, feature_net, device, seed
        self._refs: dict[str, Reference] = {}

    def _compare(self, opt: Options, ref: Reference, images: torch.Tensor) -> dict:
        """SWD and KID of distinct images (at most score_images, repeated up to it for SWD) against the reference."""
        # on the GPU when training there: SWD sorts millions of projections at the paper's image count
        _, swd = score.sliced_wasserstein(ref.real, _cycled(images, len(ref.real)),
                                          dir_repeats=max(1, opt.swd_directions // 128), seed=self.seed)
        kid_mean, _ = score.kid(ref.feats, score.extract_features(self.net, images), n_subsets=50, seed=self.seed)
        return {"swd": round(swd, 6), "kid": round(kid_mean, 6)}

    def _distinct(self, images: ImageSet, indices: np.ndarray, opt: Options, rng: np.random.Generator):
        """At most score_images of `indices`, drawn at random and sorted, and their images."""
        pick = np.sort(rng.permutation(len(indices))[:opt.score_images])
        return pick, read_batch(images, indices[pick], opt.resolution).to(self.device)

    def reference(self, opt: Options, data: ModelData) -> Reference:
        """The model's validation images and its floor, noise and blur scores (computed once per model)."""
        if data.name not in self._refs:
            rng = np.random.default_rng((self.seed, len(data.val_indices)))
            pick, val = self._distinct(self.val, data.val_indices, opt, rng)
            y = None if data.val_class_ids is None else _cycled(torch.from_numpy(data.val_class_ids[pick]),
                                                                 opt.score_images)
            ref = Reference(_cycled(val, opt.score_images), score.extract_features(self.net, val), y,
                            {"images": opt.score_images, "val_images": len(pick)})
            _, train = self._distinct(self.train, data.indices, opt, rng)
            noise = score.noise_images(_cycled(train, opt.score_images), self.seed)
            for name, imitation in (("floor", train), ("noise", noise), ("blur", score.blurred(train))):
                ref.scores.update({f"{k}_{name}": v for k, v in self._compare(opt, ref, imitation).items()})
            self._refs[data.name] = ref
        return self._refs[data.name]

    def score(self, G, opt: Options, data: ModelData, depth, alpha, epoch: int) -> dict:
        """The epoch's SWD and KID, with the model's floor beside them."""
        ref = self.reference(opt, data)
        g = torch.Generator().manual_seed(self.seed + 1)  # the same latents every epoch: epochs differ by G only
        z = torch.randn(opt.score_images, opt.latent_dim, generator=g).to(self.device)
        y = None if ref.class_ids is None else ref.class_ids.to(self.device)
        fake = generate(G, opt, z, y, depth, alpha).to(self.device)
        return {**self._compare(opt, ref, fake), "swd_floor": ref.scores["swd_floor"],
                "kid_floor": ref.scores["kid_floor"]}


# ---- the stage ----

def model_data(meta, val_meta, opt: Options) -> list[ModelData]:
    """The models of a setup: one per label (uncond) or one over all labels (cond), each with the training
    and validation images of its label(s)."""
    labels, val_labels = meta["label"].to_numpy(), val_meta["label"].to_numpy()
    if opt.setup == "cond":
        val = np.flatnonzero(np.isin(val_labels, opt.labels))
        ids = lambda lbs: np.searchsorted(np.asarray(opt.labels), lbs)  # noqa: E731
        models = [ModelData(COND_MODEL, np.arange(len(meta)), ids(labels), val, ids(val_labels[val]))]
    else:
        models = [ModelData(lb, np.flatnonzero(labels == lb), None, np.flatnonzero(val_labels == lb), None)
                  for lb in opt.labels]
    for m in models:
        if len(m.val_indices) == 0:
            raise ValueError(f"model {m.name}: no validation images to score it against; raise the group's "
                             "studygroups val_fraction or widen its age bins")
    return models


def run_key(opt: Options, world: int = 1) -> str:
    """The name of a run's resume state: a hash of what shapes the weights, the options and the number of
    processes (each takes a batch per step). `epochs` is left out where a longer run only adds epochs to a
    shorter one: always for DCGAN, for PGGAN with a fixed images_per_phase (else the growth phases stretch
    with the epochs). Raising the epochs then continues the trained models, and lowering them takes the
    first epochs of the longer run without training."""
    key = {**opt.to_json(), "world": world}
    if opt.arch == "dcgan" or opt.images_per_phase is not None:
        del key["epochs"]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows (the resume state's files are replaced, never rewritten, so
    nothing writes through the link, neither into DVC's cache should DVC link the output there), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_output(state: Path, out: Path, opt: Options, results: dict[str, list[dict]]) -> None:
    """The stage output from a trained resume state: options.json and, per model, epochs 1..opt.epochs of the
    log, generators, grids and speed. Built beside `out` and renamed into place, so `out` is always one whole run."""
    tmp, old = out.with_name(f".{out.name}.tmp-new"), out.with_name(f".{out.name}.tmp-old")
    for leftover in (tmp, old):  # of a run killed while writing
        remove_tree(leftover)
    write_json(tmp / "options.json", opt.to_json())
    for name, rows in results.items():
        atomic_write_text(tmp / name / "log.jsonl", _jsonl(rows))
        speed = {r["epoch"]: r for r in read_log(state / name, "speed.jsonl")}  # a killed epoch's line: its rerun's
        atomic_write_text(tmp / name / "speed.jsonl", _jsonl(speed[r["epoch"]] for r in rows if r["epoch"] in speed))
        for r in rows:
            for path in (epoch_file(Path(name), r["epoch"]), Path(name) / "grids" / f"{r['epoch']:03d}.png"):
                _link_or_copy(state / path, tmp / path)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    remove_tree(old)


def _prune(stage_states: Path, kept: Path) -> None:
    """Remove the stage's resume states but `kept` and the most recently used other one, so a setting tried
    and reverted (or a run given up for another) can still continue, and the folder stays at two runs."""
    others = sorted((d for d in stage_states.iterdir() if d.is_dir() and d != kept),
                    key=lambda d: (d / "options.json").stat().st_mtime if (d / "options.json").is_file() else 0)
    for d in others[:-1]:
        shutil.rmtree(d)


def train_gan(opt: Options, train_set: Path, val_set: Path, feature_net: Path, out: Path, metrics_path: Path,
              scores_path: Path, losses_path: Path, stage_states: Path, trend_tail: float = 0.2,
              stage: str = "train_gan", tracking_params: dict | None = None, log=print) -> dict:
    """Train every model of one stage on `train_set`, scoring its epochs against `val_set` with the
    modality's KID feature net, in its resume state under `stage_states` (one folder per run_key); then write
    the stage output `out`, the per-stage metrics and the mean score and loss curves. Everything that can
    refuse the run is checked before anything is written."""
    from biomedsynth import tracking

    rank, world = dist_info()
    device = pick_device(rank)
    images, val = ImageSet(train_set), ImageSet(val_set)
    if images.shape[2] != opt.channels:
        raise ValueError(f"{train_set}: images have {images.shape[2]} channel(s), the GAN expects {opt.channels}")
    net = score.load_feature_net(feature_net, device)
    if net.info.get("resolution") != opt.resolution:
        raise ValueError(f"{feature_net} was trained on {net.info.get('resolution')} px images, the GAN draws "
                         f"{opt.resolution} px; run its feature_net stage again")
    opt = replace(opt, feature_net=fingerprint(feature_net))
    models = model_data(images.meta, val.meta, opt)
    for data in models:
        plan_epochs(opt, data, world)
    state = stage_states / run_key(opt, world)
    if rank == 0:
        write_json(state / "options.json", opt.to_json())  # its time says which state was used last (_prune)
    if world > 1:
        dist.barrier()
    scorer = Scorer(images, val, net, device, opt.seed)
    results = {}
    with tracking.run(stage, tracking_params or opt.to_json(), enabled=rank == 0) as tracker:
        for data in models:
            results[data.name] = train_model(opt, data, images, state / data.name, scorer, device, rank, world,
                                             log, tracker)
        if rank == 0:
            write_output(state, out, opt, results)
            _prune(stage_states, state)
            summary = summarise(results, {d.name: scorer.reference(opt, d).scores for d in models}, opt, trend_tail)
            write_json(metrics_path, summary)
            write_curves(results, scores_path, losses_path)
            _warn(summary, log)
            tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            tracker.log_artifact(scores_path)
            for name, rows in results.items():
                tracker.log_artifact(out / name / "grids" / f"{opt.epochs:03d}.png")
                # the model: the generator of the epoch `synthesize.checkpoint: best` samples from
                tracker.log_artifact(out / name / "epochs" / f"{best_epoch(rows):03d}.pt", f"model/{name}")
    if world > 1:
        dist.barrier()
    return summary if rank == 0 else {}


def best_epoch(rows: list[dict]) -> int:
    """The epoch with the lowest SWD (the earliest on a tie) among those at the full side: a PGGAN still
    growing draws upsampled blocks, whose smoothness SWD can score better than detailed full-size images."""
    top = max(r.get("side", 0) for r in rows)
    grown = [r for r in rows if r.get("side", 0) == top and r.get("alpha", 1.0) == 1.0]
    return min(grown or rows, key=lambda r: (r["swd"], r["epoch"]))["epoch"]


def trend(rows: list[dict], tail: float) -> dict:
    """Whether a model was still improving when training stopped: its best epoch lies in the last `tail`
    share of the epochs (at least the last 2) and its SWD still falls there (least-squares slope per epoch)."""
    last = rows[-max(2, math.ceil(tail * len(rows))):]
    slope = float(np.polyfit([r["epoch"] for r in last], [r["swd"] for r in last], 1)[0]) if len(last) > 1 else 0.0
    return {"swd_tail_slope": round(slope, 6),
            "still_improving": bool(best_epoch(rows) >= last[0]["epoch"] and slope < 0)}


def model_summary(rows: list[dict], ref: dict, tail: float) -> dict:
    """One model's best and last scores, its real floor, the baseline (the better of two trivial imitations:
    noise with the real colours, blurred real images), its trend, `swd_relative` (the best SWD on a scale
    where real images score 0 and the baseline 1) and `learnt` (swd_relative below LEARNT_BELOW)."""
    best = next(r for r in rows if r["epoch"] == best_epoch(rows))
    baseline = min(ref["swd_noise"], ref["swd_blur"])
    relative = (best["swd"] - ref["swd_floor"]) / max(baseline - ref["swd_floor"], 1e-12)
    return {"best_epoch": best["epoch"], "swd_best": best["swd"], "kid_best": best["kid"], "swd_last": rows[-1]["swd"],
            "kid_last": rows[-1]["kid"], **ref, "swd_baseline": baseline,
            "swd_best_over_floor": round(best["swd"] / max(ref["swd_floor"], 1e-12), 3),
            "swd_relative": round(relative, 3), **trend(rows, tail), "learnt": bool(relative < LEARNT_BELOW)}


def summarise(results: dict[str, list[dict]], refs: dict[str, dict], opt: Options, tail: float) -> dict:
    """Stage metrics: per model (`per_model`) its model_summary; over the models, the mean of the scores,
    floors and baselines, `learnt` (every model learnt) and `still_improving` (any model still was)."""
    per_model = {name: model_summary(rows, refs[name], tail) for name, rows in results.items()}
    mean = lambda k: round(float(np.mean([m[k] for m in per_model.values()])), 6)  # noqa: E731
    count = lambda k: sum(m[k] for m in per_model.values())  # noqa: E731
    return {"models": len(results), "epochs": opt.epochs, "score_images": opt.score_images,
            "val_images": min(m["val_images"] for m in per_model.values()),
            **{k: mean(k) for k in ("swd_best", "kid_best", "swd_last", "kid_last", "swd_floor", "kid_floor",
                                    "swd_baseline", "swd_relative")},
            "best_epoch_mean": round(float(np.mean([m["best_epoch"] for m in per_model.values()])), 2),
            "models_learnt": count("learnt"), "learnt": count("learnt") == len(per_model),
            "models_still_improving": count("still_improving"), "still_improving": count("still_improving") > 0,
            "per_model": per_model}


def _warn(summary: dict, log) -> None:
    """One line per model that learnt nothing or was still improving at its last epoch."""
    for name, m in summary["per_model"].items():
        if not m["learnt"]:
            log(f"WARNING {name} learnt nothing: its best SWD {m['swd_best']:.4f} (epoch {m['best_epoch']}) is not "
                f"nearer real images' {m['swd_floor']:.4f} than noise or blurred images' {m['swd_baseline']:.4f}")
        if m["still_improving"]:
            log(f"WARNING {name} was still improving at its last epoch (best epoch {m['best_epoch']} of "
                f"{summary['epochs']}, SWD falling {-m['swd_tail_slope']:.4f} per epoch); train it longer")


# ---- sampling for the next stage ----

def resolve_checkpoint(model_dir: Path, choice: str) -> int:
    """`best` (lowest SWD), `last` or `epoch_N` -> an epoch number that has a saved generator."""
    rows = read_log(model_dir)
    if not rows:
        raise FileNotFoundError(f"{model_dir}: no trained epochs; run train_gan first")
    if choice == "best":
        epoch = best_epoch(rows)
    elif choice == "last":
        epoch = rows[-1]["epoch"]
    elif m := re.fullmatch(r"epoch_(\d+)", choice):
        epoch = int(m.group(1))
    else:
        raise ValueError(f"checkpoint = {choice!r}: allowed best, last, epoch_N")
    if not epoch_file(model_dir, epoch).is_file():
        raise ValueError(f"checkpoint = {choice!r}: {model_dir} has epochs 1..{rows[-1]['epoch']}")
    return epoch


class Synthesizer:
    """The trained generators of one stage as one sampler: sample(label, n, rng) -> uint8 (n, H, W, C)."""

    def __init__(self, model_root: Path, checkpoint: str, device: torch.device | None = None):
        """`checkpoint`: best, last, epoch_N (per model, see resolve_checkpoint) or an int, one epoch for all."""
        self.opt = Options.from_json(json.loads((model_root / "options.json").read_text()))
        self.device = device or pick_device()
        self.epochs: dict[str, int] = {}
        self._models: dict[str, tuple] = {}
        names = [COND_MODEL] if self.opt.setup == "cond" else list(self.opt.labels)
        for name in names:
            epoch = resolve_checkpoint(model_root / name, f"epoch_{checkpoint}" if isinstance(checkpoint, int)
                                       else checkpoint)
            snap = torch.load(epoch_file(model_root / name, epoch), map_location="cpu", weights_only=False)
            G = build(self.opt)[0]
            G.load_state_dict(snap["state_dict"])
            self._models[name] = (G.to(self.device).eval(), snap["depth"], snap["alpha"])
            self.epochs[name] = epoch

    def sample(self, label: str, n: int, rng: np.random.Generator) -> np.ndarray:
        if label not in self.opt.labels:
            raise ValueError(f"label {label!r} was not trained (models know {', '.join(self.opt.labels)})")
        G, depth, alpha = self._models[COND_MODEL if self.opt.setup == "cond" else label]
        z = torch.from_numpy(rng.standard_normal((n, self.opt.latent_dim), dtype=np.float32)).to(self.device)
        y = torch.full((n,), self.opt.labels.index(label), device=self.device) if self.opt.setup == "cond" else None
        return to_uint8(generate(G, self.opt, z, y, depth, alpha))

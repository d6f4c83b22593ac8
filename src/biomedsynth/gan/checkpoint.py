"""The read side of a GAN run: what a trained stage's output (models/gan/<name>, see gan/train.py) holds and how
it is sampled. The options a run was trained under, the architecture table, building a generator, each epoch's
generator file and log, the choice of epoch, and `Synthesizer`, which synthesize, export, generate and the utility
probe draw from; none of them imports the training loop.
"""
from __future__ import annotations

import importlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biomedsynth.distributed import pick_device
from biomedsynth.gan import ARCH_NAMES, ada
from biomedsynth.store import load_weights

COND_MODEL = "conditional"  # folder of the one model of the `cond` setup
# options only the diffusion model sets, left out of the others' options.json (so of their run key and scores'
# record): a GAN trained before they existed keeps its key, its scores and its output's bytes
UNSET = {"label_dropout": 0.0, "sampling": {}}
ARCHS = {name: importlib.import_module(f"biomedsynth.gan.{name}") for name in ARCH_NAMES}  # networks by name


@dataclass(frozen=True)
class Options:
    """Everything that decides a model's weights; saved beside the outputs and compared on resume."""
    arch: str                  # dcgan | pggan | sg2ada | diffusion
    setup: str                 # uncond | cond
    labels: tuple[str, ...]    # the group's labels, sorted (class ids of conditional models)
    resolution: int
    channels: int
    latent_dim: int            # diffusion: the noise image it starts from, channels * resolution^2
    batch_size: int            # images per step over all `world` processes
    epochs: int                # PGGAN with epochs_per `depth`: per depth
    seed: int
    lr: float
    betas: tuple[float, float]
    net: dict = field(default_factory=dict)   # dcgan: base_width; pggan: fmap_base, fmap_max;
                                              # sg2ada: channel_base, channel_max, mapping_layers;
                                              # diffusion: base_width, width_max, attention_below, layers_per_block
    world: int = 1                            # processes sharing each step's batch (seeds and stddev groups)
    ema_half_life: float | None = None        # pggan, sg2ada: images; None: ema.half_life_for the shortest phase
    ema_rampup: float | None = None           # pggan, sg2ada: half-life at most this share of the images seen
    epochs_per: str = "total"                 # pggan: `depth` (each depth trains `epochs`) or `total`
    images_per_phase: int | None = None       # pggan: fixed phases (then `epochs` is the total)
    gp_interval: int = 1                      # pggan: the penalty every k-th D step, weighted k
    r1_gamma: float | None = None             # sg2ada: R1's weight gamma (required; r1_gamma_heuristic)
    r1_interval: int = 16                     # sg2ada: R1 every k-th D step, weighted k (the paper: 16)
    pl_weight: float = 2.0                    # sg2ada: path length's weight (0: off; the paper: 2)
    augment: str = ""                         # sg2ada: the modality whose augmentations ADA applies (ada.MODALITIES)
    ada_target: float = 0.6                   # sg2ada: the overfitting heuristic r_t that ADA steers p to hold
    ada_interval: int = 4                     # sg2ada: D steps between adjustments of p
    ada_speed_images: int = 500_000           # sg2ada: images over which p can move from 0 to 1
    label_dropout: float = 0.0                # diffusion (cond): share of steps trained without the label (guidance)
    sampling: dict = field(default_factory=dict)  # diffusion: sampler, steps, guidance (shape samples, not weights)
    snapshot_every: int = 1                   # keep the sampling generator of every k-th selectable epoch
    snapshot_dtype: str = "float32"           # float32 | bfloat16
    score_images: int = 128
    swd_directions: int = 512
    feature_net: str = ""   # fingerprint of the KID feature net, set by train_gan (a new net rescores the run)

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))  # Adam refuses int betas
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.setup not in ("uncond", "cond"):
            raise ValueError(f"setup must be uncond or cond, got {self.setup!r}")
        if self.epochs_per not in ("depth", "total"):
            raise ValueError(f"epochs_per must be depth or total, got {self.epochs_per!r}")
        if self.snapshot_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"snapshot dtype must be float32 or bfloat16, got {self.snapshot_dtype!r}")
        ARCHS[self.arch].check_shape(self.resolution, self.channels)
        bad = [lb for lb in self.labels if not re.fullmatch(r"[A-Za-z0-9_.+-]+", lb) or lb == COND_MODEL]
        if bad:
            raise ValueError(f"label {bad[0]!r} cannot name a model folder (letters, digits, _ . + - only)")
        if self.batch_size % self.world:
            raise ValueError(f"batch_size {self.batch_size} does not split over {self.world} processes")
        if self.arch in ("pggan", "sg2ada") and self.batch_size // self.world % 4:
            raise ValueError(f"{self.arch}'s minibatch stddev groups 4 images: each of {self.world} process(es) needs "
                             f"a multiple of 4, got batch_size {self.batch_size}")
        if self.arch == "sg2ada":
            self._check_sg2ada()
        if self.arch == "diffusion":
            self._check_diffusion()

    def _check_sg2ada(self) -> None:
        """ValueError, one line, for sg2ada settings its networks, regularisers or ADA would refuse or misuse."""
        if set(self.net) != {"channel_base", "channel_max", "mapping_layers"}:
            raise ValueError(f"sg2ada's net needs channel_base, channel_max and mapping_layers, got {sorted(self.net)}")
        ARCHS["sg2ada"].widths(self.resolution, self.net["channel_base"], self.net["channel_max"])
        if self.net["mapping_layers"] < 1:
            raise ValueError(f"sg2ada's mapping_layers must be >= 1, got {self.net['mapping_layers']}")
        if self.augment not in ada.MODALITIES:
            raise ValueError(f"sg2ada's augment must be one of {', '.join(ada.MODALITIES)} (the modality whose "
                             f"augmentations ADA applies), got {self.augment!r}")
        if self.r1_gamma is None or self.r1_gamma < 0:
            raise ValueError(f"sg2ada's r1_gamma must be >= 0, got {self.r1_gamma} (StyleGAN2-ADA's heuristic here: "
                             f"{r1_gamma_heuristic(self.resolution, self.batch_size):g})")
        if self.r1_interval < 1 or self.pl_weight < 0:
            raise ValueError(f"sg2ada's r1_interval must be >= 1 and pl_weight >= 0, got {self.r1_interval} and "
                             f"{self.pl_weight}")
        ada.AdaptiveP(self.ada_target, self.ada_interval, self.ada_speed_images)  # refuses a bad target or speed

    def _check_diffusion(self) -> None:
        """ValueError, one line, for diffusion settings its UNet or sampler would refuse."""
        if set(self.net) != {"base_width", "width_max", "attention_below", "layers_per_block"}:
            raise ValueError(f"diffusion's net needs base_width, width_max, attention_below and layers_per_block, "
                             f"got {sorted(self.net)}")
        ARCHS["diffusion"].widths(self.resolution, self.net["base_width"], self.net["width_max"])
        if set(self.sampling) != {"sampler", "steps", "guidance"}:
            raise ValueError(f"diffusion's sampling needs sampler, steps and guidance, got {sorted(self.sampling)}")
        noise_image = ARCHS["diffusion"].latent_dim(self.resolution, self.channels)
        if self.latent_dim != noise_image:
            raise ValueError(f"a diffusion model's latent is its noise image: latent_dim must be {noise_image}, got "
                             f"{self.latent_dim}")
        if self.sampling["sampler"] not in ARCHS["diffusion"].SAMPLERS:
            raise ValueError(f"diffusion's sampler must be {' or '.join(ARCHS['diffusion'].SAMPLERS)}, got "
                             f"{self.sampling['sampler']!r}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"diffusion's label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.n_classes and self.sampling["guidance"] != 1 and not self.label_dropout:
            raise ValueError("diffusion's guidance needs label_dropout > 0 (the label-free model it extrapolates from)")

    @property
    def n_classes(self) -> int:
        return len(self.labels) if self.setup == "cond" else 0

    @property
    def total_epochs(self) -> int:
        """Epochs of the whole run: with epochs_per `depth`, each of PGGAN's depths trains `epochs`."""
        if self.arch == "pggan" and self.epochs_per == "depth" and self.images_per_phase is None:
            return self.epochs * (ARCHS["pggan"].check_shape(self.resolution, self.channels) + 1)
        return self.epochs

    @classmethod
    def from_params(cls, p, arch: str, modality: str, setup: str, labels: tuple[str, ...], channels: int,
                    world: int = 1) -> Options:
        """The options of one train_gan stage from the params models (params.Params)."""
        data, net = getattr(p.gan, modality), getattr(p.gan, arch)
        if modality == "histology":
            epochs = data.epochs
        else:
            epochs = data.epochs_cond if setup == "cond" else data.epochs_uncond
        if arch == "dcgan":
            arch_opts = dict(net=dict(base_width=net.base_width))
        elif arch == "pggan":
            arch_opts = dict(net=dict(fmap_base=net.fmap_base, fmap_max=net.fmap_max), ema_half_life=net.ema_half_life,
                             ema_rampup=net.ema_rampup, epochs_per=net.epochs_per,
                             images_per_phase=net.images_per_phase, gp_interval=net.gp_interval)
        elif arch == "diffusion":
            arch_opts = dict(net=dict(base_width=net.base_width, width_max=net.width_max,
                                      attention_below=net.attention_below, layers_per_block=net.layers_per_block),
                             ema_half_life=net.ema_half_life, ema_rampup=net.ema_rampup,
                             label_dropout=net.label_dropout,
                             sampling=dict(sampler=net.sampler, steps=net.steps, guidance=net.guidance),
                             latent_dim=ARCHS["diffusion"].latent_dim(data.resolution, channels))
        else:
            gamma = net.r1_gamma if net.r1_gamma is not None else r1_gamma_heuristic(data.resolution, data.batch_size)
            arch_opts = dict(net=dict(channel_base=net.channel_base, channel_max=net.channel_max,
                                      mapping_layers=net.mapping_layers), ema_half_life=net.ema_half_life,
                             ema_rampup=net.ema_rampup, r1_gamma=gamma, r1_interval=net.r1_interval,
                             pl_weight=net.pl_weight, augment=modality, ada_target=net.ada.target,
                             ada_interval=net.ada.interval, ada_speed_images=net.ada.speed_images)
        return cls(**{"latent_dim": data.latent_dim, **arch_opts}, arch=arch, setup=setup, labels=labels,
                   resolution=data.resolution, channels=channels, batch_size=data.batch_size, epochs=epochs,
                   seed=p.seed, lr=net.lr, betas=tuple(net.betas), world=world, snapshot_every=p.gan.snapshots.every,
                   snapshot_dtype=p.gan.snapshots.dtype, score_images=p.gan.score.images,
                   swd_directions=p.gan.score.swd_directions)

    def to_json(self) -> dict:
        options = json.loads(json.dumps(asdict(self)))
        return {k: v for k, v in options.items() if k not in UNSET or v != UNSET[k]}

    @classmethod
    def from_json(cls, d: dict) -> Options:
        return cls(**{**d, "labels": tuple(d["labels"]), "betas": tuple(d["betas"])})


def r1_gamma_heuristic(resolution: int, batch_size: int) -> float:
    """StyleGAN2-ADA's R1 weight for a side and (global) batch when none is configured: 0.0002 * side^2 / batch."""
    return 0.0002 * resolution ** 2 / batch_size


def generator(opt: Options) -> torch.nn.Module:
    """G on the CPU, initialised from the options' seed."""
    torch.manual_seed(opt.seed)
    return ARCHS[opt.arch].Generator(opt.resolution, opt.channels, opt.latent_dim, n_classes=opt.n_classes, **opt.net,
                                     **opt.sampling)


@torch.no_grad()
def generate(G: torch.nn.Module, opt: Options, z: torch.Tensor, labels: torch.Tensor | None,
             depth: int | None = None, alpha: float = 1.0, batch_size: int = 256,
             noise: torch.Generator | None = None) -> torch.Tensor:
    """Float (N, C, resolution, resolution) images in [-1, 1]; a PGGAN below full depth is upsampled. sg2ada's
    per-pixel noise is drawn from `noise` (a generator on G's device), as in training; None: each layer's fixed
    noise map, so a latent always gives the same image (the sample grids)."""
    was_training = G.training
    G.eval()  # DCGAN samples with BatchNorm's running statistics, so a sample never changes the model
    out = []
    for s in range(0, len(z), batch_size):
        y = None if labels is None else labels[s:s + batch_size]
        if opt.arch == "pggan":
            x = G(z[s:s + batch_size], y, depth, alpha)
        elif opt.arch == "sg2ada":
            x = G(z[s:s + batch_size], y, "const" if noise is None else "random", noise)
        else:
            x = G(z[s:s + batch_size], y)
        x = x.float().clamp(-1, 1)
        if x.shape[-1] != opt.resolution:
            x = F.interpolate(x, size=opt.resolution, mode="nearest")
        out.append(x.cpu())
    G.train(was_training)
    return torch.cat(out)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), the store's layout."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def cpu_weights(module: torch.nn.Module) -> dict:
    """A module's state as contiguous CPU tensors, each with a storage of its own, in the module's order: the
    saved bytes then depend on the values only, not on the device, memory format or storage sharing of the run
    (torch.save writes all three; a resumed and an uninterrupted run must give the same file)."""
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in module.state_dict().items()}


def epoch_file(model_dir: Path, epoch: int) -> Path:
    return model_dir / "epochs" / f"{epoch:03d}.pt"


def read_log(model_dir: Path, name: str = "log.jsonl") -> list[dict]:
    path = model_dir / name
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def best_epoch(rows: list[dict]) -> int:
    """The epoch with the lowest SWD (the earliest on a tie) among those whose generator was kept (`snapshot`:
    at the full side, fully faded in, every snapshot_every-th): a PGGAN still growing draws upsampled blocks,
    whose smoothness SWD can score better than detailed full-size images."""
    return min([r for r in rows if r["snapshot"]] or rows, key=lambda r: (r["swd"], r["epoch"]))["epoch"]


def resolve_checkpoint(model_dir: Path, choice: str) -> int:
    """`best` (lowest SWD), `last` or `epoch_N` -> an epoch number that has a saved generator."""
    rows = read_log(model_dir)
    if not rows:
        raise FileNotFoundError(f"{model_dir}: no trained epochs; run train_gan first")
    if choice == "best":
        epoch = best_epoch(rows)
    elif choice == "last":
        epoch = [r for r in rows if r["snapshot"]][-1]["epoch"]
    elif m := re.fullmatch(r"epoch_(\d+)", choice):
        epoch = int(m.group(1))
    else:
        raise ValueError(f"checkpoint = {choice!r}: allowed best, last, epoch_N")
    if not epoch_file(model_dir, epoch).is_file():
        kept = [r["epoch"] for r in rows if r["snapshot"]]
        raise ValueError(f"checkpoint = {choice!r}: {model_dir} keeps the generators of epochs "
                         f"{', '.join(map(str, kept))} (gan.snapshots)")
    return epoch


def checkpoint_epochs(model_root: Path, checkpoint: str | int) -> dict[str, int]:
    """Each generator of a stage -> the epoch `checkpoint` picks for it (best, last, epoch_N per model, see
    resolve_checkpoint, or an int, one epoch for all); refuses an epoch a model did not keep. Reads logs only."""
    opt = Options.from_json(json.loads((Path(model_root) / "options.json").read_text()))
    choice = f"epoch_{checkpoint}" if isinstance(checkpoint, int) else checkpoint
    return {name: resolve_checkpoint(Path(model_root) / name, choice)
            for name in ([COND_MODEL] if opt.setup == "cond" else list(opt.labels))}


class Synthesizer:
    """The trained generators of one stage as one sampler: sample(label, n, rng) -> uint8 (n, H, W, C)."""

    def __init__(self, model_root: Path, checkpoint: str, device: torch.device | None = None):
        """`checkpoint`: best, last, epoch_N (per model, see resolve_checkpoint) or an int, one epoch for all."""
        self.opt = Options.from_json(json.loads((model_root / "options.json").read_text()))
        self.device = device or pick_device()
        self.epochs = checkpoint_epochs(model_root, checkpoint)
        self._models: dict[str, tuple] = {}
        for name, epoch in self.epochs.items():
            snap = load_weights(epoch_file(model_root / name, epoch))
            G = generator(self.opt)
            G.load_state_dict(snap["state_dict"])
            self._models[name] = (G.to(self.device).eval(), snap["depth"], snap["alpha"])

    def sample(self, label: str, n: int, rng: np.random.Generator) -> np.ndarray:
        if label not in self.opt.labels:
            raise ValueError(f"label {label!r} was not trained (models know {', '.join(self.opt.labels)})")
        G, depth, alpha = self._models[COND_MODEL if self.opt.setup == "cond" else label]
        z = torch.from_numpy(rng.standard_normal((n, self.opt.latent_dim), dtype=np.float32)).to(self.device)
        y = torch.full((n,), self.opt.labels.index(label), device=self.device) if self.opt.setup == "cond" else None
        # sg2ada: fresh per-pixel noise, as G drew in training (one fixed map shared by every image is not its output)
        noise = (torch.Generator(self.device).manual_seed(int(rng.integers(2 ** 63)))
                 if self.opt.arch == "sg2ada" else None)
        return to_uint8(generate(G, self.opt, z, y, depth, alpha, noise=noise))

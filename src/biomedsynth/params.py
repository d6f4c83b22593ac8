"""The pydantic models of params.yaml: the only place a knob is read and checked.

Every model forbids unknown keys and has no defaults, so a typo or a missing key stops the
command instead of silently falling back to a value nobody chose. Knobs that size an allocation (widths,
batches, image counts and sides) have upper bounds, each a few times the largest the study or its papers
use, so an impossible value stops in one line at load instead of in a traceback mid-run.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from biomedsynth.gan import ARCH_NAMES
from biomedsynth.sources import slide_id_pattern

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


# DVC's run cache hashes a stage without any key named "size" or "nfiles" (its own file metadata), so a
# knob with that name would not rerun its stage: `dvc repro` would restore outputs made with another value.
DVC_IGNORED_KEYS = {"size", "nfiles"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the built-in phantom sample (written by `biomedsynth sample`, tracked by data.dvc) ---
class XraySample(Strict):
    patients: PosInt
    scans_per_patient: tuple[PosInt, PosInt]
    abnormal_fraction: Fraction
    min_side: Annotated[int, Field(ge=128)]
    max_side: Annotated[int, Field(ge=128, le=8192)]  # px; 8192: the default pixel budget's side (scans: <= 2,800)
    difficulty: Fraction

    @model_validator(mode="after")
    def _ordered(self):
        if self.scans_per_patient[0] > self.scans_per_patient[1] or self.min_side > self.max_side:
            raise ValueError("ranges must be [low, high] with low <= high")
        return self


class HistologySample(Strict):
    normal_slides: PosInt
    tumor_slides: PosInt
    width: Annotated[int, Field(ge=512, le=16384)]   # px; a phantom slide is rendered whole in memory
    height: Annotated[int, Field(ge=512, le=16384)]


class Sample(Strict):
    xray: XraySample
    histology: HistologySample


# --- where the raw data is and in which format ---
def _inside_root(path: Path | None, info: ValidationInfo) -> Path | None:
    """A source's CSV must lie inside its root: the root is its ingest stage's DVC dependency (dvc.yaml), and
    `dvc status` would not see a file outside it change."""
    root = info.data.get("root")
    if path is None or root is None or Path(os.path.abspath(path)).is_relative_to(os.path.abspath(root)):
        return path
    raise ValueError(f"outside the source's root {root}, the ingest stage's DVC dependency, so `dvc status` would "
                     f"not see it change: move it into {root}, or set root to a folder that holds both")


SourceCsv = Annotated[Path | None, AfterValidator(_inside_root)]


class XraySource(Strict):
    format: Literal["nih", "manifest"]
    root: Path  # anywhere (the ingest stage depends on it); its CSV must lie inside it
    csv: SourceCsv  # nih: Data_Entry*.csv found in root when null; manifest: required
    allow_outside_root: bool  # manifest rows whose path leads outside root: read (true) or skipped and counted

    @model_validator(mode="after")
    def _manifest_needs_csv(self):
        if self.format == "manifest" and self.csv is None:
            raise ValueError("format 'manifest' needs csv: the manifest CSV path")
        return self


class HistologySource(Strict):
    format: Literal["slides", "tiles", "pcam"]
    root: Path
    labels_csv: SourceCsv    # slides: `slide,label` CSV instead of Camelyon16 file names
    slide_id: str | None     # tiles: slide from the file name, camelyon16 | pcam | a regex with a group 'slide'
    allow_tile_level_split: bool  # tiles/pcam without slide ids: split by tile (else refused)
    allow_outside_root: bool  # tiles and slides that are links out of root: read (true) or skipped and counted

    @model_validator(mode="after")
    def _slide_id_for_tile_folders(self):
        if self.slide_id is not None:
            if self.format != "tiles":
                raise ValueError(f"slide_id reads tile file names (format 'tiles'); format {self.format!r} has "
                                 "its slide ids already (slide file names, PatchCamelyon's _meta.csv)")
            slide_id_pattern(self.slide_id)
        return self


class Sources(Strict):
    xray: XraySource
    histology: HistologySource


# --- ingest ---
class XrayIngest(Strict):
    image_size: Annotated[int, Field(ge=16, le=4096)]
    normal_only: bool
    on_no_lungs: Literal["skip", "central"]
    percentiles: tuple[Annotated[float, Field(ge=0, le=100)], Annotated[float, Field(ge=0, le=100)]]
    fit: Literal["stretch", "crop", "pad"]  # how a non-square scan is made square before the resize

    @model_validator(mode="after")
    def _ordered(self):
        if self.percentiles[0] >= self.percentiles[1]:
            raise ValueError("percentiles must be [low, high] with low < high")
        return self


class HistologyIngest(Strict):
    tile_size: Annotated[int, Field(ge=16, le=4096)]
    level: NonNegInt
    min_tissue: Fraction
    tiles_per_slide: PosInt
    tumor_label: Literal["slide", "annotation"]


class Ingest(Strict):
    workers: PosInt  # processes for decoding; does not change results
    xray: XrayIngest
    histology: HistologyIngest
    max_pixels: PosInt  # the most pixels one read decodes at once; bigger files are skipped (sources/budget.py)

    @field_validator("max_pixels")
    @classmethod
    def _fits_a_tile(cls, v, info):
        histology = info.data.get("histology")
        if histology is not None and v < histology.tile_size ** 2:
            raise ValueError(f"below one histology tile (ingest.histology.tile_size^2 = {histology.tile_size ** 2})")
        return v


# --- study groups (SPEC section 2) ---
AgeBin = tuple[NonNegInt, NonNegInt]


class XrayGroup(Strict):
    age_bins: Annotated[list[AgeBin], Field(min_length=1)] | None  # null: the age task's young and mature ranges
    balance: Literal["sex_age", "sex"]  # X-Norm: every sex x age label equal; X-Norm-L: sexes equal per bin
    train: PosInt
    test: PosInt

    @model_validator(mode="after")
    def _bins_ordered(self):
        for (lo, hi), nxt in zip(self.age_bins or [], (self.age_bins or [])[1:] + [None]):
            if lo > hi or (nxt is not None and nxt[0] <= hi):
                raise ValueError(f"age_bins must be increasing, non-overlapping [low, high] pairs; bad at [{lo}, {hi}]")
        return self


class TrainTest(Strict):
    """Images requested on each side of the split (a histology group, a task set)."""
    train: PosInt
    test: PosInt


HistologyGroup = TrainTest


class XrayGroups(Strict):
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]  # of patients, held out for every X-ray group
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]   # of the other patients, the GANs' validation part
    x_norm: XrayGroup
    x_norm_l: XrayGroup


class HistologyGroups(Strict):
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]  # of slides per slide label
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]   # of the other slides per slide label, for validation
    h_norm: HistologyGroup
    h_tumor: HistologyGroup


GROUP_MODALITY = {"x_norm": "xray", "x_norm_l": "xray", "h_norm": "histology", "h_tumor": "histology"}
# the setups of each group: histology has no conditional model (the study trained none)
GROUP_SETUPS = {"x_norm": ("uncond", "cond"), "x_norm_l": ("uncond", "cond"), "h_norm": ("uncond",),
                "h_tumor": ("uncond",)}


def setup_of(stage: str) -> str:
    """A GAN stage's setup, the last part of its name <arch>-<group>-<setup>."""
    return stage.rsplit("-", 1)[1]


def gan_stage_table() -> dict[str, dict]:
    """Every GAN stage there can be, <arch>-<group>-<setup> (its folder under models/gan and data/synthetic) ->
    the entry params gan.stages gives it (the study's 12 sets, SPEC section 4, sg2ada's 6, section 8, and the
    diffusion model's 6)."""
    return {f"{arch}-{group}-{setup}": {"arch": arch, "group": group, "modality": GROUP_MODALITY[group]}
            for arch in ARCH_NAMES for group, setups in GROUP_SETUPS.items() for setup in setups}


class StudyGroups(Strict):
    min_fill: Fraction  # a side reaching less than this share of its requested images stops the stage
    xray: XrayGroups
    histology: HistologyGroups


# --- GAN training (SPEC section 3) ---
Betas = tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]]


class GanData(Strict):
    resolution: Annotated[int, Field(ge=32, le=1024)]  # GAN side; real images are area-downsampled to it
    latent_dim: Annotated[int, Field(gt=0, le=4096)]   # the study: 512
    batch_size: Annotated[int, Field(gt=0, le=1024)]   # the study: 32

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, side: int) -> int:
        # both GANs double a 4x4 start up to the side (gan/__init__.doublings; DCGAN stops at 512 and says so
        # when its stage starts, before it writes anything)
        if side & (side - 1):
            raise ValueError("must be a power of two (32, 64, 128, 256, 512 or 1024): the GANs grow from 4x4 "
                             "by doubling")
        return side


class XrayGan(GanData):
    epochs_uncond: PosInt   # one model per sex-age label
    epochs_cond: PosInt     # one model per group, conditional on the label


class HistologyGan(GanData):
    epochs: PosInt


class Dcgan(Strict):
    base_width: Annotated[int, Field(gt=0, le=512)]  # feature maps next to the output (doubling towards 4x4,
                                                     # capped at 512: a wider base would change nothing)
    lr: PosFloat
    betas: Betas


class Pggan(Strict):
    fmap_base: PosInt       # feature maps at depth d: min(fmap_base / 2**(d+2), fmap_max)
    fmap_max: Annotated[int, Field(gt=0, le=2048)]  # the paper: 512
    lr: PosFloat
    betas: Betas
    ema_half_life: PosFloat | None   # images; null: 10,000 or a quarter of the shortest growth phase
    ema_rampup: Annotated[float, Field(gt=0.0, le=1.0)] | None  # half-life at most this share of images seen
    epochs_per: Literal["depth", "total"]  # depth: every depth trains `epochs` (the study); total: spread over all
    images_per_phase: PosInt | None  # fixed phases (then the epochs are the run's total); null: from epochs_per
    gp_interval: PosInt              # the WGAN-GP penalty every k-th D step with weight k (1: the study)


class Ada(Strict):
    target: Annotated[float, Field(gt=0.0, lt=1.0)]  # the share of reals D calls real that p is steered to (0.6)
    interval: PosInt                                 # D steps between adjustments of p
    speed_images: PosInt                             # images over which p can move from 0 to 1


class Sg2ada(Strict):
    channel_base: PosInt     # feature maps at side s: min(channel_base / s, channel_max) (the paper: 16384, 512)
    channel_max: Annotated[int, Field(gt=0, le=2048)]    # the paper: 512
    mapping_layers: Annotated[int, Field(gt=0, le=32)]   # dense layers z -> w (the paper: 8)
    lr: PosFloat
    betas: Betas
    ema_half_life: PosFloat | None   # images; null: 10,000, at most a quarter of the run
    ema_rampup: Annotated[float, Field(gt=0.0, le=1.0)] | None  # half-life at most this share of images seen
    r1_gamma: Annotated[float, Field(ge=0.0)] | None  # null: StyleGAN2-ADA's 0.0002 * resolution^2 / batch_size
    r1_interval: PosInt      # R1 every k-th D step, weighted k
    pl_weight: Annotated[float, Field(ge=0.0)]  # path-length regularisation (0: off)
    ada: Ada


class Diffusion(Strict):
    base_width: Annotated[int, Field(ge=8, le=1024)]  # UNet feature maps at the full side, doubling per level
    width_max: Annotated[int, Field(ge=8, le=2048)]   # ... at most this (levels down to 8 px)
    attention_below: Annotated[int, Field(ge=0, le=256)]  # self-attention at sides <= this (0: none)
    layers_per_block: Annotated[int, Field(gt=0, le=4)]   # residual blocks per level
    lr: PosFloat
    betas: Betas
    ema_half_life: PosFloat | None   # images; null: 10,000, at most a quarter of the run (as sg2ada)
    ema_rampup: Annotated[float, Field(gt=0.0, le=1.0)] | None
    label_dropout: Annotated[float, Field(ge=0.0, lt=1.0)]  # cond: share of steps without the label (for guidance)
    sampler: Literal["ddim", "dpm++"]
    steps: Annotated[int, Field(gt=0, le=1000)]       # sampler steps (network evaluations, twice with guidance)
    guidance: Annotated[float, Field(ge=0.0, le=20.0)]  # classifier-free guidance scale (1: none; cond only)


class Snapshots(Strict):
    every: PosInt                            # keep every k-th selectable epoch's sampling generator (and the last)
    dtype: Literal["float32", "bfloat16"]


class GanScore(Strict):
    images: Annotated[int, Field(ge=4, le=16384)]  # validation and generated images compared per epoch and model,
                                                   # all held at once (16,384: the PGGAN paper's SWD count)
    swd_directions: Annotated[int, Field(gt=0, le=4096, multiple_of=128)]  # random projections of SWD (the paper: 512)
    feature_epochs: PosInt                # training epochs of the modality's KID feature net
    trend_tail: Annotated[float, Field(gt=0.0, le=0.5)]  # a best epoch in this last share of epochs: still improving


class GanStage(Strict):
    """One entry of gan.stages: what dvc.yaml fills the stage's deps and params with (DVC cannot split its name)."""
    arch: Literal[ARCH_NAMES]
    group: Literal[tuple(GROUP_MODALITY)]
    modality: Literal["xray", "histology"]


def _stages_named_by_their_entry(stages: dict[str, GanStage]) -> dict[str, GanStage]:
    table = gan_stage_table()
    for name, stage in stages.items():
        if name not in table:
            raise ValueError(f"{name!r} is no GAN stage: <arch>-<group>-<setup>, arch {'|'.join(ARCH_NAMES)}, "
                             f"group x_norm|x_norm_l (setup uncond|cond) or h_norm|h_tumor (uncond)")
        if stage.model_dump() != table[name]:
            raise ValueError(f"{name}: its entry must be {_flow(table[name])}")
    return stages


# The GAN stages dvc.yaml runs (train_gan@<name>, synthesize@<name>): `biomedsynth set gan.stages=PRESET` writes
# the table of a preset: those whose sets Table 3 uses, every architecture on those sets, or all twenty-four.
GAN_STAGE_PRESETS = ("table3", "table3_sets", "all")


def gan_stages_preset(preset: str, tasks: Tasks) -> dict[str, dict]:
    """The gan.stages table of a preset under these tasks, in gan_stage_table's order."""
    used = tasks.used_gan_stages()
    sets = {name.split("-", 1)[1] for name in used}
    chosen = {"table3": lambda name: name in used, "table3_sets": lambda name: name.split("-", 1)[1] in sets,
              "all": lambda name: True}[preset]
    return {name: entry for name, entry in gan_stage_table().items() if chosen(name)}


def _flow(entry: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in entry.items()) + "}"


def _not_a_preset(value):
    if value in GAN_STAGE_PRESETS:  # what gan.stages once was: DVC loops over a table, so the file holds one
        raise ValueError(f"a table of GAN stages, not a preset: `biomedsynth set gan.stages={value}` writes {value}'s")
    return value


class Gan(Strict):
    stages: Annotated[dict[str, GanStage], Field(min_length=1), BeforeValidator(_not_a_preset),
                      AfterValidator(_stages_named_by_their_entry)]
    xray: XrayGan
    histology: HistologyGan
    dcgan: Dcgan
    pggan: Pggan
    sg2ada: Sg2ada
    diffusion: Diffusion
    snapshots: Snapshots
    score: GanScore


# --- synthetic datasets (SPEC section 4) ---
class Evidence(Strict):
    images: Annotated[int, Field(gt=0, le=50_000)]  # synthetic and held-out real images measured against every
                                                    # training image
    side: Annotated[int, Field(ge=4, le=256)]  # px images are area-downsampled to before the pixel PCA
    pca_dims: PosInt        # axes of the pixel PCA, fitted on up to `images` training images
    k: PosInt               # PRDC's neighbours (Naeem et al.: 5)
    cells: PosInt           # C_T's k-means cells at most (fewer when held-out images are < 20 per cell)


class Synthesize(Strict):
    checkpoint: Annotated[str, Field(pattern=r"^(best|utility|last|epoch_[1-9][0-9]*)$")]
    hash_screen: Literal["dcgan_xray", "all", "none"]
    hash_size: Annotated[int, Field(ge=2, le=64)]
    hash_threshold: NonNegInt | None  # bits; None: calibrated from held-out real images at hash_quantile
    hash_quantile: Annotated[float, Field(gt=0.0, le=1.0)]
    max_tries_factor: Annotated[float, Field(ge=1.0)]
    batch_size: Annotated[int, Field(gt=0, le=4096)]  # images a generator draws at once
    draws: PosInt  # independent synthetic copies of the group (fresh latents): the benchmark repeats its arm on each
    evidence: Evidence

    @model_validator(mode="after")
    def _threshold_in_range(self):
        if self.hash_threshold is not None and self.hash_threshold > self.hash_size ** 2:
            raise ValueError(f"hash_threshold must be at most hash_size**2 = {self.hash_size ** 2} bits")
        return self


# --- the benchmark's task sets (SPEC section 5) ---
class HistologyTask(TrainTest):
    arch: Literal[ARCH_NAMES]  # whose H-Norm + H-Tumor synthetic sets train the synthetic model


class AgeTask(TrainTest):
    young: AgeBin    # age bins wholly inside these ranges form the classes
    mature: AgeBin


class XrayTasks(Strict):
    group: Literal["x_norm", "x_norm_l"]   # the real study group both X-ray tasks draw from
    arch: Literal[ARCH_NAMES]  # with setup: the synthetic copy of that group
    setup: Literal["uncond", "cond"]
    sex: TrainTest
    age: AgeTask


def _each_once(archs: list[str]) -> list[str]:
    if repeated := sorted({a for a in archs if archs.count(a) > 1}):
        raise ValueError(f"lists {', '.join(repeated)} more than once")
    return archs


class Tasks(Strict):
    histology: HistologyTask
    xray: XrayTasks
    compare: Annotated[list[Literal[ARCH_NAMES]], AfterValidator(_each_once)]  # generators set beside each task's own

    def own_arch(self) -> dict[str, str]:
        """Per task, the architecture whose synthetic set is Table 3's (tasks.histology.arch, tasks.xray.arch)."""
        return {"histology": self.histology.arch, "xray_sex": self.xray.arch, "xray_age": self.xray.arch}

    def compared(self) -> dict[str, list[str]]:
        """Per task, the architectures of tasks.compare other than its own: each one's set of the same group and
        setup trains one more arm, whose drop table3 sets against the own set's."""
        return {task: [a for a in self.compare if a != own] for task, own in self.own_arch().items()}

    def gan_stages(self, arch: str | None = None) -> dict[str, list[str]]:
        """Per task, the GAN stages (<arch>-<group>-<setup>) whose synthetic sets it trains on: its own
        architecture's, or those of `arch` on the same groups and setup."""
        x = self.xray
        own = self.own_arch()
        histology, xray = arch or own["histology"], arch or own["xray_sex"]
        return {"histology": [f"{histology}-{g}-uncond" for g in ("h_norm", "h_tumor")],
                "xray_sex": [f"{xray}-{x.group}-{x.setup}"], "xray_age": [f"{xray}-{x.group}-{x.setup}"]}

    def compared_stages(self) -> dict[str, dict[str, list[str]]]:
        """{arch: {task: its GAN stages}} of tasks.compare, each over the tasks it is compared on (not its own)."""
        compared = self.compared()
        return {arch: {task: stages for task, stages in self.gan_stages(arch).items() if arch in compared[task]}
                for arch in self.compare}

    def used_gan_stages(self) -> set[str]:
        """The GAN stages whose synthetic sets the benchmark trains on: each task's own and its compared ones."""
        return {stage for table in (self.gan_stages(), *self.compared_stages().values())
                for stages in table.values() for stage in stages}


# --- the classifiers (SPEC section 5) ---
GridValue = int | float | str | None
Grid = dict[str, Annotated[list[GridValue], Field(min_length=1)]]


class Lbp(Strict):
    radii: Annotated[list[PosInt], Field(min_length=1)]   # P = 8R points each; the study: 2, 3, 4 + concat
    workers: PosInt                                       # processes; results do not depend on it


class Vgg16(Strict):
    input_side: Annotated[int, Field(ge=32, le=1024)]  # px fed to VGG16 (images resized; the study: 224)
    epochs: PosInt
    batch_size: Annotated[int, Field(gt=0, le=1024)]   # the study: 32
    lr: PosFloat
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]  # of the training set, for the best-val-loss checkpoint
    weights: Path | None                                    # a local torchvision VGG16 state dict; null: from scratch
    head: Literal["torchvision", "small"]                   # classifier 4096-4096-2 (the study's) or 512-512-2
    precision: Literal["auto", "fp32", "bf16"]              # bf16 autocast, or auto: bf16 on a GPU or an AMX CPU
    real_synthetic: bool                                    # also train the real + synthetic arm (twice the images)


class Classify(Strict):
    replicates: Annotated[int, Field(ge=1, le=100)]          # replicate r: seed r on synthetic draw r (<= draws)
    bootstrap: Annotated[int, Field(ge=100)]                 # resamples of the test set for the 95% intervals
    cv_folds: Annotated[int, Field(ge=2)]
    lbp: Lbp
    knn: Grid
    svm: Grid
    rf: Grid
    vgg16: Vgg16


# --- sharing the synthetic sets (exports/<name>) ---
SetName = Annotated[str, Field(pattern=r"^[a-z0-9]+-(x_norm|x_norm_l|h_norm|h_tumor)-(uncond|cond)$")]


class Export(Strict):
    sets: Literal["table3", "all"] | Annotated[list[SetName], Field(min_length=1)]  # table3: the sets Table 3 trains on
    allow_flagged: list[SetName]  # exported although the memorisation test flags them as copying (the datasheet says so)
    allow_unlearnt: list[SetName] = []  # exported although a GAN behind them learnt nothing (the datasheet says so)
    with_generator: bool          # also ship the chosen sampling generator (bf16) and its model card
    license: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")]  # an SPDX id (or LicenseRef-...)
    version: Annotated[str, Field(pattern=r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")]  # MAJOR.MINOR.PATCH
    intended_use: Annotated[str, Field(min_length=20)]


# host:port: a host name, an IPv4 address or a bracketed IPv6 address, and a port
RDZV_ENDPOINT = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                           r"|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")


class Launch(Strict):
    """How many processes the GAN and VGG16 stages run in: torchrun's options of the same names, which
    biomedsynth passes to torchrun itself as an argument list (distributed.py), so no value meets a shell."""
    nproc_per_node: PosInt
    nnodes: PosInt
    node_rank: NonNegInt
    rdzv_endpoint: str | None  # host:port of node 0, the same on every node; null: one node, a free local port
    models_per_device: PosInt  # a stage's per-label GAN models trained at once on each device (processes)

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_port(cls, endpoint: str | None) -> str | None:
        if endpoint is None:
            return None
        match = RDZV_ENDPOINT.fullmatch(endpoint)
        if not match or not 0 < int(match[1]) < 65536:
            raise ValueError("expected host:port, e.g. node0:29500, 10.0.0.1:29500 or [fd00::1]:29500")
        return endpoint

    @model_validator(mode="after")
    def _nodes(self):
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes ({self.nnodes})")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError("several nodes need rdzv_endpoint: host:port of node 0, the same on every node")
        return self


class Tracking(Strict):
    # MLflow artifacts fitted to or drawn from real images without the export's privacy gate (classifier
    # models, GAN generators and their sample grids) go to the store only when true: a team server is a way out
    real_images: bool = False


class Params(Strict):
    profile: Literal["smoke", "default", "paper"]
    seed: NonNegInt
    launch: Launch
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]
    sample: Sample
    sources: Sources
    ingest: Ingest
    studygroups: StudyGroups
    gan: Gan
    synthesize: Synthesize
    tasks: Tasks
    classify: Classify
    export: Export
    tracking: Tracking = Tracking()

    @model_validator(mode="after")
    def _a_draw_per_replicate(self):
        if self.classify.replicates > self.synthesize.draws:
            raise ValueError(f"classify.replicates ({self.classify.replicates}) needs as many synthetic draws: "
                             f"synthesize.draws is {self.synthesize.draws}")
        return self

    def exported_sets(self) -> list[str]:
        """The sets export.sets asks for: Table 3's (table3), every one gan.stages lists (all), or its list."""
        sets = self.export.sets
        return sorted(self.tasks.used_gan_stages()) if sets == "table3" else list(self.gan.stages) if sets == "all" \
            else sets

    @model_validator(mode="after")
    def _a_stage_for_every_set_used(self):
        """Table 3's and export's sets are drawn by stages dvc.yaml runs: refused here, before any stage runs, not
        by DVC at the tasks or export stage (a dependency no stage writes)."""
        table = gan_stage_table()
        for name in sorted(self.tasks.used_gan_stages() - set(self.gan.stages)):
            raise ValueError(f"the benchmark (tasks) uses {name}, which gan.stages does not list: add it "
                             f"(`biomedsynth set gan.stages=table3`, or dvc exp run -S "
                             f"'++gan.stages.{name}={_flow(table[name])}')")
        if untrained := [name for name in self.exported_sets() if name not in self.gan.stages]:
            raise ValueError(f"export.sets lists {', '.join(untrained)}, which gan.stages does not list "
                             f"(it lists {', '.join(self.gan.stages)})")
        return self

    @model_validator(mode="after")
    def _age_bins_follow_the_age_task(self):
        """An X-ray group's `age_bins: null` takes the age task's two ranges, so they are stated once."""
        x, age = self.studygroups.xray, self.tasks.xray.age
        bins = [tuple(age.young), tuple(age.mature)]
        if bins[0][1] >= bins[1][0]:
            raise ValueError("tasks.xray.age: young must end before mature starts")
        groups = {name: getattr(x, name).model_copy(update={"age_bins": bins})
                  for name in ("x_norm", "x_norm_l") if getattr(x, name).age_bins is None}
        if not groups:
            return self
        studygroups = self.studygroups.model_copy(update={"xray": x.model_copy(update=groups)})
        return self.model_copy(update={"studygroups": studygroups})


class ParamsError(Exception):
    """A params file that cannot be used; the message is one line naming the key and value."""


def _lookup(data, loc):
    for key in loc:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return data


def error_line(path: Path, err: ValidationError, data: dict) -> str:
    e = err.errors()[0]
    loc = [k for k in e["loc"] if not (isinstance(k, str) and k.startswith("function-after"))]
    key = ".".join(str(k) for k in loc) or "<top level>"
    value = _lookup(data, loc)
    if e["type"] == "missing":
        return f"{path}: missing key '{key}'"
    if not loc:  # a check across sections: its message names the keys (the value would be the whole file)
        return f"{path}: {e['msg'].removeprefix('Value error, ')}"
    if e["type"] == "extra_forbidden":
        model = Params
        for k in loc[:-1]:
            field = model.model_fields.get(str(k)) if isinstance(model, type) else None
            model = field.annotation if field is not None else None
        allowed = ", ".join(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else "?"
        return f"{path}: unknown key '{key}' (allowed here: {allowed})"
    if isinstance(value, dict):  # a table's check names the entry
        return f"{path}: {key}: {e['msg'].removeprefix('Value error, ')}"
    return f"{path}: {key} = {value!r}: {e['msg'].removeprefix('Value error, ')}"


def load_params(path: Path | str = "params.yaml") -> Params:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return Params.model_validate(data if data is not None else {})
    except ValidationError as e:
        raise ParamsError(error_line(path, e, data or {})) from None

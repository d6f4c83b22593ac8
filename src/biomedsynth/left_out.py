"""The outputs of the GAN stages (train_gan, synthesize) that `gan.stages` leaves out: small files
saying why. Written without importing torch: the default run leaves out 18 such stages, and the imports of
the training and drawing code cost 2-4 s each.

DVC empties a stage's outputs before it runs; what an earlier setting trained or drew stays in DVC's cache
(the run cache brings it back when the setting returns) and a GAN's resume state under .cache/gan.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from biomedsynth.params import Params
from biomedsynth.store import write_json


def trains(p: Params, name: str) -> bool:
    """Whether GAN stage `name` (<arch>-<group>-<setup>) trains under gan.stages: all; table3, the stages whose
    sets Table 3 uses; table3_sets, every architecture on those sets (to compare them side by side)."""
    from biomedsynth.tasks import used_gan_stages

    used = used_gan_stages(p.tasks)
    if p.gan.stages == "table3_sets":
        return _set_of(name) in {_set_of(stage) for stage in used}
    return p.gan.stages == "all" or name in used


def reason_left_out(p: Params, name: str) -> str | None:
    """Why this profile does not train GAN stage `name`, or None."""
    from biomedsynth.tasks import used_gan_stages

    if trains(p, name):
        return None
    return f"not trained: gan.stages is {p.gan.stages} and the benchmark uses {', '.join(sorted(used_gan_stages(p.tasks)))}"


def _set_of(stage: str) -> str:
    """The set (group-setup) a GAN stage trains on."""
    return stage.split("-", 1)[1]


def write_not_trained(reason: str, out: Path, metrics_path: Path, scores_path: Path, losses_path: Path) -> None:
    """train_gan's outputs: metrics saying why, curves without epochs, a model folder holding not_trained.json."""
    from biomedsynth.gan.curves import write_curves

    write_json(out / "not_trained.json", {"trained": False, "reason": reason})
    write_json(metrics_path, {"trained": False, "reason": reason})
    write_curves({}, scores_path, losses_path)


def write_not_drawn(reason: str, out: Path, metrics_path: Path, figures: Path) -> None:
    """synthesize's outputs: metrics saying why, a synthetic set folder holding not_drawn.json and a figures folder
    holding not_drawn.png, the reason drawn as text (`dvc plots show` shows it where the closest pairs would be).
    Never an empty folder: DVC warns "'<output>' is empty" for each, 28 lines of noise per default repro."""
    from PIL import Image, ImageDraw, ImageFont

    note = {"synthesized": False, "reason": reason}
    write_json(out / "not_drawn.json", note)
    text, font = "\n".join([f"{out.name}: not drawn", *textwrap.wrap(reason, 80)]), ImageFont.load_default(16)
    box = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox((0, 0), text, font=font, spacing=6)
    image = Image.new("L", (box[2] + 16, box[3] + 16), 255)
    ImageDraw.Draw(image).multiline_text((8, 8), text, fill=0, font=font, spacing=6)
    figures.mkdir(parents=True, exist_ok=True)
    image.save(figures / "not_drawn.png")
    write_json(metrics_path, note)

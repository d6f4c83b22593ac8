"""The report stage: Table 3 (accuracy of each classifier trained on real and on synthetic images, both
tested on real ones) with intervals beside the study's numbers, whether the study's claim holds, and per GAN
stage the figures that show what the synthetic images look like and how they were picked and checked.

`summarise` is the stage's metrics file, flat enough for `dvc metrics show` and `dvc exp show` to compare.
`write_report` writes report.md (figures beside it under figures/, so it renders on GitHub) and report.html,
self-contained: the same PNGs embedded as data URIs, so it opens offline and can be mailed as one file.
The document is built once as a list of blocks and rendered to both formats.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from biomedsynth.classify.benchmark import CLASSIC as LBP
from biomedsynth.classify.benchmark import MODELS
from biomedsynth.store import ImageSet
from biomedsynth.tasks import TASKS

DEEP = tuple(m for m in MODELS if m not in LBP)
TASK_NAMES = {"histology": "histology", "xray_sex": "X-ray sex", "xray_age": "X-ray age"}
MODEL_NAMES = {"vgg16": "VGG16", "knn": "k-NN", "svm": "SVM", "rf": "RF"}

# SPEC section 6: task -> model -> (accuracy trained on real, accuracy trained on synthetic, relative drop)
STUDY_TABLE3 = {
    "histology": {"vgg16": (0.96, 0.93, 0.0312), "knn": (0.94, 0.87, 0.0745),
                  "svm": (0.90, 0.85, 0.0556), "rf": (0.93, 0.86, 0.0753)},
    "xray_sex": {"vgg16": (0.90, 0.88, 0.0222), "knn": (0.84, 0.78, 0.0714),
                 "svm": (0.82, 0.74, 0.0976), "rf": (0.83, 0.72, 0.1325)},
    "xray_age": {"vgg16": (0.86, 0.83, 0.0349), "knn": (0.80, 0.73, 0.0875),
                 "svm": (0.79, 0.71, 0.1013), "rf": (0.80, 0.70, 0.1250)},
}
TITLE = "biomedsynth: can synthetic images stand in for real ones?"
CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;font-size:90%}th,td{border:1px solid #ccc;padding:3px 8px}"
       "th{background:#f2f2f2}td{text-align:right}td:first-child,td:nth-child(2){text-align:left}"
       "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:85%;color:#555}")


# ---- files ----

def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a report is meant to be read by others
    os.replace(tmp, path)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run the stage that writes it")
    return path


def _read_json(path: Path) -> dict:
    return json.loads(_existing(path).read_text())


# ---- Table 3 as metrics ----

def _claims(drops: dict[str, dict[str, float]]) -> dict:
    """Mean relative drop over tasks of the deep and of the LBP models present; the claim is deep < LBP."""
    def mean(models):
        values = [d[m] for d in drops.values() for m in models if m in d]
        return round(float(np.mean(values)), 4) if values else None
    deep, lbp = mean(DEEP), mean(LBP)
    return {"deep_drop_mean": deep, "lbp_drop_mean": lbp,
            "deep_drop_below_lbp": None if deep is None or lbp is None else deep < lbp}


def summarise(metrics_dir: Path, tasks: tuple[str, ...] = TASKS, models: tuple[str, ...] = MODELS) -> dict:
    """Table 3 from metrics/<task>/<model>.json: per task and model the accuracy trained on real, on
    synthetic and the relative drop, each {value, low, high}; plus "claims" (ours beside the study's)."""
    for name, given, known in (("task", tasks, TASKS), ("model", models, MODELS)):
        if unknown := sorted(set(given) - set(known)):
            raise ValueError(f"unknown {name}(s) {', '.join(unknown)}; known: {', '.join(known)}")
    table = {}
    for task in tasks:
        for model in models:
            path = Path(metrics_dir) / task / f"{model}.json"
            m = _read_json(path)
            try:
                table.setdefault(task, {})[model] = {
                    k: {b: round(float(m[k]["accuracy"][b]), 4) for b in ("value", "low", "high")}
                    for k in ("real", "synthetic", "drop")}
            except KeyError as e:
                raise ValueError(f"{path}: no {e.args[0]!r} in its real/synthetic/drop accuracy") from None
    ours = _claims({t: {m: v["drop"]["value"] for m, v in row.items()} for t, row in table.items()})
    study = _claims({t: {m: STUDY_TABLE3[t][m][2] for m in row} for t, row in table.items()})
    return {**table, "claims": {**ours, "study_deep_drop_mean": study["deep_drop_mean"],
                                "study_lbp_drop_mean": study["lbp_drop_mean"]}}


# ---- figures ----

def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image).save(buf, "PNG")
    return buf.getvalue()


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 (H, W, C) -> (side, side, C), box-filtered as the GAN's area downsampling."""
    if image.shape[:2] == (side, side):
        return image
    out = np.asarray(Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).resize((side, side), Image.BOX))
    return out.reshape(side, side, image.shape[2])


def _tile(images: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """uint8 (N, H, W, C) -> one (rows, columns) image on white, then enlarged (nearest) to >= 512 px wide."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, columns)
        grid[r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = img
    k = max(1, math.ceil(512 / grid.shape[1]))
    return grid.repeat(k, 0).repeat(k, 1)


def _sample_pairs(real: ImageSet, synthetic: ImageSet, n: int, seed: int):
    """n synthetic images spread over the labels (every label once before any twice) and, for each, a real
    training image of the same label resized to the synthetic side: (real, synthetic, labels)."""
    rng = np.random.default_rng(seed)
    syn_labels, real_labels = synthetic.meta["label"].to_numpy(), real.meta["label"].to_numpy()
    labels = np.unique(syn_labels)
    counts = np.bincount(np.resize(rng.permutation(len(labels)), min(n, len(synthetic))), minlength=len(labels))
    side, reals, syns, names = synthetic.shape[0], [], [], []
    for label, k in zip(labels, counts):
        pool = np.flatnonzero(real_labels == label)
        if not len(pool):
            raise ValueError(f"{real.path} has no image of label {label!r}, which {synthetic.path} holds")
        syns += [synthetic[int(i)] for i in rng.choice(np.flatnonzero(syn_labels == label), k, replace=False)]
        reals += [_resize(real[int(i)], side) for i in rng.choice(pool, k, replace=len(pool) < k)]
        names += [str(label)] * k
    return np.stack(reals), np.stack(syns), names


def _growth_epochs(rows: list[dict]) -> list[int]:
    """From a PGGAN log, the last epoch at each side (fully faded in), smallest side first; [] for DCGAN."""
    last = {r["side"]: r["epoch"] for r in rows if "side" in r}
    return [last[s] for s in sorted(last)]


def _growth(stage_dir: Path) -> tuple[bytes, str] | None:
    """The first model's sample grids at each side it grew through, stacked top to bottom."""
    logs = sorted(stage_dir.glob("*/log.jsonl"))
    if not logs:
        raise FileNotFoundError(f"{stage_dir} has no <model>/log.jsonl; run train_gan")
    rows = [json.loads(line) for line in logs[0].read_text().splitlines() if line]
    epochs = _growth_epochs(rows)
    if not epochs:
        return None
    grids = [np.asarray(Image.open(_existing(logs[0].parent / "grids" / f"{e:03d}.png"))) for e in epochs]
    gap = np.full((6, *grids[0].shape[1:]), 255, np.uint8)
    side = {r["epoch"]: r["side"] for r in rows}
    caption = (f"PGGAN growth of model {logs[0].parent.name}, top to bottom: "
               + ", ".join(f"epoch {e} ({side[e]} px)" for e in epochs))
    return _png(np.concatenate([x for g in grids for x in (gap, g)][1:])), caption


def _score_plot(scores_csv: Path, checkpoints: list[int]) -> bytes:
    """SWD and KID per epoch (mean over the stage's models), dotted lines at the checkpoints used."""
    df = pd.read_csv(_existing(scores_csv))
    if missing := {"epoch", "swd", "kid"} - set(df.columns):
        raise ValueError(f"{scores_csv} lacks column(s) {', '.join(sorted(missing))}")
    fig = Figure(figsize=(8, 2.6), layout="constrained")
    for i, key in enumerate(("swd", "kid")):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(df["epoch"], df[key], marker="o", ms=3)
        for e in checkpoints:
            ax.axvline(e, color="gray", ls=":", lw=1)
        ax.set_xlabel("epoch")
        ax.set_title(f"{key.upper()} (lower is better)", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# ---- sections: lists of blocks ("h1".."h3", text) | ("p", text) | ("table", header, rows)
#      | ("img", file, png, caption)

def _ci(d: dict, percent: bool = False) -> str:
    f = (lambda x: f"{100 * x:.1f}%") if percent else (lambda x: f"{x:.3f}")
    return f"{f(d['value'])} [{f(d['low'])}, {f(d['high'])}]"


def _table3(summary: dict) -> list:
    rows = [[TASK_NAMES[task], MODEL_NAMES[model], _ci(v["real"]), _ci(v["synthetic"]), _ci(v["drop"], True),
             "{:.2f} → {:.2f} ({:.2f}%)".format(*STUDY_TABLE3[task][model][:2], 100 * STUDY_TABLE3[task][model][2])]
            for task, row in summary.items() if task != "claims" for model, v in row.items()]
    return [("h2", "Table 3: accuracy trained on real → trained on synthetic, tested on real"),
            ("p", "Values with 95% bootstrap intervals over the real test set (first seed); the relative drop "
                  "(real - synthetic) / real has a paired interval. The last column is the study's result."),
            ("table", ["task", "model", "real", "synthetic", "relative drop", "study"], rows)]


def _claim(claims: dict) -> list:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    verdict = {True: "holds here", False: "does not hold here",
               None: "cannot be checked here (it needs a deep and an LBP model)"}[claims["deep_drop_below_lbp"]]
    return [("h2", "The study's claim"),
            ("p", "The study found that training on synthetic instead of real images costs the deep model (VGG16) "
                  "2.2-3.5% of its accuracy and the LBP models (k-NN, SVM, RF) 5.5-13.25%. Mean relative drop over "
                  f"the tasks here: deep {pct(claims['deep_drop_mean'])} "
                  f"(study {pct(claims['study_deep_drop_mean'])}), "
                  f"LBP {pct(claims['lbp_drop_mean'])} (study {pct(claims['study_lbp_drop_mean'])}). "
                  f"The claim that the deep model loses less than the LBP models {verdict}.")]


def _task_sets(tasks_json: Path) -> list:
    tasks = _read_json(tasks_json)
    order = [t for t in TASKS if t in tasks] + [t for t in tasks if t not in TASKS]
    rows = [[TASK_NAMES.get(t, t), *(tasks[t][k]["images"] for k in ("real", "synthetic", "test")),
             tasks[t]["test"]["side"]] for t in order]
    return [("h2", "Benchmark sets (Table 2)"),
            ("table", ["task", "train real", "train synthetic", "test (real)", "side px"], rows)]


def _gan_table(metrics_dir: Path, gan_names: list[str]) -> list:
    rows = []
    for name in gan_names:
        g, s = _read_json(metrics_dir / "gan" / f"{name}.json"), _read_json(metrics_dir / "synthesize" / f"{name}.json")
        epochs = sorted(set(s["checkpoint_epochs"].values()))
        rows.append([name, f"{g['swd_best']:.4f}", f"{g['kid_best']:.4f}",
                     str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}",
                     f"{s['rejection_rate']:.1%}" if s["hash_screen"] else "off",
                     f"{s['real_rejection_rate']:.1%}", f"{s['copy_check']['share_closer']:.1%}",
                     f"{s['copy_check']['threshold']:.3f}"])
    return [("h2", "GAN stages"),
            ("p", "SWD/KID: the best epoch's scores (mean over the stage's models). Hash screen: share of drawn "
                  "synthetic images rejected for lacking a body shape, and the share of real test images the same "
                  "screen would reject. Copy check: share of synthetic images closer to a real training image than "
                  "the 1% quantile of real test images' nearest-neighbour distances (the threshold)."),
            ("table", ["stage", "SWD best", "KID best", "checkpoint epoch", "hash rejected", "real rejected",
                       "closer than real", "copy threshold"], rows)]


def _stage(name: str, metrics_dir: Path, models_dir: Path, groups_dir: Path, synthetic_dir: Path,
           samples: int, seed: int) -> list:
    parts = name.split("-")
    if len(parts) != 3:
        raise ValueError(f"GAN stage name must be <arch>-<group>-<setup>, got {name!r}")
    real, syn, labels = _sample_pairs(ImageSet(groups_dir / parts[1] / "train"), ImageSet(synthetic_dir / name),
                                      samples, seed)
    checkpoints = sorted(set(_read_json(metrics_dir / "synthesize" / f"{name}.json")["checkpoint_epochs"].values()))
    blocks = [("h3", name),
              ("img", f"{name}-samples.png", _png(_tile(np.concatenate([real, syn]), len(real))),
               f"Top: real training images; bottom: synthetic images of the same labels ({', '.join(labels)})."),
              ("img", f"{name}-scores.png", _score_plot(metrics_dir / "gan" / "scores" / f"{name}.csv", checkpoints),
               "SWD and KID of each epoch's checkpoint; dotted: the epoch(s) the synthetic set was drawn from.")]
    if growth := _growth(models_dir / name):
        blocks.append(("img", f"{name}-growth.png", *growth))
    closest = _existing(metrics_dir / "synthesize" / f"{name}-closest.png").read_bytes()
    return blocks + [("img", f"{name}-closest.png", closest,
                      "The synthetic images closest to a real training image (top) and that image (bottom).")]


# ---- rendering ----

def _markdown(blocks: list) -> str:
    def row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    out = []
    for kind, *a in blocks:
        if kind[0] == "h":
            out.append("#" * int(kind[1]) + " " + a[0])
        elif kind == "p":
            out.append(a[0])
        elif kind == "table":
            out.append("\n".join([row(a[0]), "|---" * len(a[0]) + "|", *map(row, a[1])]))
        else:
            out.append(f"![{a[0]}](figures/{a[0]})\n\n*{a[2]}*")
    return "\n\n".join(out) + "\n"


def _html(blocks: list) -> str:
    e = html.escape
    out = []
    for kind, *a in blocks:
        if kind[0] == "h":
            out.append(f"<{kind}>{e(a[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(a[0])}</p>")
        elif kind == "table":
            cells = lambda tag, r: "<tr>" + "".join(f"<{tag}>{e(str(c))}</{tag}>" for c in r) + "</tr>"  # noqa: E731
            out.append("<table>" + cells("th", a[0]) + "".join(cells("td", r) for r in a[1]) + "</table>")
        else:
            out.append(f'<figure><img alt="{e(a[0])}" src="data:image/png;base64,{base64.b64encode(a[1]).decode()}">'
                       f"<figcaption>{e(a[2])}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(TITLE)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def table3_markdown(summary: dict) -> str:
    """Table 3 beside the study's and the verdict on its claim, as Markdown (the report's first section)."""
    return _markdown([*_table3(summary), *_claim(summary["claims"])])


def write_report(metrics_dir: Path, models_dir: Path, groups_dir: Path, synthetic_dir: Path, gan_names: list[str],
                 out_dir: Path, *, samples: int = 8, seed: int = 0) -> None:
    """Write out_dir/report.md with its PNGs under out_dir/figures/, and a self-contained out_dir/report.html.
    `samples` real and synthetic images per GAN stage are drawn with `seed`."""
    metrics_dir, models_dir, groups_dir, synthetic_dir, out_dir = map(
        Path, (metrics_dir, models_dir, groups_dir, synthetic_dir, out_dir))
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    summary = summarise(metrics_dir)
    blocks = [("h1", TITLE), *_table3(summary), *_claim(summary["claims"]),
              *_task_sets(metrics_dir / "tasks.json"), *_gan_table(metrics_dir, gan_names)]
    for name in gan_names:
        blocks += _stage(name, metrics_dir, models_dir, groups_dir, synthetic_dir, samples, seed)
    for kind, *a in blocks:
        if kind == "img":
            _atomic_write(out_dir / "figures" / a[0], a[1])
    _atomic_write(out_dir / "report.md", _markdown(blocks).encode())
    _atomic_write(out_dir / "report.html", _html(blocks).encode())

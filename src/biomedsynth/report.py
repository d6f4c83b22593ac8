"""The report stage: Table 3 with its intervals, flags and verdict (from metrics/summary.json, the table3
stage's) beside the study's numbers, per GAN stage the figures that show what the synthetic images look
like and how they were picked and checked, the architectures that trained the same set side by side, and the
generators compared (tasks.compare): each one's drops against each task's own, per model family.

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

from biomedsynth.classify.benchmark import arm_of
from biomedsynth.evidence import RULE
from biomedsynth.store import ImageSet
from biomedsynth.table3 import DROPS, FAMILIES, HEADLINE, forest_rows
from biomedsynth.tasks import TASKS

TASK_NAMES = {"histology": "histology", "xray_sex": "X-ray sex", "xray_age": "X-ray age"}
MODEL_NAMES = {"vgg16": "VGG16", "knn": "k-NN", "svm": "SVM", "rf": "RF"}
TITLE = "biomedsynth: can synthetic images stand in for real ones?"
CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;font-size:90%}th,td{border:1px solid #ccc;padding:3px 8px}"
       "th{background:#f2f2f2}td{text-align:right}td:first-child,td:nth-child(2){text-align:left}"
       "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:85%;color:#555}")


# ---- files ----

def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")  # a leftover the next run removes
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


def _same_labels(synthetic: ImageSet, labels: list[str], seed: int) -> np.ndarray:
    """Images of `synthetic` with these labels, in this order; a label's images without repeats where it has enough."""
    rng = np.random.default_rng(seed)
    pool = synthetic.meta["label"].to_numpy()
    images = []
    for label in dict.fromkeys(labels):  # _sample_pairs lists each label's images together
        idx, k = np.flatnonzero(pool == label), labels.count(label)
        if not len(idx):
            raise ValueError(f"{synthetic.path} has no image of label {label!r}")
        images += [synthetic[int(i)] for i in rng.choice(idx, k, replace=len(idx) < k)]
    return np.stack(images)


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
    def f(x):
        return "n/a" if x is None else f"{100 * x:.1f}%" if percent else f"{x:.3f}"
    return f"{f(d['value'])} [{f(d['low'])}, {f(d['high'])}]"


def _cells(summary: dict):
    """(task, model, cell) in the study's order: histology, X-ray sex, X-ray age; VGG16, k-NN, SVM, RF."""
    return [(t, m, summary[t][m]) for t in TASKS if t in summary for m in MODEL_NAMES if m in summary[t]]


def _table3(summary: dict) -> list:
    left_out = summary["claims"]["cells_left_out"]
    rows = []
    for task, model, v in _cells(summary):
        flags = "; ".join(f"{arm}: {', '.join(r)}" for arm, r in v["degenerate_reasons"].items())
        gan = v["gan"]
        gan_flag = ("GAN LEARNT NOTHING (" + ", ".join(gan["not_learnt"]) + ")" if gan["not_learnt"]
                    else "GAN still improving" if gan["still_improving"] else "")
        if gan["copying"]:
            gan_flag = "; ".join(f for f in ("SET COPIES TRAINING IMAGES (" + ", ".join(gan["copying"]) + ")",
                                             gan_flag) if f)
        study = v["study"]
        replicates = " / ".join(f"{a:.2f}" for a in v["replicate_accuracies"]["synthetic"])
        rows.append([TASK_NAMES[task], v.get("model_name", MODEL_NAMES[model]), _ci(v["real"]),
                     _ci(v["synthetic"]) + (f" ({replicates})" if v["replicates"] > 1 else ""),
                     _ci(v["real_synthetic"]) if "real_synthetic" in v
                     else v.get("not_trained", {}).get("real_synthetic", "n/a"),
                     _ci(v["drop"], True), _ci(v["drop_chance_normalised"], True),
                     "; ".join(f for f in (f"DEGENERATE ({flags})" if v["degenerate"] else "", gan_flag) if f)
                     or "ok", "no" if f"{task}/{model}" in left_out else "yes",
                     "{:.2f} → {:.2f} ({:.2f}%)".format(study["real"], study["synthetic"], 100 * study["drop"])])
    claims = summary["claims"]
    variance = (f"the mean over {claims['replicates']} replicates (replicate r: training seed r on synthetic draw r; "
                "each replicate's synthetic accuracy in brackets), with 95% intervals from a bootstrap over the "
                "replicates, then the test set's patients (X-ray) or slides (histology)" if claims["replicates"] > 1
                else "one replicate, so its interval covers the test set only: "
                     "seed and draw variance not measured (classify.replicates: 1)")
    return [("h2", "Table 3: accuracy trained on real → trained on synthetic, tested on real"),
            ("p", f"Accuracy on the real test set: {variance}. Intervals: "
                  + "; ".join(f"{TASK_NAMES[t]} {m}" for t, m in claims["bootstrap"]["interval_per_task"].items())
                  + ". Drops are paired over the same resamples: relative (real - synthetic) / real, and "
                  "chance-normalised (real - synthetic) / (real - 0.5). DEGENERATE: a model predicts one class for "
                  ">= 95% of the test images or its accuracy interval contains chance. A cell is in the verdict "
                  "unless it measures nothing: its real arm is degenerate, or a GAN behind its synthetic set learnt "
                  "nothing or copies training images. A degenerate synthetic arm stays in: that is the cost "
                  "measured. The last column is the study's result."),
            ("table", ["task", "model", "real", "synthetic", "real + synthetic", "relative drop",
                       "chance-normalised drop", "flag", "in verdict", "study"], rows)]


def _claim(claims: dict) -> list:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    v = claims[HEADLINE]
    task_rows = [[TASK_NAMES[t], pct(r.get("deep_drop")), pct(r.get("lbp_drop")),
                  _ci(r["contrast"], True) if r["contrast"] else r["reason"], f"{r['deep_cells']} + {r['lbp_cells']}"]
                 for t, r in v["per_task"].items()]
    rows = [[DROPS[kind], claims[kind]["verdict"],
             "n/a" if claims[kind]["difference"] is None else _ci(claims[kind]["difference"], True),
             claims[kind]["tasks_used"], claims[kind]["cells_used"]] for kind in DROPS]
    sens = claims["sensitivity"]
    sensitivity = (f"Sensitivity, not the verdict: {sens['rule']} leaves out {len(sens['cells_also_left_out'])} more "
                   f"cells ({', '.join(sens['cells_also_left_out']) or 'none'}) and gives "
                   + ("no answer (no task keeps a deep and an LBP cell)" if sens["difference"] is None else
                      f"{sens['verdict']}, {_ci(sens['difference'], True)}") + f" over {sens['cells_used']} cells.")
    return [("h2", "The study's claim"),
            ("p", claims["sentence"]),
            ("table", ["task", f"deep drop ({DROPS[HEADLINE].split(' (')[0]})", "mean LBP drop",
                       "LBP - deep [95%]", "cells (deep + LBP)"], task_rows),
            ("table", ["drop measure", "verdict", "mean over tasks of LBP - deep [95%]", "tasks", "cells"], rows),
            ("p", sensitivity),
            ("p", "The study found that training on synthetic instead of real images costs the deep model (VGG16) "
                  "2.2-3.5% of its accuracy and the LBP models (k-NN, SVM, RF) 5.5-13.25% (mean relative drop "
                  f"{pct(claims['study_deep_drop_mean'])} vs {pct(claims['study_lbp_drop_mean'])}). The verdict "
                  f"uses the {DROPS[HEADLINE]}, each task's LBP - deep contrast weighing alike; the relative drop's "
                  "is shown beside."
                  + (" Left out, as measuring nothing: " + "; ".join(f"{c} ({r})" for c, r in
                                                                     claims["cells_left_out"].items()) + "."
                     if claims["cells_left_out"] else ""))]


def _forest(summary: dict) -> bytes:
    """The verdict at a glance: each cell's chance-normalised drop, each task's LBP - deep contrast and the verdict
    with their 95% intervals (hollow: left out of the verdict), the study's values as grey ticks, zero marked."""
    rows = forest_rows(summary)
    fig = Figure(figsize=(8, 0.32 * len(rows) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    ys = np.arange(len(rows))[::-1]
    colours = {"cell": "#4c72b0", "task": "#dd8452", "verdict": "#c44e52"}
    for y, (_, r) in zip(ys, rows.iterrows()):
        colour = colours[r["kind"]]
        if pd.notna(r["low"]) and pd.notna(r["high"]):
            ax.plot([r["low"], r["high"]], [y, y], color=colour, lw=3 if r["kind"] == "verdict" else 1.5)
        if pd.notna(r["value"]):
            ax.plot(r["value"], y, "o", color=colour, mfc=colour if r["in_verdict"] else "white", ms=6)
        ax.plot(r["study"], y, "|", color="gray", ms=12, mew=2)
    ax.axvline(0, color="black", lw=0.8)
    names = {**TASK_NAMES, **MODEL_NAMES}
    ax.set_yticks(ys, [" ".join(names.get(w, w) for w in r.split(" ")) for r in rows["row"]], fontsize=8)
    ax.set_xlabel("chance-normalised drop (cells), LBP - deep (tasks, verdict); grey: the study")
    ax.set_title(f"Does synthetic data cost VGG16 less than the LBP models? {summary['claims']['verdict']}",
                 fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _task_sets(tasks_json: Path) -> list:
    tasks = _read_json(tasks_json)
    order = [t for t in TASKS if t in tasks]  # beside them: `provenance`
    def clusters(s):
        return " / ".join(str(s.get("clusters_per_class", {}).get(c, "?")) for c in ("0", "1"))
    rows = [[TASK_NAMES.get(t, t), tasks[t]["real"]["images"], tasks[t]["synthetic"]["images"],
             sum(1 for k in tasks[t] if arm_of(k) == "synthetic"), tasks[t]["test"]["images"],
             clusters(tasks[t]["test"]), tasks[t]["test"]["side"]] for t in order]
    return [("h2", "Benchmark sets (Table 2)"),
            ("table", ["task", "train real", "train synthetic (per draw)", "synthetic draws", "test (real)",
                       "test patients/slides per class (0 / 1)", "side px"], rows)]


def _num(x, spec: str) -> str:
    """A number formatted by `spec`, or n/a where it is undefined (e.g. C_T with no cell holding enough samples)."""
    return "n/a" if x is None else format(x, spec)


def _gan_table(metrics_dir: Path, gan_names: list[str]) -> list:
    gan_rows, evidence_rows = [], []
    for name in gan_names:
        g, s = _read_json(metrics_dir / "gan" / f"{name}.json"), _read_json(metrics_dir / "synthesize" / f"{name}.json")
        epochs = sorted(set(s["checkpoint_epochs"].values()))
        rule = s.get("checkpoint_rule", {"rule": "best"})
        swd_epochs = sorted(set(rule.get("swd_best_epochs", {}).values()))
        gan_rows.append([name, f"{g['swd_best']:.4f} ({g['swd_floor']:.4f})", f"{g['kid_best']:.4f} ({g['kid_floor']:.4f})",
                         f"{g['models_learnt']}/{g['models']}" + ("" if g["learnt"] else " NOT LEARNT"),
                         "yes" if g["still_improving"] else "no",
                         (str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}") + f" ({rule['rule']}"
                         + (f"; SWD's: {', '.join(map(str, swd_epochs))}" if swd_epochs else "") + ")",
                         f"{s['rejection_rate']:.1%} ({s['hash_threshold']} bits, {s['hash_threshold_source']})"
                         if s["hash_screen"] else "off", f"{s['real_rejection_rate']:.1%}"])
        e = s["evidence"]
        px, ft = e["pixels"], e["features"]
        evidence_rows.append([name, f"{ft['prdc']['precision']:.2f} ({ft['prdc_heldout']['precision']:.2f})",
                              f"{ft['prdc']['coverage']:.2f} ({ft['prdc_heldout']['coverage']:.2f})",
                              f"{_num(px['c_t'], '+.1f')} / {_num(ft['c_t'], '+.1f')}",
                              f"{ft['authentic']:.2f} ({ft['authentic_heldout']:.2f})",
                              f"{e['near_duplicates']} of {e['images']['synthetic']}",
                              " / ".join(_membership(e[space]["membership"]) for space in ("pixels", "features")),
                              "COPYING" if e["copying"] else "no", FEATURE_NET_MARK[ft.get("reliable")]])
    return [("h2", "GAN stages"),
            ("p", "SWD/KID: the best epoch's scores against held-out validation images (mean over the stage's "
                  "models), the real floor (training images scored the same way) in brackets. Learnt: models whose "
                  "best SWD is clearly below that of noise or blurred images. Still improving: a model's best epoch "
                  "is among its last and the score still falls (more epochs would help). Hash screen: share of drawn "
                  "synthetic images rejected for lacking a body shape (threshold and where it came from), and the "
                  "share of real test images the same screen would reject."),
            ("table", ["stage", "SWD best (floor)", "KID best (floor)", "learnt", "still improving",
                       "checkpoint epoch", "hash rejected", "real rejected"], gan_rows),
            ("h2", "Evidence about each synthetic set"),
            ("p", "In the modality's feature net space: precision (fidelity) and coverage (diversity; a collapsed "
                  "generator scores near 0), held-out real images' values in brackets; the data-copying statistic "
                  "C_T in pixel-PCA / feature space (well below 0, e.g. < -3: samples sit closer to training "
                  "images than held-out real ones do); the authentic share (held-out real images' in brackets); "
                  "near-duplicates of a training image in any space; the membership-inference AUC in pixel-PCA / "
                  "feature space (GAN-Leaks' full black-box attack: a real image scores its distance to the closest "
                  "synthetic image; the AUC at telling training images from held-out ones, 95% cluster-bootstrap "
                  "interval over patients; 0.5: no measurable leak, 1: every training image exposed). Rule: " + RULE
                  + ". Feature net: whether the modality's net beats chance on held-out images (metrics/feature_net); "
                  "where it does not, every feature-space number in this row, and the stage's KID above, is "
                  "unreliable (the warnings say by how much)."),
            ("table", ["stage", "precision (real)", "coverage (real)", "C_T pixels / features",
                       "authentic (real)", "near-duplicates", "membership AUC pixels / features", "copying",
                       "feature net"], evidence_rows)]


# the features space's mark in synthesize's evidence -> the evidence table's cell (None: drawn by an older version)
FEATURE_NET_MARK = {True: "beats chance", False: "NOT above chance: unreliable", None: "not tested"}


def _membership(m: dict) -> str:
    """A membership AUC with its interval, as the evidence table shows it."""
    return f"{m['value']:.2f} [{_num(m['low'], '.2f')}, {_num(m['high'], '.2f')}]"


def _synthetic_accuracies(summary: dict, stage: str) -> str:
    """Table 3's synthetic-arm accuracies of the cells trained on GAN stage `stage`'s set (its own or a compared
    generator's), per task."""
    by_task: dict[str, list[str]] = {}
    for task, model, v in _cells(summary) + [c for g in summary.get("generators", {}).values() for c in _cells(g)]:
        if stage in v["gan"]["stages"]:
            value = v["synthetic"]["value"]
            by_task.setdefault(task, []).append(f"{MODEL_NAMES[model]} {'n/a' if value is None else f'{value:.3f}'}")
    return "; ".join(f"{TASK_NAMES[t]}: {', '.join(cells)}" for t, cells in by_task.items()) or "not benchmarked"


def _shared_sets(gan_names: list[str]) -> dict[str, list[str]]:
    """{set (group-setup): its GAN stages} of the sets more than one architecture trained."""
    by_set: dict[str, list[str]] = {}
    for name in gan_names:
        by_set.setdefault(name.split("-", 1)[1], []).append(name)
    return {set_name: names for set_name, names in by_set.items() if len(names) > 1}


def _architecture_table(summary: dict, metrics_dir: Path, gan_names: list[str]) -> list:
    """The architectures side by side, per set several trained: scores, memorisation and Table 3 accuracies."""
    rows = []
    for set_name, names in _shared_sets(gan_names).items():
        for name in names:
            g = _read_json(metrics_dir / "gan" / f"{name}.json")
            e = _read_json(metrics_dir / "synthesize" / f"{name}.json")["evidence"]
            rows.append([set_name, name.split("-")[0], f"{g['swd_best']:.4f} ({g['swd_floor']:.4f})",
                         f"{g['kid_best']:.4f} ({g['kid_floor']:.4f})",
                         f"{g['models_learnt']}/{g['models']}" + ("" if g["learnt"] else " NOT LEARNT"),
                         f"{_num(e['pixels']['c_t'], '+.1f')} / {_num(e['features']['c_t'], '+.1f')}",
                         f"{e['near_duplicates']} of {e['images']['synthetic']}",
                         "COPYING" if e["copying"] else "no", _synthetic_accuracies(summary, name)])
    if not rows:
        return []
    return [("h2", "Architectures side by side"),
            ("p", "Each set trained by more than one architecture: SWD/KID of the best epoch (real floor in brackets), "
                  "models that learnt, the memorisation evidence (C_T in pixel-PCA / feature space, near-duplicates "
                  "of a training image, the verdict: see Evidence), and the synthetic arm's accuracy in Table 3 "
                  "where the benchmark trained on that architecture's set (tasks.*.arch, or tasks.compare)."),
            ("table", ["set", "architecture", "SWD best (floor)", "KID best (floor)", "learnt",
                       "C_T pixels / features", "near-duplicates", "copying", "Table 3 synthetic accuracy"], rows)]


def _side_by_side(summary: dict, metrics_dir: Path, groups_dir: Path, synthetic_dir: Path, gan_names: list[str],
                  samples: int, seed: int) -> list:
    """The architectures' table (_architecture_table) and, per set several trained, one figure of real images above
    each architecture's images of the same labels."""
    figures = []
    for set_name, names in _shared_sets(gan_names).items():
        real, first, labels = _sample_pairs(ImageSet(groups_dir / set_name.split("-")[0] / "train"),
                                            ImageSet(synthetic_dir / names[0]), samples, seed)
        others = [_same_labels(ImageSet(synthetic_dir / name), labels, seed) for name in names[1:]]
        figures.append(("img", f"{set_name}-architectures.png", _png(_tile(np.concatenate([real, first, *others]),
                                                                          len(real))),
                        f"{set_name}, top to bottom: real training images, then "
                        f"{', '.join(n.split('-')[0] for n in names)} images of the same labels ({', '.join(labels)})."))
    return [*_architecture_table(summary, metrics_dir, gan_names), *figures]


def _stage(name: str, metrics_dir: Path, models_dir: Path, groups_dir: Path, synthetic_dir: Path,
           evidence_dir: Path, samples: int, seed: int) -> list:
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
    closest = _existing(evidence_dir / name / "closest.png").read_bytes()
    return blocks + [("img", f"{name}-closest.png", closest,
                      "The synthetic images closest to a real training image, in pixel-PCA and in feature space, "
                      "above that training image.")]


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


def _provenance(summary: dict) -> list:
    p = summary.get("provenance") or {}
    sources = p.get("sources") or {}
    read = "; ".join(f"{m}: {s.get('format')} from {s.get('root')}" for m, s in sources.items()) or "unknown"
    blocks = [("p", f"Data: data.dvc {p.get('data') or 'unknown'} ({read}); Table 3 made at commit "
                    f"{(p.get('commit') or 'unknown')[:10]}.")]
    return blocks + [("p", f"WARNING: {w}") for w in summary.get("warnings", [])]


def _generators(summary: dict) -> list:
    """Per compared generator (tasks.compare): its answer, per model family own drop - its drop per task and over
    tasks, and its Table 3 beside the own sets'."""
    blocks = []
    for arch, g in summary.get("generators", {}).items():
        tasks = [t for t in TASKS if t in g["deep"]["per_task"]]  # the study's order (summary.json sorts its keys)
        family_rows = [[{"deep": "VGG16", "lbp": "LBP (k-NN, SVM, RF)"}[family],
                        *(_ci(t["difference"], True) if t["difference"] else t["reason"]
                          for t in (g[family]["per_task"][task] for task in tasks)),
                        _ci(g[family]["difference"], True) if g[family]["difference"] else g[family]["reason"],
                        g[family]["verdict"], g[family]["cells_used"]] for family in FAMILIES]
        cell_rows = [[TASK_NAMES[task], v.get("model_name", MODEL_NAMES[model]), _ci(v["real"]),
                      _ci(summary[task][model]["synthetic"]), _ci(v["synthetic"]),
                      _ci(summary[task][model]["drop_chance_normalised"], True), _ci(v["drop_chance_normalised"], True),
                      _ci(v["own_drop_minus_this"], True), "; ".join(f"{arm}: {', '.join(r)}" for arm, r in
                                                                      v["degenerate_reasons"].items()) or "ok",
                      "no" if f"{task}/{model}" in g["cells_left_out"] else "yes"]
                     for task, model, v in _cells(g)]
        claim = g["claim"]
        blocks += [("h2", f"Generators compared: {arch} against each task's own"),
                   ("p", g["sentence"] + f" Its own Table 3's claim (LBP drop - deep drop, with its sets): "
                    + (f"{claim['verdict']}, {_ci(claim['difference'], True)}" if claim["difference"] else
                       f"no answer ({claim['reason']})") + f" over {claim['cells_used']} cells."
                    + (" Left out: " + "; ".join(f"{c} ({r})" for c, r in g["cells_left_out"].items()) + "."
                       if g["cells_left_out"] else "")),
                   ("table", ["model family", *(f"{TASK_NAMES[t]}: own - {arch}" for t in tasks),
                              "mean over tasks [95%]", "verdict", "cells"], family_rows),
                   ("table", ["task", "model", "real", "synthetic (own)", f"synthetic ({arch})", "drop (own)",
                              f"drop ({arch})", f"own - {arch}", "flag", "compared"], cell_rows)]
    return blocks


def table3_markdown(summary: dict) -> str:
    """The verdict on the study's claim, each task's contrast, Table 3 beside the study's and the generators
    compared, as Markdown: the report's first section, the review page's smoke table and the README's results
    (readme_with_table3)."""
    return _markdown([*_claim(summary["claims"]), *_table3(summary), *_generators(summary)])


def generators_markdown(results: Path) -> str:
    """A generators-compared experiment's answer as Markdown, from its metrics kept under `results` (summary.json,
    gan/ and synthesize/ of its own and compared stages, run.json: how it ran): each compared generator's section,
    then the architectures side by side."""
    summary = _read_json(Path(results) / "summary.json")
    run = _read_json(Path(results) / "run.json")  # how it was run: command, params changed, wall time, machine,
    # and a note where the wall time needs one (an interrupted and resumed run)
    stages = sorted({s for table in (summary, *summary["generators"].values()) for _, _, cell in _cells(table)
                     for s in cell["gan"]["stages"]})
    made = (f"`{run['command']}` on the committed default: {run['wall_s'] / 60:.0f} min on {run['machine']} "
            f"({', '.join(run['params'])}); Table 3 made at commit {summary['provenance']['commit'][:10]}."
            + (f" {run['note']}" if run.get("note") else ""))
    return _markdown([("p", made), *_generators(summary), *_architecture_table(summary, Path(results), stages)])


README_BLOCKS = {  # marker name -> (what writes it, from where)
    "table3": "metrics/summary.json",
    "generators": "docs/results/generators (a `dvc exp run` with tasks.compare: its summary.json, gan/, synthesize/)"}


def readme_markers(name: str) -> tuple[str, str]:
    return (f"<!-- {name}: written by `biomedsynth readme` from {README_BLOCKS[name]}; edits here are overwritten -->",
            f"<!-- /{name} -->")


README_START, README_END = readme_markers("table3")


def readme_with_block(readme: str, name: str, markdown: str) -> str:
    """The README with the block between its `name` markers (readme_markers) rewritten as `markdown`."""
    start, end = readme_markers(name)
    if readme.count(start) != 1 or readme.count(end) != 1:
        raise ValueError(f"the README needs one {start!r} line and one {end!r} line")
    head, rest = readme.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{markdown}{end}{tail}"


def readme_with_table3(readme: str, summary: dict) -> str:
    """The README with the block between its table3 markers rewritten from the summary, so the numbers it
    states are the committed metrics'."""
    return readme_with_block(readme, "table3", table3_markdown(summary))


def run_warnings(summary: dict, metrics_dir: Path, gan_names: list[str]) -> list[str]:
    """What a reader of this run must know before its numbers, one short line each: ingest's warnings about the
    data, feature nets no better than chance (the KID, PRDC and C_T in their space are unreliable), Table 3's
    left-out cells and degenerate arms, unmeasured replicate variance, GANs that learnt nothing or were still
    improving, sets flagged as copying. The report leads with them and `report` prints them, so the end of
    `dvc repro` repeats what each stage warned about on its way; each exported set's datasheet repeats them too."""
    lines = [f"data: {w}" for w in summary.get("warnings", [])]
    for modality in ("xray", "histology"):
        net = metrics_dir / "feature_net" / f"{modality}.json"
        lines += [f"feature_net@{modality}: {w}" for w in (_read_json(net).get("warnings", []) if net.is_file() else [])]
    claims = summary["claims"]
    lines += [f"Table 3 leaves out {cell}: {why}" for cell, why in claims.get("cells_left_out", {}).items()]
    lines += [f"the {arch} comparison leaves out {cell}: {why}" for arch, g in summary.get("generators", {}).items()
              for cell, why in g["cells_left_out"].items()]
    if claims.get("replicate_variance") != "measured":
        lines.append("seed and draw variance not measured: one replicate (classify.replicates)")
    # a compared generator's cells hold the same real arm as the own ones: only its synthetic arm is news
    tables = [("", summary, set()), *((f"the {arch} comparison: ", g, {"real"})
                                      for arch, g in summary.get("generators", {}).items())]
    lines += [f"{prefix}{TASK_NAMES[task]} {MODEL_NAMES[model]} {arm} arm degenerate: {'; '.join(why)}"
              for prefix, table, shown in tables for task, model, cell in _cells(table)
              for arm, why in cell.get("degenerate_reasons", {}).items() if arm not in shown]
    for name in gan_names:
        g = _read_json(metrics_dir / "gan" / f"{name}.json")
        if not g["learnt"]:
            lines.append(f"GAN {name}: {g['models'] - g['models_learnt']} of {g['models']} model(s) learnt nothing")
        if g.get("still_improving"):
            lines.append(f"GAN {name}: still improving at its last epoch (train it longer)")
        evidence = _read_json(metrics_dir / "synthesize" / f"{name}.json").get("evidence", {})
        if evidence.get("copying"):
            lines.append(f"synthetic set {name}: flagged as copying training images (the export refuses it)")
    return lines


def write_report(metrics_dir: Path, models_dir: Path, groups_dir: Path, synthetic_dir: Path, evidence_dir: Path,
                 gan_names: list[str], out_dir: Path, *, samples: int = 8, seed: int = 0) -> list[str]:
    """Write out_dir/report.md with its PNGs under out_dir/figures/, and a self-contained out_dir/report.html.
    `samples` real and synthetic images per GAN stage are drawn with `seed`."""
    metrics_dir, models_dir, groups_dir, synthetic_dir, evidence_dir, out_dir = map(
        Path, (metrics_dir, models_dir, groups_dir, synthetic_dir, evidence_dir, out_dir))
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    summary = _read_json(metrics_dir / "summary.json")
    forest = ("img", "forest.png", _forest(summary),
              "Each cell's chance-normalised drop, each task's LBP - deep contrast and the verdict (their mean), with "
              "95% intervals; hollow: left out of the verdict; grey ticks: the study's values; the verdict holds "
              "when its interval lies right of 0.")
    warnings = run_warnings(summary, metrics_dir, gan_names)
    blocks = [("h1", TITLE), forest, *_claim(summary["claims"]),
              ("p", f"{len(warnings)} warning(s): " + " / ".join(warnings) if warnings else "No warnings."),
              *_provenance(summary), *_table3(summary), *_generators(summary),
              *_task_sets(metrics_dir / "tasks.json"), *_gan_table(metrics_dir, gan_names),
              *_side_by_side(summary, metrics_dir, groups_dir, synthetic_dir, gan_names, samples, seed)]
    for name in gan_names:
        blocks += _stage(name, metrics_dir, models_dir, groups_dir, synthetic_dir, evidence_dir, samples, seed)
    for kind, *a in blocks:
        if kind == "img":
            _atomic_write(out_dir / "figures" / a[0], a[1])
    _atomic_write(out_dir / "report.md", _markdown(blocks).encode())
    _atomic_write(out_dir / "report.html", _html(blocks).encode())
    return warnings

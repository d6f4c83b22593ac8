"""The datasheet of an exported synthetic set (export.py): what it is, how it was made, how faithful, diverse,
private and useful it is, what it is for and where it falls short. Every field comes from the run's own
outputs (the set, the synthesize and GAN metrics, the study groups' counts, Table 3, dvc.lock); `unfilled`
names any that did not, and export refuses to write a datasheet with one.

Nothing here names a patient, a slide or a source file: the source data appears as counts per label and
side of the split, the DVC hash of the raw data and the format it was read in.
"""
from __future__ import annotations

import re

from biomedsynth.tasks import TASKS

MODALITY = {"xray": "chest X-ray, 8-bit grayscale", "histology": "lymph-node histology tile, RGB"}
# what the study groups' split kept apart (studygroups.json's split_unit), in words
SPLIT = {"patient": "by patient: no patient's scans sit on two sides",
         "slide": "by slide: no slide's tiles sit on two sides",
         "tile": "by tile, not by slide: ingest found tiles without slide ids, so each such tile was a unit of its "
                 "own; tiles of one slide may sit on both sides (training and held out), and no slide independence "
                 "is claimed"}
ARCH = {"dcgan": ("DCGAN", "Radford et al. 2016"), "pggan": ("PGGAN", "progressive growing, Karras et al. 2018"),
        "sg2ada": ("StyleGAN2-ADA", "adaptive discriminator augmentation, Karras et al. 2020"),
        "diffusion": ("Diffusion", "a denoising diffusion model: v-prediction UNet with classifier-free guidance, "
                      "Ho et al. 2020, Salimans & Ho 2022")}
SIDES = ("train", "val", "test")
SETUP = {"uncond": "one unconditional model per label", "cond": "one model conditional on the label"}
SPACE = {"pixels": "PCA of downsampled pixels", "features": "the KID feature net trained here",
         "hash": "the average hash (one bit per cell of the grayscale image)"}
# subtrees copied as they are from a settings file, where null is a setting ("not fixed"), not a missing value
VERBATIM = ("how_made.options", "how_made.synthesize_params")
PLACEHOLDER = re.compile(r"\b(todo|tbd|fixme|xxx|lorem|placeholder|fill in)\b|<[a-z _-]+>", re.I)


def arch_names(arch: str) -> tuple[str, str]:
    """(short name, what it is) of a generator's architecture."""
    return ARCH.get(arch, (arch, f"biomedsynth.gan.{arch}"))


def unfilled(sheet, path: str = "") -> list[str]:
    """Dotted paths of the datasheet's empty values: None, blank text, empty lists and dicts, and placeholder
    text (TODO, TBD, <...>); subtrees in VERBATIM are left as their settings file has them."""
    if path in VERBATIM:
        return []
    if isinstance(sheet, dict):
        if not sheet:
            return [path]
        return [p for k, v in sheet.items() for p in unfilled(v, f"{path}.{k}" if path else str(k))]
    if isinstance(sheet, list):
        return [path] if not sheet else [p for i, v in enumerate(sheet) for p in unfilled(v, f"{path}[{i}]")]
    if sheet is None or (isinstance(sheet, str) and (not sheet.strip() or PLACEHOLDER.search(sheet))):
        return [path]
    return []


def split_unit(group: str, studygroups: dict) -> str:
    """patient, slide or tile: what the study group's split kept apart, as the studygroups stage recorded it."""
    units = {s.get("split_unit") for s in studygroups[group].values()}
    if len(units) != 1 or not units <= set(SPLIT):
        raise ValueError(f"metrics/studygroups.json records no single split unit for {group} (found "
                         f"{sorted(map(str, units))}; written by an older version?); run the studygroups stage "
                         "again (dvc repro)")
    return units.pop()


def _source(group: str, modality: str, studygroups: dict, provenance: dict) -> dict:
    """The real data the generator learnt from: counts per side and label, never ids or file names, and what its
    split kept apart. Split by tile, no side is said to hold other slides than another."""
    unit = split_unit(group, studygroups)
    units = f"{unit}s"
    sides = {side: {"images": s["images"], "per_label": s["per_label"], units: s["units"]}
             for side, s in sorted(studygroups[group].items(), key=lambda kv: SIDES.index(kv[0]))}
    train, kind = sides["train"], MODALITY[modality].split(",")[0]
    if unit == "tile":
        description = (f"{train['images']:,} {kind} images (study group {group}'s training side) taught the "
                       f"generator; the validation side ({sides['val']['images']:,} images) scored its epochs, and the "
                       f"test side ({sides['test']['images']:,} images) served as the held-out baseline of the "
                       "memorisation test. The split was by tile: tiles of one slide may sit on both sides, so no "
                       "side is claimed to come from slides the others lack")
    else:
        description = (f"{train['images']:,} {kind} images of {train[units]:,} {units} (study group {group}'s "
                       f"training side) taught the generator; the validation side ({sides['val']['images']:,} images "
                       f"of other {units}) scored its epochs, and the test side ({sides['test']['images']:,} images of "
                       f"yet other {units}) served as the held-out baseline of the memorisation test")
    return {"group": group, "format": provenance["sources"][modality]["format"],
            "data_hash": provenance["data"] or "not recorded: the project has no data.dvc",
            "split_unit": unit, "split": f"split {SPLIT[unit]}", "description": description, "sides": sides}


def _checkpoint(synth: dict) -> dict:
    """The chosen epoch of each model and why it was chosen."""
    rule = synth["checkpoint_rule"]
    why = {"best": "the lowest sliced Wasserstein distance (SWD) of its samples to held-out validation images",
           "utility": "the highest balanced accuracy, on held-out validation images, of a linear probe of the labels "
                      "trained on its samples",
           "last": "the last epoch, as params synthesize.checkpoint asks"}.get(
        rule["rule"], f"fixed by params synthesize.checkpoint = {rule['rule']}")
    if "why" in rule:
        why += f" ({rule['why']})"
    out = {"epochs": synth["checkpoint_epochs"], "rule": rule["rule"], "why": why}
    if "balanced_accuracy_by_epoch" in rule:
        out["utility_by_epoch"] = rule["balanced_accuracy_by_epoch"]
    return out


def _dvc(name: str, lock: dict | None) -> dict | str:
    """The DVC hashes of the synthesize stage's data inputs, the generator and the set, as dvc.lock records them."""
    stage = (lock or {}).get("stages", {}).get(f"synthesize@{name}")
    if stage is None:
        return f"not recorded: dvc.lock has no synthesize@{name} (the set was not made by dvc repro)"
    hashes = lambda entries: {e["path"]: e.get("md5") or e.get("hash") for e in entries  # noqa: E731
                              if not e["path"].startswith("src/")}
    deps = hashes(stage.get("deps", []))
    return {"generator": deps.pop(f"models/gan/{name}"), "inputs": deps, "outputs": hashes(stage.get("outs", []))}


def _screen(synth: dict, modality: str) -> dict:
    if not synth["hash_screen"]:
        why = "the study screened DCGAN X-rays only" if modality == "xray" else "tiles have no global shape"
        return {"applied": False, "why": f"params synthesize.hash_screen leaves this set unscreened ({why})"}
    return {"applied": True, "threshold_bits": synth["hash_threshold"], "hash_size": synth["hash_size"],
            "threshold_from": (f"calibrated: the {synth['hash_quantile']:g} quantile of held-out (val) real images' "
                               "distances" if synth["hash_threshold_source"] != "params"
                               else "params synthesize.hash_threshold"),
            "drawn": synth["drawn"], "rejected": synth["rejected"], "rejection_rate": synth["rejection_rate"],
            "real_rejection_rate": synth["real_rejection_rate"]}


def _space_evidence(m: dict) -> dict:
    keep = ("nn_ratio_share", "nn_ratio_share_heldout", "near_copy_share", "near_copy_share_heldout", "near_copy_p",
            "authentic", "authentic_heldout", "dcr_share_below_q01", "dcr_median", "dcr_median_heldout", "copying")
    c_t = m["c_t"] if m["c_t"] is not None else "not computed: no k-means cell held enough synthetic images"
    return {"c_t": c_t, "c_t_cells_used": m["c_t_cells_used"], **{k: m[k] for k in keep}, **_reliability(m)}


def _reliability(m: dict) -> dict:
    """A space's reliable mark (synthesize sets it on the feature net's space) with why not, where it has one."""
    return {k: m[k] for k in ("reliable", "unreliable_because") if k in m}


def space_label(name: str, space: dict) -> str:
    """A space's name in the Markdown tables, marked where its numbers are unreliable."""
    return f"{name} (UNRELIABLE: its net is not better than chance)" if space.get("reliable") is False else name


def spaces(evidence: dict) -> dict[str, dict]:
    """The feature spaces of a synthesize `evidence` block (those holding a verdict of their own)."""
    return {k: v for k, v in evidence.items() if isinstance(v, dict) and "copying" in v}


def _memorisation(synth: dict, overridden: bool) -> dict:
    ev = synth["evidence"]
    return {"verdict": "flagged as copying training images" if ev["copying"] else "no evidence of copying",
            "copying": ev["copying"], "exported_despite_verdict": overridden,
            "rule": ev["rule"], "images": ev["images"], "near_duplicates": ev["near_duplicates"],
            "spaces": {name: {"space": SPACE.get(name, name), **_space_evidence(m)}
                       for name, m in spaces(ev).items()}}


ATTACK = ("GAN-Leaks' full black-box attack (Chen et al. 2020): a real image's score is its distance to the closest "
          "synthetic image; the AUC at telling training images (members) from held-out real images of other "
          "patients (non-members), 0.5 meaning no measurable leak, 1 every member exposed")
NOT_CHECKED = [
    "no formal guarantee: the generator was not trained with differential privacy",
    "the membership attack is black-box, on the images only: an attack on the shipped generator's weights, or one "
    "that knows the training method, may do better than the AUC above",
    "attribute inference (what a synthetic image reveals about a patient's other data) is not tested",
    "images a shipped generator draws elsewhere (generate --generator) are not screened for near copies: the "
    "training images needed for it stay here",
    "a near copy is judged in the three offline spaces; a copy of a region smaller than the evidence's downsampled "
    "image (a lesion, a tile's detail) can pass them"]


def _privacy(synth: dict, passed: dict, screened: int, shipped: int) -> dict:
    """What the privacy gate checked on the way out (membership attack, near copies dropped, the verdict's test and
    its measured false-positive rate) and what nothing here checks."""
    ev, fpr = synth["evidence"], passed["false_positive_rate"]
    return {"checked": {
        "membership_inference": {"attack": ATTACK,
                                 "auc": {name: {"space": SPACE.get(name, name), **m}
                                         for name, m in passed["membership_auc"].items()}},
        "near_copies_dropped": {"screened": screened, "dropped": screened - shipped, "shipped": shipped,
                                "rule": "an image closer to its nearest training image than that image is to any "
                                        "other patient's, and at most half as far as the nearest image of another "
                                        "patient, in any space: " + ", ".join(ev["screen"]["spaces"])},
        "gate": {"verdict": "flagged as copying" if passed["flagged"] else "passed",
                 "overridden": passed["overridden"], "rule": passed["rule"], "alpha": passed["alpha"],
                 "false_positive_rate": fpr,
                 "false_positive_rate_text": (
                     f"{fpr['rate']:.1%} of {fpr['splits']} splits of the {fpr['of_heldout']:,} held-out real images "
                     f"by patient into halves ({fpr['half_images'][0]:,}-{fpr['half_images'][1]:,} images each), one "
                     f"half judged as if synthetic against the other, were flagged")}},
        "not_checked": NOT_CHECKED}


def _fidelity(synth: dict, logs: dict[str, dict]) -> dict:
    """SWD and KID of each model's chosen epoch against validation images, and PRDC of the set against training
    images, each beside its real floor (the same measure of real images)."""
    return {"gan_scores_at_chosen_epoch": {model: {k: row[k] for k in ("swd", "swd_floor", "kid", "kid_floor")}
                                           for model, row in logs.items()},
            "prdc": {name: {"space": SPACE.get(name, name), "synthetic": m["prdc"], "real_floor": m["prdc_heldout"],
                            **_reliability(m)}
                     for name, m in spaces(synth["evidence"]).items()}}


UNDEFINED = {"drop_chance_normalised": "the real arm's accuracy is at chance (0.5), so the drop has no scale",
             "drop": "the real arm's accuracy is 0"}


def _estimate(key: str, v: dict) -> dict | str:
    """A Table 3 estimate with its 95% interval, or why it has none."""
    why = UNDEFINED.get(key, "Table 3 records no value")
    if v["value"] is None:
        return f"undefined: {why}"
    if v["low"] is None or v["high"] is None:
        return f"{v['value']:.4f}, its interval undefined: {why}"
    return v


def _cell(model: str, c: dict) -> dict:
    keep = ("real", "synthetic", "real_synthetic", "drop", "drop_chance_normalised")
    name = c.get("model_name") or model.upper()  # table3 names VGG16's head; the LBP models go by their keys
    absent = c.get("not_trained", {})  # arms params left out, with why
    return {"model": name, **{k: _estimate(k, c[k]) if k in c else absent.get(k, "n/a") for k in keep},
            "degenerate": c["degenerate"],
            **({"degenerate_reasons": c["degenerate_reasons"]} if c["degenerate"] else {})}


def _utility(name: str, summary: dict) -> dict | str:
    """Table 3's cells whose synthetic arm trained on this set (with the other sets of that arm), a compared
    generator's (tasks.compare) included."""
    out = {}
    tables = [summary, *summary.get("generators", {}).values()]
    for task in TASKS:
        cells = {model: c for table in tables for model, c in table.get(task, {}).items() if name in c["gan"]["stages"]}
        if cells:
            first = next(iter(cells.values()))
            out[task] = {"synthetic_sets": first["gan"]["stages"], "replicates": first["replicates"],
                         "models": {model: _cell(model, c) for model, c in cells.items()}}
    if out:
        return out
    used = sorted({s for task in TASKS for c in summary.get(task, {}).values() for s in c["gan"]["stages"]})
    return f"not benchmarked: Table 3 trains on {', '.join(used)}"


def _limits(modality: str, setup: str, side: int, synth: dict, gan: dict, fidelity: dict, utility,
            memorisation: dict, unit: str) -> list[str]:
    """What the run says this set cannot do, or what a user must know before using it."""
    out = [f"Images are {side} x {side} px, the generator's side; detail finer than that is absent."]
    if unit == "tile":
        out.append("The real data were split by tile, not by slide: tiles of one slide may sit on both the training "
                   "and the held-out sides, so no slide independence is claimed; the held-out floors, the "
                   "memorisation test and the membership attack may then understate copying and overstate "
                   "fidelity, and Table 3's test accuracies may be optimistic.")
    for name, m in spaces(synth["evidence"]).items():
        if m.get("reliable") is False:
            out.append(f"The {name} space ({SPACE.get(name, name)}) is unreliable, its membership AUC too: "
                       + "; ".join(m["unreliable_because"]) + ".")
    if modality == "xray":
        out.append("Labels are the sex and age bin each image was drawn for, not a reading of the image.")
    else:
        out.append("Labels are the slide class each image was drawn for (its generator's group), not a reading of "
                   "the tile by a pathologist.")
    for model, m in gan.get("per_model", {}).items():
        which = "The conditional generator" if setup == "cond" else f"The generator of label {model}"
        if not m["learnt"]:
            out.append(f"{which} learnt nothing by SWD (its best SWD lies {m['swd_relative']:.0%} of the way from "
                       "real images' toward noise or blur's, half the way or more): its images are not realistic.")
        if m["still_improving"]:
            out.append(f"{which} was still improving at its last epoch: longer training may give better images.")
    for space, f in fidelity["prdc"].items():
        low = [k for k in ("recall", "coverage") if f["synthetic"][k] < 0.5 * f["real_floor"][k]]
        if low:
            out.append(f"Diversity in the {space} space: " + ", ".join(
                f"{k} {f['synthetic'][k]:.2f} (held-out real images {f['real_floor'][k]:.2f})" for k in low)
                + ": the set spans a small part of the real images' variety.")
    if modality == "xray" and not synth["hash_screen"]:
        out.append("Not screened by the image hash: an X-ray without a body shape can be among the images.")
    if isinstance(utility, dict):
        for task, t in utility.items():
            for model, c in t["models"].items():
                if c["degenerate"]:
                    reasons = "; ".join(f"{arm}: {', '.join(r)}" for arm, r in c["degenerate_reasons"].items())
                    out.append(f"Table 3, {task}: {c['model']} is degenerate ({reasons}).")
    else:
        out.append("No classifier was trained on this set in Table 3: its utility is unmeasured.")
    ev = memorisation
    out.append(f"The memorisation test compares {ev['images']['synthetic']:,} synthetic images with all "
               f"{ev['images']['train']:,} training images and {ev['images']['heldout']:,} held-out real ones in "
               f"{len(ev['spaces'])} offline feature spaces; it is evidence, not a formal privacy guarantee "
               f"(no differential privacy).")
    if ev["exported_despite_verdict"]:
        out.append("Exported although the memorisation test flags the set as copying training images: it may "
                   "reveal patients' scans.")
    return out


def build(name: str, *, modality: str, group: str, images: int, draws: int, side: int, channels: int,
          label_counts: dict[str, int], label_columns: dict[str, str], example_file: str, options: dict,
          logs: dict[str, dict],
          synth: dict, gan: dict, studygroups: dict, summary: dict, dvc_lock: dict | None, license: str,
          version: str, intended_use: str, gate: dict, screened: int, code: str, generator: dict | None,
          run_warnings: list[str]) -> dict:
    """The datasheet as JSON-ready data; `logs` holds each model's log row at its chosen epoch; `gate` is the privacy
    gate's record (gate.admit) and `screened` the set's images before it dropped the near copies; `code` names the
    code by its package version (provenance.code_version), no commit, so that a rerun of the same code writes the
    same export; `run_warnings` the run's warnings as the report lists them (report.run_warnings)."""
    memorisation = _memorisation(synth, gate["overridden"])
    fidelity = _fidelity(synth, logs)
    utility = _utility(name, summary)
    lock_stage = (dvc_lock or {}).get("stages", {}).get(f"synthesize@{name}", {})
    sheet = {
        "name": name, "version": version, "license": license, "synthetic": True,
        "what": {"modality": MODALITY[modality], "images": images, "draws": draws, "side_px": side,
                 "channels": channels, "labels": label_counts, "label_columns": label_columns,
                 "example_file": example_file,
                 "summary": (f"{images:,} synthetic {MODALITY[modality].split(',')[0]} images ({draws} independent "
                             f"draw{'s' if draws > 1 else ''} of the real group's size and label counts), drawn by "
                             f"{arch_names(options['arch'])[0]} trained on study group {group}; no image "
                             f"is a patient's scan")},
        "run_warnings": run_warnings or "none: no stage of the run warned about its data, models or sets",
        "source_data": _source(group, modality, studygroups, synth["provenance"]),
        "how_made": {"architecture": "{} ({})".format(*arch_names(options["arch"])), "setup": SETUP[options["setup"]],
                     "options": options,
                     "checkpoint": _checkpoint(synth), "gan_learnt": synth["gan_learnt"],
                     "code": code,
                     "dvc": _dvc(name, dvc_lock),
                     **({"synthesize_params": lock_stage["params"]} if lock_stage.get("params") else {})},
        "fidelity": fidelity,
        "memorisation": memorisation,
        "privacy": _privacy(synth, gate, screened, images),
        "hash_screen": _screen(synth, modality),
        "utility": utility,
        "intended_use": intended_use,
        "limits": _limits(modality, options["setup"], side, synth, gan, fidelity, utility, memorisation,
                          split_unit(group, studygroups)),
    }
    if generator is not None:
        sheet["generator"] = generator
    return sheet


# ---- Markdown ----

def _num(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else str(x)


def _interval(v: dict | str) -> str:
    return v if isinstance(v, str) else f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(_num(c) for c in r) + " |" for r in rows), ""]


def _warning_lines(warnings: list[str] | str) -> list[str]:
    """The run's warnings, up front: a reader must know them before any number below."""
    if isinstance(warnings, str):
        return [f"Warnings about the run: {warnings}.", ""]
    return [f"**{len(warnings)} warning(s) about the run** (as its report lists them):", "",
            *(f"- {w}" for w in warnings), ""]


def markdown(sheet: dict) -> str:
    """The datasheet for people: the same facts as datasheet.json, in sections."""
    w, src, how, mem = sheet["what"], sheet["source_data"], sheet["how_made"], sheet["memorisation"]
    unit = next(k for k in src["sides"]["train"] if k not in ("images", "per_label"))
    lines = [f"# {sheet['name']}: datasheet", "", f"{w['summary']}.", "",
             f"Version {sheet['version']}, license {sheet['license']}. Memorisation test: **{mem['verdict']}**"
             + (" (exported anyway, by explicit override)" if mem["exported_despite_verdict"] else "") + ".", "",
             *_warning_lines(sheet["run_warnings"]),
             "## What it is", "",
             f"- {w['images']:,} PNG images, {w['side_px']} x {w['side_px']} px, {w['modality']}; "
             f"{w['draws']} draw(s)",
             "- label columns: " + "; ".join(f"`{k}` {v}" for k, v in w["label_columns"].items()),
             ""]
    lines += _table(["label", "synthetic images", f"real training images ({unit})"],
                    [[lb, n, f"{src['sides']['train']['per_label'].get(lb, 0):,}"] for lb, n in w["labels"].items()])
    lines += ["## Source data", "", f"{src['description']}.", "", f"Split {SPLIT[src['split_unit']]}.", "",
              f"Read as `{src['format']}`; raw data DVC hash `{src['data_hash']}`.", ""]
    lines += _table(["side", "images", unit], [[s, v["images"], v[unit]] for s, v in src["sides"].items()])
    ck = how["checkpoint"]
    lines += ["## How it was made", "", f"- {how['architecture']}, {how['setup']}",
              f"- chosen epoch(s): " + ", ".join(f"{m} {e}" for m, e in ck["epochs"].items()) + f", by {ck['why']}",
              f"- every setting that shaped the weights: `options` in datasheet.json",
              f"- code: {how['code']}"]
    if isinstance(how["dvc"], dict):
        lines.append(f"- DVC hashes (dvc.lock): generator `{how['dvc']['generator']}`, "
                     + ", ".join(f"{p} `{h}`" for p, h in {**how["dvc"]["inputs"], **how["dvc"]["outputs"]}.items()))
    else:
        lines.append(f"- DVC hashes: {how['dvc']}")
    lines += ["", "## Fidelity and diversity", "",
              "Against real training images; the real floor is the same measure of held-out real images.", ""]
    lines += _table(["model", "SWD", "SWD real floor", "KID", "KID real floor"],
                    [[m, *(s[k] for k in ("swd", "swd_floor", "kid", "kid_floor"))]
                     for m, s in sheet["fidelity"]["gan_scores_at_chosen_epoch"].items()])
    lines += _table(["space", "precision", "recall", "density", "coverage"],
                    [[f"{space_label(name, f)}: {kind}",
                      *(f[kind][k] for k in ("precision", "recall", "density", "coverage"))]
                     for name, f in sheet["fidelity"]["prdc"].items() for kind in ("synthetic", "real_floor")])
    lines += ["## Memorisation", "", f"Verdict: **{mem['verdict']}**. Rule: {mem['rule']}.", ""]
    lines += _table(["space", "C_T", "NN ratio < 0.5 (held out)",
                     "near copies (held out)", "authentic (held out)"],
                    [[space_label(name, s), s["c_t"], f"{s['nn_ratio_share']:.3f} ({s['nn_ratio_share_heldout']:.3f})",
                      f"{s['near_copy_share']:.3f} ({s['near_copy_share_heldout']:.3f})",
                      f"{s['authentic']:.3f} ({s['authentic_heldout']:.3f})"] for name, s in mem["spaces"].items()])
    pv = sheet["privacy"]["checked"]
    drop, g = pv["near_copies_dropped"], pv["gate"]
    lines += ["## Privacy: what was checked and what was not", "",
              f"- Privacy gate: **{g['verdict']}**" + (" (let out by explicit override)" if g["overridden"] else "")
              + f". Rule: {g['rule']}. Its false-positive rate, measured on this run's held-out real images: "
              f"{g['false_positive_rate_text']}.",
              f"- Near copies of training images dropped on the way out: {drop['dropped']:,} of {drop['screened']:,} "
              f"images (every image checked, not a sample; {drop['rule']}).",
              f"- Membership inference, {pv['membership_inference']['attack']}:", ""]
    lines += _table(["space", "AUC [95% interval]", "members / non-members", "interval"],
                    [[space_label(name, mem["spaces"].get(name, {})), f"{a['value']:.3f} [" + ", ".join(f"{b:.3f}" if isinstance(b, float) else "undefined"
                                                              for b in (a["low"], a["high"])) + "]",
                      f"{a['members']:,} / {a['nonmembers']:,}", a["interval"]]
                     for name, a in pv["membership_inference"]["auc"].items()])
    lines += ["Not checked:", "", *(f"- {item}" for item in sheet["privacy"]["not_checked"]), ""]
    hs = sheet["hash_screen"]
    lines += ["## Hash screen", "", (f"Applied: {hs['rejection_rate']:.1%} of {hs['drawn']:,} drawn images rejected "
                                     f"(held-out real images: {hs['real_rejection_rate']:.1%}); threshold "
                                     f"{hs['threshold_bits']} bits, {hs['threshold_from']}.")
              if hs["applied"] else f"Not applied: {hs['why']}.", ""]
    lines += ["## Utility (Table 3: trained on each arm, tested on real images)", ""]
    if isinstance(sheet["utility"], dict):
        for task, t in sheet["utility"].items():
            lines += [f"{task} (synthetic arm: {', '.join(t['synthetic_sets'])}; {t['replicates']} replicate(s), "
                      "each on its own draw)", ""]
            lines += _table(["model", "real", "synthetic", "real + synthetic", "relative drop",
                             "chance-normalised drop", "degenerate"],
                            [[c["model"], *(_interval(c[k]) for k in ("real", "synthetic", "real_synthetic", "drop",
                                                                       "drop_chance_normalised")),
                              "yes" if c["degenerate"] else "no"] for c in t["models"].values()])
    else:
        lines += [sheet["utility"] + ".", ""]
    lines += ["## Intended use", "", sheet["intended_use"] + ".", "", "## Known limits", "",
              *(f"- {lim}" for lim in sheet["limits"]), ""]
    if "generator" in sheet:
        g = sheet["generator"]
        lines += ["## Generator (model card)", "", f"`generator/` holds {g['summary']}.", "",
                  f"- weights: {g['dtype']}, {g['parameters']:,} parameters per model; files and SHA-256 in "
                  f"`generator/SHA256SUMS`", f"- draw more, in this folder: `{g['usage']}`",
                  f"- hash screen: {g['hash_screen']}", f"- near-copy screen: {g['near_copy_screen']}",
                  f"- license: {sheet['license']}; {g['caution']}", ""]
    lines += ["## Files and loading", "",
              f"One folder per label under `images/` (e.g. `{w['example_file']}`; each PNG carries a `synthetic` text "
              "chunk: set, generator, code), `metadata.csv`, `datasheet.json`, `croissant.json` (MLCommons "
              "Croissant), `SHA256SUMS` (`sha256sum -c SHA256SUMS`).", "", "```python",
              'from datasets import load_dataset           # Hugging Face: the image and every metadata.csv column',
              'ds = load_dataset("imagefolder", data_dir=".", split="train")',
              'from torchvision.datasets import ImageFolder  # torchvision: one class per label folder',
              'tv = ImageFolder("images")', "```", ""]
    return "\n".join(lines)

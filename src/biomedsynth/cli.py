"""One typer app; one command per DVC stage, each thin: load params -> call one function."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import typer

from biomedsynth import lifetime
from biomedsynth.params import ParamsError, load_params, setup_of
from biomedsynth.params_edit import apply_profile, set_params
from biomedsynth.paths import (CLASSIFIERS, EVIDENCE, EXPORTS, FEATURE_NETS, FEATURES, GAN_MODELS, GAN_STATES, INTERIM,
                               METRICS, PREDICTIONS, RAW, REPORTS, STUDYGROUPS, SYNTHETIC, TASK_SETS, outputs)
from biomedsynth.sources import UnreadableInput

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="biomedsynth: can GAN-made medical images stand in for real ones? (see README)")
ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params file to read")


@app.callback()
def _every_command(ctx: typer.Context) -> None:
    # SIGTERM stops any command as Ctrl-C does (cleanup runs, MLflow run KILLED, exit 143); see lifetime.py
    ctx.with_resource(lifetime.command(ctx.invoked_subcommand))


def _fail(code: int, msg: str):
    typer.echo(f"biomedsynth: {msg}", err=True)
    raise typer.Exit(code)


def _params(path: Path):
    try:
        p = load_params(path)
    except ParamsError as e:
        _fail(2, str(e))
    if p.device != "auto":  # the environment still wins: BIOMEDSYNTH_DEVICE=cpu for one command
        os.environ.setdefault("BIOMEDSYNTH_DEVICE", p.device)
    return p


def _run(fn, *args, **kwargs):
    """Call a stage; turn bad-data errors into one line (BIOMEDSYNTH_DEBUG=1 keeps the traceback)."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, UnreadableInput, FileNotFoundError) as e:
        if os.environ.get("BIOMEDSYNTH_DEBUG"):
            raise
        _fail(1, str(e).splitlines()[0] if str(e) else type(e).__name__)
    except OSError as e:  # a full disk, a read-only or unremovable output: the path and the cause
        if os.environ.get("BIOMEDSYNTH_DEBUG"):
            raise
        _fail(1, lifetime.describe(e))


def _writes(*outputs: Path) -> None:
    """This command writes these stage outputs (the first names the stage): hold them until it ends, so a
    second process running the same stage stops at once, and clear what a killed run left in them."""
    _run(lifetime.hold, list(outputs))


def _stamp(p, metrics_path: Path) -> None:
    """Name the data (data.dvc's hash, the sources params) in a stage's metrics JSON."""
    from biomedsynth.provenance import stamp

    _run(stamp, metrics_path, p.sources.model_dump(mode="json"))


def _print_summary(title: str, summary: dict) -> None:
    typer.echo(f"{title}:\n{json.dumps(summary, indent=2, sort_keys=True)}")


def _in_workers(p, args: list[str]) -> None:
    """When params `launch` asks for several processes, run this command (`biomedsynth *args`) in them
    and exit with their status; otherwise return and do the work here."""
    from biomedsynth.distributed import run_workers

    if (status := run_workers(p.launch, args)) is not None:
        raise typer.Exit(status)


@app.command()
def sample(params: Path = ParamsOpt, out: Path = typer.Option(RAW, help="where to write it"),
           force: bool = typer.Option(False, help="replace what is at --out")):
    """Write the built-in phantom sample (X-ray scans + CSV, whole-slide images + XML) to data/raw."""
    from biomedsynth.sources.phantom_wsi import write_histology_sample
    from biomedsynth.sources.phantom_xray import write_xray_sample

    p = _params(params)
    if out.exists() and any(out.iterdir()) and not force:
        _fail(1, f"{out} already holds data; pass --force to replace it with the phantom sample")
    # written beside --out and renamed into place, so a killed run never leaves a partial sample
    # that `make repro` would take for a dataset
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    x, h = p.sample.xray, p.sample.histology
    n_scans = write_xray_sample(tmp / "xray", n_patients=x.patients, seed=p.seed, difficulty=x.difficulty,
                                abnormal_fraction=x.abnormal_fraction, scans_per_patient=x.scans_per_patient,
                                min_side=x.min_side, max_side=x.max_side, workers=p.ingest.workers)
    n_slides = write_histology_sample(tmp / "histology", n_normal=h.normal_slides, n_tumor=h.tumor_slides,
                                      seed=p.seed, width=h.width, height=h.height, workers=p.ingest.workers)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    typer.echo(f"wrote {n_scans} X-ray scans to {out / 'xray'} and {n_slides} slides to {out / 'histology'}")


@app.command()
def profile(name: str = typer.Argument(None, help="smoke | default | paper"), params: Path = ParamsOpt,
            show: bool = typer.Option(False, "--show", help="print what each profile sets, side by side")):
    """Switch params.yaml to a size profile (keeps comments; `dvc params diff` shows the change), or --show them."""
    if show:
        from biomedsynth.params_edit import profile_table

        def shown(value) -> str:  # a long list (the paper's 25 age bins) by its start and length
            text = json.dumps(value)
            return text if len(text) <= 18 else f"{text[:12]}...({len(value)})"

        names, rows = _run(profile_table)
        width = max(len(key) for key, _ in rows)
        typer.echo(f"{'key':{width}s}  " + "  ".join(f"{n:>18s}" for n in names))
        for key, values in rows:
            typer.echo(f"{key:{width}s}  " + "  ".join(f"{shown(v):>18s}" for v in values))
        return
    if name is None:
        _fail(2, "profile: name one (smoke | default | paper), or --show")
    _change_params(params, f"profile {name}, ", lambda: apply_profile(name, params))


def _change_params(params: Path, what: str, change) -> None:
    """Run `change` (it returns the dotted keys it changed) on a params file; list them, or fail in one line. The
    result is checked whole before it is written, so a change may also mend a file that no longer loads (a
    gan.stages preset written there by an earlier version: `biomedsynth set gan.stages=table3`)."""
    try:
        changed = _run(change)
    except ParamsError as e:
        _fail(2, str(e))
    typer.echo(f"{params}: {what}{len(changed)} value(s) changed" + "".join(f"\n  {k}" for k in changed))


@app.command("set")
def set_cmd(assignments: list[str] = typer.Argument(..., help="key=value, e.g. sources.xray.format=manifest"),
            params: Path = ParamsOpt):
    """Set knobs in params.yaml (values read as YAML), keeping its comments; checked before it is written."""
    _change_params(params, "", lambda: set_params(assignments, params))


def _passed(check: str) -> None:
    """Write data/checked/<check>.txt, the same bytes whenever the check passes: the stages after it depend on
    it, and a check that passes again leaves them as they were."""
    from biomedsynth.store import atomic_write_text

    _run(atomic_write_text, outputs(f"check-{check}")[0], f"check_{check}: passed\n")
    typer.echo(f"check_{check}: passed")


@app.command("check-params")
def check_params(params: Path = ParamsOpt):
    """check_params, the first stage, which every stage depends on: the whole params file (gan.stages' names, and a
    stage for every set Table 3 and export.sets use) checked before DVC clears any stage's outputs, so a refused
    knob costs no output. Symlink loops in the source roots, on which DVC stops, are listed in .dvcignore: run it
    when `dvc status` stops on one."""
    from biomedsynth.sources import dvcignore_loops, symlink_loops

    p = _params(params)
    loops = [loop for src in (p.sources.xray, p.sources.histology) for loop in _run(symlink_loops, src.root)]
    unreached = _run(dvcignore_loops, loops, Path(".dvcignore"))
    if loops:
        typer.echo(f"check_params: {len(loops) - len(unreached)} symlink loop(s) in the source roots listed in "
                   ".dvcignore; ingest skips and counts them (symlink_loop)")
    for loop in unreached:
        typer.echo(f"WARNING check_params: {loop} is a symlink loop outside the project, where no .dvcignore "
                   "reaches, so DVC stops on it: remove it", err=True)
    _passed("params")


@app.command()
def ingest(modality: str = typer.Argument(..., help="xray | histology"), params: Path = ParamsOpt):
    """ingest@<modality>: decode and preprocess the raw data into data/interim/<modality>."""
    from biomedsynth.ingest import ingest as run_ingest

    if modality not in ("xray", "histology"):
        _fail(2, f"modality = {modality!r}: allowed xray, histology")
    p = _params(params)
    _writes(*outputs("ingest", modality))
    summary = _run(run_ingest, modality, p, INTERIM / modality,
                   METRICS / "ingest" / f"{modality}.json")
    _stamp(p, METRICS / "ingest" / f"{modality}.json")
    for warning in summary.get("warnings", []):  # on the console, not only inside the JSON
        typer.echo(f"WARNING ingest@{modality}: {warning}", err=True)
    # the log shows what the metrics show: counts, no slide id or file name (those stay in data/interim)
    shown = json.loads((METRICS / "ingest" / f"{modality}.json").read_text())
    _print_summary(f"ingest@{modality}", {**shown, "timing": summary["timing"]})


@app.command()
def studygroups(params: Path = ParamsOpt):
    """studygroups: X-Norm, X-Norm-L, H-Norm, H-Tumor, balanced and split by patient / slide (tile, when ingest
    found tiles without slide ids) into train, val, test."""
    from biomedsynth.studygroups import build_studygroups

    p = _params(params)
    _writes(*outputs("studygroups"))
    summary = _run(build_studygroups, INTERIM / "xray", INTERIM / "histology",
                   p.studygroups, STUDYGROUPS, p.seed, METRICS / "studygroups.json")
    _stamp(p, METRICS / "studygroups.json")
    for name, sides in summary.items():
        typer.echo(f"{name:9s} " + "  ".join(
            f"{side} {s['images']}/{s['requested']} images, {s['units']} {s['split_unit']}s, {len(s['per_label'])} labels"
            for side, s in sides.items()))


def _gan_stages(p) -> dict[str, dict]:
    """The GAN stages dvc.yaml runs (params gan.stages, the table train_gan and synthesize loop over), in its order:
    name -> arch, group, modality."""
    return {name: stage.model_dump() for name, stage in p.gan.stages.items()}


def _stage_name(command: str, name: str | None, p) -> str:
    """The GAN stage a train-gan or synthesize command runs: NAME, or the one DVC runs it for ($DVC_STAGE,
    <stage>@<name>): dvc.yaml's command is fixed text, so no params value reaches the shell; the name is checked
    against gan.stages (params.py checked each entry) before anything uses it."""
    stage = command.replace("-", "_")
    if name is None:
        dvc_stage = os.environ.get("DVC_STAGE", "")
        if not dvc_stage.startswith(f"{stage}@"):
            _fail(2, f"{command}: name a GAN stage of params gan.stages ({', '.join(p.gan.stages)}); under `dvc repro`"
                     f" it is the stage's ({stage}@<name>), and DVC_STAGE is {dvc_stage or 'unset'}")
        name = dvc_stage.partition("@")[2]
    if name not in p.gan.stages:
        _fail(2, f"{command}: {name!r} is not a GAN stage of params gan.stages ({', '.join(p.gan.stages)})")
    return name


@app.command()
def plan(params: Path = ParamsOpt, out: Path = typer.Option(None, help="also write the plan as JSON here"),
         fit: bool = typer.Option(False, "--fit", help="propose age bins, test fractions, group and task sizes that "
                                  "fit the ingested cohort (README: plan --fit), as one `biomedsynth set` command, "
                                  "and show the plan under them"),
         apply: bool = typer.Option(False, "--apply", help="with --fit: write those values into params.yaml through "
                                    "`biomedsynth set` (comments kept; checked first, nothing written if invalid)"),
         min_test_clusters: int = typer.Option(None, "--min-test-clusters", help="with --fit: the fewest test "
                                               "patients/slides per class of every task (default 6: the fewest plan "
                                               "accepts; more for narrower intervals)")):
    """What the ingested data gives every stage under params.yaml: group, GAN and task sizes, test clusters, advice.
    `plan --fit --apply` sets the bins and sizes that fit the data."""
    import shlex

    from biomedsynth.fit import fit_assignments, fit_plan
    from biomedsynth.plan import FEW_CLUSTERS, make_plan, plan_lines
    from biomedsynth.store import ImageSet, write_json

    if (apply or min_test_clusters is not None) and not fit:
        _fail(2, "--apply and --min-test-clusters go with --fit: `biomedsynth plan --fit --apply`")
    p = _params(params)
    metas = _run(lambda: (ImageSet(INTERIM / "xray").meta, ImageSet(INTERIM / "histology").meta))
    if not fit:
        result = _run(make_plan, *metas, p)
    else:
        fitted = _run(fit_plan, *metas, p,
                      FEW_CLUSTERS if min_test_clusters is None else min_test_clusters)
        result = fitted.plan
        typer.echo("plan --fit: values that fit the ingested cohort (rule: README, plan --fit):")
        typer.echo("\n".join(f"  {note}" for note in fitted.notes))
        typer.echo("the plan under them:")
    typer.echo("\n".join(plan_lines(result)))
    if fit:
        assignments = fit_assignments(fitted)
        typer.echo("to set them:\nbiomedsynth set" + "".join(f" \\\n  {shlex.quote(a)}" for a in assignments))
        if apply:
            _change_params(params, "plan --fit, ", lambda: set_params(assignments, params))
    if out:
        write_json(out, result)




@app.command("feature-net")
def feature_net(modality: str = typer.Argument(..., help="xray | histology"), params: Path = ParamsOpt):
    """feature_net@<modality>: the KID feature net of every GAN stage of the modality, trained on its groups'
    training sides (one head per label: X-ray sex and age decade; histology normal vs tumour), tested on their
    validation sides."""
    from biomedsynth.distributed import pick_device
    from biomedsynth.gan.feature_net import build_feature_net

    if modality not in ("xray", "histology"):
        _fail(2, f"modality = {modality!r}: allowed xray, histology")
    p = _params(params)
    _writes(*outputs("feature-net", modality))
    summary = _run(build_feature_net, modality, STUDYGROUPS, getattr(p.gan, modality).resolution,
                   p.gan.score.feature_epochs, p.seed, FEATURE_NETS / f"{modality}.pt",
                   METRICS / "feature_net" / f"{modality}.json", _run(pick_device))
    _stamp(p, METRICS / "feature_net" / f"{modality}.json")
    _print_summary(f"feature_net@{modality}", summary)
    for warning in summary["warnings"]:  # on the console, not only inside the JSON
        typer.echo(f"WARNING feature_net@{modality}: {warning}", err=True)


ChecksArg = typer.Argument(None, help="only these GAN stages (default: every one params gan.stages lists)")


def _checked_stages(p, names: list[str] | None) -> dict[str, dict]:
    """The GAN stages a check covers: `names` (each one of gan.stages), or all of them."""
    stages = _gan_stages(p)
    if unknown := [n for n in names or [] if n not in stages]:
        _fail(2, f"{', '.join(unknown)}: not a GAN stage of params gan.stages ({', '.join(stages)})")
    return {n: stages[n] for n in names} if names else stages


@app.command("check-gan")
def check_gan(names: list[str] = ChecksArg, params: Path = ParamsOpt):
    """check_gan: what each train_gan stage would refuse in its data, feature net or resume state (a batch larger
    than a model's images, PGGAN's growth past its epochs, ...), checked before DVC clears any GAN model."""
    from biomedsynth.gan.train import check_run, stage_options
    p = _params(params)
    processes = p.launch.nproc_per_node * p.launch.nnodes

    def check(name: str, stage: dict) -> None:
        train_set = STUDYGROUPS / stage["group"] / "train"
        try:
            opt = stage_options(p, stage["arch"], stage["modality"], setup_of(name), train_set, processes)
            check_run(opt, train_set, train_set.with_name("val"), FEATURE_NETS / f"{stage['modality']}.pt",
                      GAN_STATES / name, processes)
        except ValueError as e:
            raise ValueError(f"train_gan@{name}: {e}") from None

    for name, stage in _checked_stages(p, names).items():
        _run(check, name, stage)
    _passed("gan")


StageArg = typer.Argument(None, help="a GAN stage of params gan.stages, <arch>-<group>-<setup> (default: the one "
                          "`dvc repro` runs, from DVC_STAGE)")


@app.command("train-gan")
def train_gan(name: str = StageArg, params: Path = ParamsOpt):
    """train_gan@<arch>-<group>-<setup>: train, checkpoint and score the GANs of one study group."""
    p = _params(params)
    name = _stage_name("train-gan", name, p)
    stage = p.gan.stages[name]
    arch, modality, setup = stage.arch, stage.modality, setup_of(name)
    train_set = STUDYGROUPS / stage.group / "train"
    model, metrics, scores, losses = outputs("train-gan", name)
    _writes(model, metrics, scores, losses, GAN_STATES / name)
    from biomedsynth.gan.train import stage_options, train_gan as run_train_gan

    opt = _run(stage_options, p, arch, modality, setup, train_set, p.launch.nproc_per_node * p.launch.nnodes)
    _in_workers(p, ["train-gan", name, "--params", str(params)])
    tracked = {"seed": p.seed, "gan": {modality: getattr(p.gan, modality).model_dump(),
                                       arch: getattr(p.gan, arch).model_dump(), "score": p.gan.score.model_dump(),
                                       "snapshots": p.gan.snapshots.model_dump()}}
    summary = _run(run_train_gan, opt, train_set, train_set.with_name("val"), FEATURE_NETS / f"{modality}.pt",
                   model, metrics, scores, losses, GAN_STATES / name, trend_tail=p.gan.score.trend_tail,
                   stage=f"train_gan@{name}", tracking_params=tracked, tracking_real_images=p.tracking.real_images,
                   models_per_device=p.launch.models_per_device)
    if summary:  # rank 0
        _stamp(p, metrics)
        _print_summary(f"train_gan@{name}", summary)


@app.command()
def synthesize(name: str = StageArg, params: Path = ParamsOpt):
    """synthesize@<arch>-<group>-<setup>: a synthetic copy of the group's training set, screened, with evidence on
    fidelity and copying."""
    p = _params(params)
    name = _stage_name("synthesize", name, p)
    stage = p.gan.stages[name]
    synthetic, metrics, evidence = outputs("synthesize", name)
    _writes(synthetic, metrics, evidence)
    from biomedsynth.synthesize import synthesize_stage

    summary = _run(synthesize_stage, p, stage.arch, stage.group, setup_of(name), synthetic, metrics,
                   evidence, warn=lambda line: typer.echo(line, err=True))
    _print_summary(f"synthesize@{name}", summary)


@app.command("check-synthesize")
def check_synthesize(names: list[str] = ChecksArg, params: Path = ParamsOpt):
    """check_synthesize: what each synthesize stage would refuse (a checkpoint epoch its GAN did not keep, too few
    held-out patients or images for the evidence), checked before DVC clears any synthetic set."""
    from biomedsynth.gan.checkpoint import checkpoint_epochs
    from biomedsynth.store import ImageSet
    from biomedsynth.synthesize import check_sets

    p = _params(params)
    s = p.synthesize

    def check(name: str, group: str) -> None:
        sets = STUDYGROUPS / group
        try:
            if s.checkpoint != "utility":  # utility picks among the epochs kept
                checkpoint_epochs(GAN_MODELS / name, s.checkpoint)
            check_sets(ImageSet(sets / "train"), ImageSet(sets / "val"), ImageSet(sets / "test"),
                       hash_threshold=s.hash_threshold, hash_quantile=s.hash_quantile, hash_size=s.hash_size,
                       max_tries_factor=s.max_tries_factor, draws=s.draws, evidence_images=s.evidence.images,
                       prdc_k=s.evidence.k, seed=p.seed)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"synthesize@{name}: {e}") from None

    for name, stage in _checked_stages(p, names).items():
        _run(check, name, stage["group"])
    _passed("synthesize")


@app.command()
def tasks(params: Path = ParamsOpt):
    """tasks: the benchmark's real / synthetic training sets and real test set of each task."""
    from biomedsynth.tasks import build_tasks

    p = _params(params)
    _writes(*outputs("tasks"))
    summary = _run(build_tasks, p.tasks, STUDYGROUPS, SYNTHETIC, TASK_SETS,
                   p.seed, METRICS / "tasks.json")
    _stamp(p, METRICS / "tasks.json")
    for task, sets in summary.items():
        typer.echo(f"{task:9s} " + "  ".join(f"{name} {s['images']}/{s['requested']}" for name, s in sets.items())
                   + f"  at {next(iter(sets.values()))['side']} px")


TaskArg = typer.Argument(..., help="histology | xray_sex | xray_age")


def _check_task(task: str) -> None:
    from biomedsynth.tasks import TASKS

    if task not in TASKS:
        _fail(2, f"task = {task!r}: allowed {', '.join(TASKS)}")


@app.command()
def features(task: str = TaskArg, params: Path = ParamsOpt):
    """features@<task>: uniform LBP histograms (each radius and their concatenation) of the task's three sets."""
    from biomedsynth.classify.benchmark import training_sets
    from biomedsynth.classify.lbp import write_features
    from biomedsynth.tasks import TEST

    _check_task(task)
    lbp = _params(params).classify.lbp
    _writes(*outputs("features", task))
    for name in [*_run(training_sets, TASK_SETS / task), TEST]:
        summary = _run(write_features, TASK_SETS / task / name, FEATURES / task / name,
                       lbp.radii, lbp.workers)
        typer.echo(f"features@{task} {name}: {summary['images']} images, dims {summary['dims']}")


@app.command("check-classify")
def check_classify(params: Path = ParamsOpt):
    """check_classify: what each classify stage would refuse in its task sets (fewer draws than replicates, too few
    patients/slides for the CV folds or VGG16's validation split), checked before DVC clears any classifier."""
    from biomedsynth.classify.benchmark import MODELS, check_cell
    from biomedsynth.tasks import TASKS

    cfg = _params(params).classify
    for task in TASKS:
        for model in MODELS:
            try:
                check_cell(TASK_SETS / task, model, cfg)
            except (ValueError, FileNotFoundError) as e:
                _fail(1, f"classify@{task}-{model}: {e}")
    _passed("classify")


@app.command("classify")
def classify_cmd(task: str = TaskArg, model: str = typer.Argument(..., help="knn | svm | rf | vgg16"),
                 params: Path = ParamsOpt):
    """classify@<task>-<model>: train on real and on synthetic, test on real; accuracy, AUC, drop with intervals."""
    from biomedsynth import tracking
    from biomedsynth.classify.benchmark import MODELS, classify, trained_arms
    from biomedsynth.provenance import fingerprint

    _check_task(task)
    if model not in MODELS:
        _fail(2, f"model = {model!r}: allowed {', '.join(MODELS)}")
    p = _params(params)
    _writes(*outputs("classify", task, model))
    if model == "vgg16":  # the LBP models are fitted in one process
        _in_workers(p, ["classify", task, model, "--params", str(params)])
    cfg = p.classify
    tracked = {"task": task, "model": model, "tasks": p.tasks.model_dump(mode="json"),
               "classify": {k: v for k, v in cfg.model_dump(mode="json").items()
                            if k in ("replicates", "bootstrap", "cv_folds", model)}}
    out = METRICS / task
    rank = int(os.environ.get("RANK", "0"))  # torchrun's; rank 0 alone tracks
    with tracking.run(f"classify@{task}-{model}", tracked, enabled=rank == 0,
                      real_images=p.tracking.real_images) as tracker:
        r = _run(classify, task, model, cfg, TASK_SETS / task, FEATURES / task,
                 CLASSIFIERS / task / model, out / f"{model}.json", out / model,
                 PREDICTIONS / task / f"{model}.csv", tracker,
                 provenance=fingerprint(p.sources.model_dump(mode="json")))
    if not r:  # a torchrun rank > 0
        return
    def shown(x, fmt=".3f"):  # an undefined bound (a test class of one patient or slide) reads "?"
        return "?" if x is None else format(x, fmt)

    typer.echo(f"classify@{task}-{model}: " + ", ".join(
        f"{k} {shown(r[k]['accuracy']['value'])} [{shown(r[k]['accuracy']['low'])}, {shown(r[k]['accuracy']['high'])}]"
        + (" DEGENERATE" if r[k]["degenerate"] else "") for k in trained_arms(r))
        + f", drop {shown(r['drop']['relative']['accuracy']['value'], '+.1%')}")


@app.command()
def table3(params: Path = ParamsOpt):
    """table3: metrics/summary.json (Table 3 with intervals, flags, verdict) and the flat metrics/table3.json."""
    from biomedsynth.table3 import write_table3

    p = _params(params)
    _writes(*outputs("table3"))
    summary = _run(write_table3, METRICS, PREDICTIONS, p.tasks.gan_stages(),
                   METRICS / "summary.json", METRICS / "table3.json", p.classify.bootstrap,
                   METRICS / "forest.csv", p.tasks.compared_stages())
    typer.echo(f"table3: {summary['claims']['sentence']}")
    for g in summary.get("generators", {}).values():
        typer.echo(f"table3: {g['sentence']}")


@app.command()
def readme(summary: Path = typer.Option(METRICS / "summary.json", help="the table3 stage's summary"),
           generators: Path = typer.Option(Path("docs/results/generators"),
                                           help="a generators-compared experiment's summary.json, gan/, synthesize/"),
           path: Path = typer.Option(Path("README.md"), help="the README whose blocks are rewritten")):
    """Rewrite the README's Table 3 and verdict (between its table3 markers) from metrics/summary.json, and, where it
    has generators markers, that block from a generators-compared experiment's metrics kept under --generators."""
    from biomedsynth.report import generators_markdown, readme_markers, readme_with_block, readme_with_table3
    from biomedsynth.store import atomic_write_text

    text = _run(readme_with_table3, _run(Path.read_text, path), json.loads(_run(Path.read_text, summary)))
    written = f"Table 3 and the verdict written from {summary}"
    if readme_markers("generators")[0] in text:
        text = _run(readme_with_block, text, "generators", _run(generators_markdown, generators))
        written += f", the generators compared from {generators}"
    _run(atomic_write_text, path, text)
    typer.echo(f"{path}: {written}")


@app.command()
def report(params: Path = ParamsOpt):
    """report: reports/report.{md,html}: Table 3 and the verdict, sample figures, GAN scores and checks."""
    from biomedsynth.report import write_report

    p = _params(params)
    _writes(*outputs("report"))
    warnings = _run(write_report, METRICS, GAN_MODELS, STUDYGROUPS,
                    SYNTHETIC, EVIDENCE, list(p.gan.stages), REPORTS)
    for line in warnings:  # the last stage of `dvc repro`: what the stages warned about, once more, in one place
        typer.echo(f"WARNING {line}", err=True)
    typer.echo(f"report: reports/report.html and reports/report.md ({len(warnings)} warning(s))")


@app.command("export")
def export_cmd(name: str = typer.Argument(..., help="a synthetic set, <arch>-<group>-<setup>"),
               out: Path = typer.Option(None, help="folder to write (default exports/NAME)"),
               allow_flagged: bool = typer.Option(False, "--allow-flagged", help="export a set the memorisation "
                                                  "test flags as copying (the datasheet records it)"),
               allow_unlearnt: bool = typer.Option(False, "--allow-unlearnt", help="export a set whose GAN learnt "
                                                   "nothing (the datasheet says so)"),
               with_generator: bool = typer.Option(False, "--with-generator", help="also ship the chosen sampling "
                                                   "generator (bf16) and a model card, for `generate --generator`"),
               params: Path = ParamsOpt):
    """The synthetic set as PNGs that Hugging Face imagefolder and torchvision ImageFolder load, metadata.csv,
    datasheet.md/.json, croissant.json and SHA256SUMS (flags add to params `export`)."""
    p = _params(params)
    stages = _gan_stages(p)
    if name not in stages:
        _fail(2, f"set = {name!r}: allowed {', '.join(stages)} (params gan.stages)")
    out = out or EXPORTS / name
    _writes(out)
    _print_summary(f"export {name}", _export_one(p, name, stages[name], out, allow_flagged, allow_unlearnt,
                                                 with_generator))


def _export_one(p, name: str, stage: dict, out: Path, allow_flagged: bool, allow_unlearnt: bool,
                with_generator: bool) -> dict:
    from biomedsynth.export import RunFiles, export_set

    e = p.export
    return _run(export_set, name, RunFiles.of(name), out, modality=stage["modality"], group=stage["group"],
                license=e.license, version=e.version, intended_use=e.intended_use,
                allow_flagged=allow_flagged or name in e.allow_flagged,
                allow_unlearnt=allow_unlearnt or name in e.allow_unlearnt,
                with_generator=with_generator or e.with_generator)


@app.command("export-sets")
def export_sets(params: Path = ParamsOpt):
    """export: exports/<name> for every set of gan.stages, in one stage (one per set cost ~2 s of DVC's each):
    the sets params export.sets lists as `export NAME` writes them; the others, and a listed set the memorisation
    test flags as copying (unless export.allow_flagged names it) or whose GAN learnt nothing (unless
    export.allow_unlearnt names it), a note saying why, so the pipeline runs on."""
    from biomedsynth.export import why_not_exported, write_not_exported

    p = _params(params)
    listed = p.exported_sets()
    _writes(*outputs("export-sets"))
    for name, stage in _gan_stages(p).items():
        synth = _run(lambda: json.loads((METRICS / "synthesize" / f"{name}.json").read_text())) \
            if name in listed else {}
        if reason := _run(why_not_exported, name, p.export, listed, synth):
            _run(write_not_exported, EXPORTS / name, reason)
            typer.echo(f"export {name}: {reason}")
        else:
            _print_summary(f"export {name}", _export_one(p, name, stage, EXPORTS / name, False, False, False))


@app.command()
def generate(name: str = typer.Argument(None, help="a trained set <arch>-<group>-<setup> (or --generator)"),
             n: int = typer.Option(..., "-n", min=1, help="images to draw"),
             out: Path = typer.Option(..., help="folder to write (new, empty, or an earlier output)"),
             label: str = typer.Option(None, help="draw only this label (default: n spread evenly over the labels)"),
             seed: int = typer.Option(0, min=0, help="a seed and a label always give the same images"),
             generator: Path = typer.Option(None, help="a shared generator folder (export --with-generator's "
                                            "generator/) instead of NAME; needs no pipeline outputs nor params"),
             batch_size: int = typer.Option(256, min=1, help="images per forward pass"),
             allow_flagged: bool = typer.Option(False, "--allow-flagged", help="draw from a generator whose set the "
                                                "memorisation test flags as copying (generation.json records it)"),
             params: Path = ParamsOpt):
    """Draw more images from the chosen generator of a trained set (synthesize's epochs, hash screen and near-copy
    screen), or from a shared generator, into the export layout (images/<label>/*.png, metadata.csv, SHA256SUMS).
    Either passes the privacy gate first (--allow-flagged, or params export.allow_flagged for a set, overrides it)."""
    from biomedsynth import generate as gen

    if (name is None) == (generator is None):
        _fail(2, "give a set NAME or --generator DIR (one of the two)")
    if generator is not None:
        source = _run(gen.from_shared, generator, allow_flagged)
    else:
        p = _params(params)
        stages = _gan_stages(p)
        if name not in stages:
            _fail(2, f"set = {name!r}: allowed {', '.join(stages)} (params gan.stages)")
        modality, ev = stages[name]["modality"], p.synthesize.evidence
        source = _run(gen.from_pipeline, name, modality, GAN_MODELS / name,
                      METRICS / "synthesize" / f"{name}.json",
                      STUDYGROUPS / stages[name]["group"] / "train", FEATURE_NETS / f"{modality}.pt",
                      max_tries_factor=p.synthesize.max_tries_factor, evidence_side=ev.side, pca_dims=ev.pca_dims,
                      evidence_images=ev.images, seed=p.seed,
                      allow_flagged=allow_flagged or name in p.export.allow_flagged,
                      batch_size=batch_size)
    summary = _run(gen.generate, source, out, n, label, seed, batch_size)
    typer.echo(f"generate: {summary['images']} images of {source.name} in {summary['seconds']} s "
               f"({summary['images_per_s']} images/s on {summary['device']}) -> {out}; hash screen "
               f"{summary['hash_screen']}; near-copy screen {source.near_copy_note}"
               + (f" ({summary['near_copies_dropped']} dropped)" if source.screen else "")
               + ("; FLAGGED as copying, drawn by override" if summary["overridden"] else ""))


@app.command()
def review(base: str = typer.Option("origin/main", help="git revision the pull request is compared with"),
           smoke_summary: Path = typer.Option(None, help="metrics/summary.json of a smoke run to include"),
           out: Path = typer.Option(None, help="write here instead of stdout")):
    """CI's pull-request review (Markdown): params and committed metrics against BASE, plus the smoke Table 3."""
    from biomedsynth.review import review_markdown
    from biomedsynth.store import atomic_write_text

    text = _run(review_markdown, base, smoke_summary)
    if out:
        atomic_write_text(out, text)
    else:
        typer.echo(text, nl=False)


@app.command("check-privacy")
def check_privacy(also: list[Path] = typer.Option([], "--also", help="another file to scan: a review page, a log"),
                  mlflow: bool = typer.Option(True, help="scan the MLflow store's params, tags and artifacts too")):
    """Before a commit or a push: scan what `git add -A` would commit (the code folders aside), the --also files
    and the MLflow store for the ingested data's patient and slide ids, image ids, source paths, file names and
    images. Exit 1 listing each file and what it holds (never the value); data/interim is read, nothing written."""
    from biomedsynth import privacy, tracking

    real = _run(privacy.real_data, INTERIM)
    uri = tracking.tracking_uri() if mlflow else None
    if uri is not None and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        uri = None  # no store yet: nothing tracked
    artifacts = tracking.project_root() / "mlartifacts" if mlflow else None
    findings, scanned = _run(privacy.check, Path("."), real, also, uri, artifacts)
    what = (f"{len(real.identifiers)} identifiers ({real.too_short} under {privacy.MIN_ID} characters not scanned) "
            f"and {len(real.digests)} real images")
    for finding in findings:
        typer.echo(f"check-privacy: {finding}", err=True)
    if findings:
        _fail(1, f"{len(findings)} of {scanned} files and MLflow records hold an identifier of the real data or an "
                 "image; keep them out of git and the tracking store")
    typer.echo(f"check-privacy: {scanned} files and MLflow records hold none of {what}, and no image")

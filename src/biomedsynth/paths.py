"""Where the stages read and write, named once. The CLI's commands use these; tests/test_paths.py checks
`outputs` against every stage of dvc.yaml (its outs, metrics and plots), so the two cannot drift apart."""
from __future__ import annotations

from pathlib import Path

RAW = Path("data/raw")
CHECKED = Path("data/checked")          # the check stages' outputs
INTERIM = Path("data/interim")          # ingest: data/interim/<modality>
INGEST_DETAILS = "ingest.json"          # in it: what ingest read and skipped, with ids (never in git)
STUDYGROUPS = Path("data/studygroups")  # data/studygroups/<group>/{train,val,test}
SYNTHETIC = Path("data/synthetic")      # data/synthetic/<arch>-<group>-<setup>
EVIDENCE = Path("data/evidence")        # its closest pairs (real pixels: DVC-cached, kept out of git)
TASK_SETS = Path("data/tasks")          # data/tasks/<task>/<set>
FEATURES = Path("data/features")        # LBP histograms, data/features/<task>/<set>
PREDICTIONS = Path("data/predictions")  # data/predictions/<task>/<model>.csv, with patient or slide ids
METRICS = Path("metrics")
FEATURE_NETS = Path("models/feature_net")
GAN_MODELS = Path("models/gan")
CLASSIFIERS = Path("models/classify")
REPORTS = Path("reports")
EXPORTS = Path("exports")
GAN_STATES = Path(".cache/gan")  # train_gan's resume states, outside DVC's outputs (gitignored, dvcignored)


def outputs(command: str, *args: str) -> list[Path]:
    """The outputs of the stage that runs `biomedsynth <command> <args>` (its name first), as dvc.yaml declares
    them; a folder stands for the files it holds."""
    match (command, *args):
        case ("check-params" | "check-gan" | "check-synthesize" | "check-classify" as check,):
            return [CHECKED / f"{check.removeprefix('check-')}.txt"]
        case ("ingest", modality):
            return [INTERIM / modality, METRICS / "ingest" / f"{modality}.json"]
        case ("studygroups",):
            return [STUDYGROUPS, METRICS / "studygroups.json"]
        case ("feature-net", modality):
            return [FEATURE_NETS / f"{modality}.pt", METRICS / "feature_net" / f"{modality}.json"]
        case ("train-gan", name):
            gan = METRICS / "gan"
            return [GAN_MODELS / name, gan / f"{name}.json", gan / "scores" / f"{name}.csv",
                    gan / "losses" / f"{name}.csv"]
        case ("synthesize", name):
            return [SYNTHETIC / name, METRICS / "synthesize" / f"{name}.json", EVIDENCE / name]
        case ("tasks",):
            return [TASK_SETS, METRICS / "tasks.json"]
        case ("features", task):
            return [FEATURES / task]
        case ("classify", task, model):
            return [CLASSIFIERS / task / model, METRICS / task / model, METRICS / task / f"{model}.json",
                    PREDICTIONS / task / f"{model}.csv"]
        case ("table3",):
            return [METRICS / "summary.json", METRICS / "table3.json", METRICS / "forest.csv"]
        case ("export-sets",):
            return [EXPORTS]
        case ("report",):
            return [REPORTS]
    raise ValueError(f"no stage runs `biomedsynth {' '.join((command, *args))}`")

"""The paths the CLI writes (biomedsynth.paths) are the outputs dvc.yaml declares, stage by stage."""
from pathlib import Path

import pytest
from dvc.repo import Repo

from biomedsynth.paths import outputs

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_writes_what_dvc_yaml_declares():
    stages = [s for s in Repo(str(ROOT)).index.stages if s.cmd]  # data.dvc has no command
    assert len(stages) > 30
    for stage in stages:
        words = stage.cmd.split()
        if words[1] in ("train-gan", "synthesize"):  # the GAN stage's name: DVC gives it in DVC_STAGE
            words.append(stage.addressing.partition("@")[2])
        assert words[0] == "biomedsynth", stage.addressing
        declared = [Path(o.def_path) for o in stage.outs]
        written = outputs(*words[1:])
        # every declared output is one the command names or lies in a folder it names, and the reverse
        assert all(any(d == w or w in d.parents for w in written) for d in declared), (stage.addressing, declared)
        assert all(any(w == d or w in d.parents for d in declared) for w in written), (stage.addressing, written)


def test_a_command_no_stage_runs_is_named():
    with pytest.raises(ValueError, match="no stage runs `biomedsynth synthesize pggan x_norm`"):
        outputs("synthesize", "pggan", "x_norm")

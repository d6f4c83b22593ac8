"""No params value reaches a shell: dvc.yaml's commands are fixed text, and params `launch` is numbers and a
host:port that biomedsynth turns into a torchrun launch of its own (distributed.py), an argument list."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

import biomedsynth
from biomedsynth import distributed
from biomedsynth.params import ParamsError, load_params

# the project of the biomedsynth imported (PYTHONPATH may name another checkout): its dvc.yaml and params.yaml
PROJECT = Path(biomedsynth.__file__).resolve().parents[2]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "PYTHONPATH": str(PROJECT / "src"), "BIOMEDSYNTH_MLFLOW": "0", "BIOMEDSYNTH_DEVICE": "cpu"}
# what a params value could once put into the train_gan and classify commands (`launcher`, interpolated)
INJECTIONS = ["biomedsynth; touch X; biomedsynth", "torchrun $(touch${IFS}X) --no-python biomedsynth",
              "biomedsynth `touch X`", "biomedsynth --help && touch X && biomedsynth",
              "biomedsynth\ntouch X\nbiomedsynth"]


def _params(tmp_path: Path, edit) -> Path:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    edit(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path / "params.yaml"


def _stage_commands(tmp_path: Path, edit) -> dict[str, str]:
    """Every stage's command as DVC renders it from dvc.yaml and the edited params.yaml: what `dvc repro`
    hands to the shell."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "dvc.yaml").write_text((PROJECT / "dvc.yaml").read_text())
    _params(tmp_path, edit)
    Repo.init(tmp_path, no_scm=True).close()
    with Repo(tmp_path) as repo:
        return {stage.name: stage.cmd for stage in repo.index.stages}


def _poison(node):
    """Every string in a params tree, made a shell command of its own."""
    for key in node if isinstance(node, dict) else range(len(node)):
        if isinstance(node[key], (dict, list)):
            _poison(node[key])
        elif isinstance(node[key], str):
            node[key] += ";touch X"


@pytest.mark.parametrize("injection", INJECTIONS)
def test_a_former_launcher_value_runs_nothing(tmp_path, injection):
    """The train_gan command DVC runs, under params.yaml `launcher: <injection>`: refused at params load
    (an unknown key), exit 2, one line, and the shell ran nothing."""
    cmd = _stage_commands(tmp_path, lambda p: p.update(launcher=injection))["train_gan@pggan-x_norm-cond"]
    run = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert not (tmp_path / "X").exists()
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1 and "unknown key 'launcher'" in run.stderr


def test_no_params_value_reaches_a_stage_command(tmp_path):
    """Every string in params.yaml made hostile, plus a `gan_models` table (DVC merges params.yaml into
    dvc.yaml's `vars`): no stage DVC renders carries any of it, and no stage is added."""
    def hostile(params):
        _poison(params)
        params["gan_models"] = {"x": {"arch": "dcgan;touch X", "group": "x_norm;touch X", "setup": "uncond;touch X",
                                      "modality": "xray"}}

    commands = _stage_commands(tmp_path / "hostile", hostile)
    assert [name for name, cmd in commands.items() if "touch" in name + cmd] == []
    assert set(commands) == set(_stage_commands(tmp_path / "clean", lambda p: None))


def test_stage_commands_interpolate_only_their_own_loop():
    """In dvc.yaml, a command's `${...}` is its stage's foreach/matrix item or key, and that loop is written out
    in dvc.yaml, not a `${var}`: params.yaml can add keys to any var (DVC merges it into vars); what the loop's
    values interpolate is test_no_params_value_reaches_a_stage_command's."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        cmd = stage["do"]["cmd"] if "do" in stage else stage["cmd"]
        refs = re.findall(r"\$\{([^}]*)\}", cmd)
        assert all(re.fullmatch(r"key|item(\.\w+)?", ref) for ref in refs), (name, cmd)
        assert not refs or not isinstance(stage.get("foreach", stage.get("matrix")), str), name


def test_a_hostile_gan_stage_name_reaches_no_shell(tmp_path):
    """gan.stages' names become DVC's stage names (train_gan@<name>), never command text: under a hostile name every
    command stays as dvc.yaml writes it, and check_params, which every stage runs after, refuses the name in one
    line (and so would the GAN commands, reading it from DVC_STAGE: tests/test_pipeline.py)."""
    def hostile(params):
        params["gan"]["stages"]["x;touch X"] = {"arch": "dcgan", "group": "x_norm", "modality": "xray"}

    commands = _stage_commands(tmp_path, hostile)
    assert (commands["train_gan@x;touch X"], commands["synthesize@x;touch X"]) == (
        "biomedsynth train-gan", "biomedsynth synthesize")
    assert not [name for name, cmd in commands.items() if "touch" in cmd]
    run = subprocess.run(["bash", "-c", commands["check_params"]], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1 and "'x;touch X' is no GAN stage" in run.stderr
    assert not (tmp_path / "X").exists()


@pytest.mark.parametrize("injection", INJECTIONS + ["x;touch X"])
def test_launch_holds_numbers_and_a_host_port_only(tmp_path, injection):
    """A former injection string as a `launch` value: refused at params load, naming the key."""
    for key in ("nproc_per_node", "rdzv_endpoint"):
        path = _params(tmp_path, lambda p: p.setdefault("launch", {}).update({key: injection}))
        with pytest.raises(ParamsError, match=rf"launch\.{key} = "):
            load_params(path)


@pytest.mark.parametrize("endpoint, ok", [
    ("node0:29500", True), ("gpu-7.cluster.local:29400", True), ("10.0.0.1:29500", True), ("[fd00::1]:29500", True),
    ("node0", False), ("node0:0", False), ("node0:65536", False), ("-node0:29500", False), ("node0:29500\n", False),
    ("node 0:29500", False), ("node0:29500 --max-restarts 9", False),
])
def test_rdzv_endpoint_is_host_port(tmp_path, endpoint, ok):
    path = _params(tmp_path, lambda p: p["launch"].update(nnodes=2, node_rank=1, rdzv_endpoint=endpoint))
    if ok:
        assert load_params(path).launch.rdzv_endpoint == endpoint
    else:
        with pytest.raises(ParamsError, match=r"launch\.rdzv_endpoint = .*expected host:port"):
            load_params(path)


def test_several_nodes_need_an_endpoint_and_a_rank_among_them(tmp_path):
    for launch, message in [
            ({"nnodes": 2}, "several nodes need rdzv_endpoint"),
            ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "node0:29500"}, "node_rank 2 must be below nnodes")]:
        with pytest.raises(ParamsError, match=message):
            load_params(_params(tmp_path, lambda p: p["launch"].update(launch)))


def test_torchrun_reads_the_launch_back_as_given(tmp_path, monkeypatch):
    """The argument list means to torchrun's own parser exactly the params and the stage's arguments; a process
    torchrun started (WORLD_SIZE set) does the work itself instead of launching again."""
    from torch.distributed.run import parse_args

    one = load_params(_params(tmp_path, lambda p: p["launch"].update(nproc_per_node=4))).launch
    assert distributed.torchrun_args(one, ["classify", "xray_sex", "vgg16"]) == [
        "--standalone", "--nproc-per-node", "4", "--module", "biomedsynth", "classify", "xray_sex", "vgg16"]
    nodes = load_params(_params(tmp_path, lambda p: p["launch"].update(
        nproc_per_node=8, nnodes=2, node_rank=1, rdzv_endpoint="node0:29500"))).launch
    args = parse_args(distributed.torchrun_args(nodes, ["train-gan", "dcgan-x_norm-cond", "--params", "p.yaml"]))
    assert (args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint, args.standalone, args.module) == (
        "8", "2", 1, "node0:29500", False, True)
    assert (args.training_script, args.training_script_args) == (
        "biomedsynth", ["train-gan", "dcgan-x_norm-cond", "--params", "p.yaml"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.run_workers(one, ["classify", "xray_sex", "vgg16"]) is None


@pytest.mark.e2e
def test_a_failing_worker_fails_the_command(tmp_path):
    """2 processes with no task data: each worker says why in one line and the command exits 1, so DVC
    does not take the stage for done."""
    _params(tmp_path, lambda p: p["launch"].update(nproc_per_node=2))
    run = subprocess.run(["biomedsynth", "classify", "xray_sex", "vgg16"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "2 processes: torchrun" in run.stdout
    assert run.stderr.count("biomedsynth: ") == 2 and "Traceback" not in run.stderr

import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from biomedsynth.cli import app
from biomedsynth.params import DVC_IGNORED_KEYS, ParamsError, load_params
from biomedsynth.params_edit import PROFILES_DIR, apply_profile, dotted_keys, profile_table, profile_values, set_params

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, edit):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_and_profiles_validate(tmp_path):
    assert load_params(ROOT / "params.yaml").profile == "default"
    for name in ("smoke", "default", "paper"):
        path = tmp_path / f"{name}.yaml"
        shutil.copy(ROOT / "params.yaml", path)
        apply_profile(name, path)
        assert load_params(path).profile == name


def test_no_knob_is_named_like_dvc_file_metadata():
    def keys(d):
        return {k for k, v in d.items()} | {k2 for v in d.values() if isinstance(v, dict) for k2 in keys(v)}
    assert not keys(yaml.safe_load((ROOT / "params.yaml").read_text())) & DVC_IGNORED_KEYS


def test_profiles_hold_only_what_they_change_and_set_the_same_keys():
    """profiles/smoke.yaml and paper.yaml once restated all 71 keys of the default profile; now each holds only
    the values it changes, and laid over the default profile every profile sets the same keys."""
    default = dotted_keys(yaml.safe_load((PROFILES_DIR / "default.yaml").read_text()))
    for name in ("smoke", "paper"):
        changes = dotted_keys(yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text()))
        assert [key for key, value in changes.items() if default.get(key) == value] == []  # nothing restated
        assert len(changes) < len(default) and set(dotted_keys(profile_values(name))) == set(default)
    assert sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")) == ["default", "paper", "smoke"]


def test_profile_show_sets_the_profiles_side_by_side():
    names, rows = profile_table()
    assert names == ["default", "paper", "smoke"]
    table = dict(rows)
    assert table["gan.stages"] == ["table3", "all", "all"] and table["ingest.xray.image_size"] == [64, 512, 32]
    assert "seed" not in table and "profile" not in table  # keys no profile changes are left out
    shown = CliRunner().invoke(app, ["profile", "--show"])
    assert shown.exit_code == 0 and len(shown.output.splitlines()) == len(rows) + 1
    assert CliRunner().invoke(app, ["profile"]).exit_code == 2


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["ingest"]["xray"].update(imagesize=64), "unknown key 'ingest.xray.imagesize'"),
    (lambda d: d.update(seeed=1), "unknown key 'seeed'"),
    (lambda d: d["studygroups"]["histology"]["h_norm"].update(train=-5), "studygroups.histology.h_norm.train = -5"),
    (lambda d: d["ingest"]["xray"].pop("image_size"), "missing key 'ingest.xray.image_size'"),
    (lambda d: d["ingest"]["xray"].update(on_no_lungs="guess"), "ingest.xray.on_no_lungs = 'guess'"),
    (lambda d: d["studygroups"]["xray"]["x_norm"].update(age_bins=[[30, 40], [35, 50]]), "age_bins"),
    (lambda d: d["tasks"].update(compare=["sg2ada", "sg2ada"]), "tasks.compare = ['sg2ada', 'sg2ada']: lists sg2ada "
                                                                 "more than once"),
    (lambda d: d["tasks"].update(compare=["vae"]), "tasks.compare.0 = 'vae'"),
    (lambda d: d["tasks"].update(compare=["diffusion"]),
     "the benchmark (tasks) uses diffusion-h_norm-uncond, which gan.stages does not list"),
])
def test_bad_params_name_the_key(tmp_path, edit, message):
    with pytest.raises(ParamsError) as err:
        load_params(_write(tmp_path, edit))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch):
    path = _write(tmp_path, lambda d: d["ingest"]["xray"].update(image_size=-64))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["ingest", "xray", "--params", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "ingest.xray.image_size = -64" in lines[0] and "greater than or equal to 16" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_profile_switch_keeps_comments_and_reports_changes(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    changed = apply_profile("smoke", path)
    assert "ingest.xray.image_size" in changed and "profile" in changed
    text = path.read_text()
    assert "# Every knob of the pipeline" in text and load_params(path).ingest.xray.image_size == 32
    apply_profile("default", path)
    assert yaml.safe_load(path.read_text()) == yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in ("paper", "smoke", "default"):  # switched back, the file's own bytes: no comment drifts
        apply_profile(name, path)
    assert path.read_text() == (ROOT / "params.yaml").read_text()
    with pytest.raises(ParamsError, match="does not exist"):
        apply_profile("huge", path)


def test_set_writes_values_as_yaml_keeps_comments_and_checks(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    before = path.read_text()
    assert set_params(["sources.xray.format=manifest", "sources.xray.csv=data/raw/xray/manifest.csv",
                       "classify.replicates=2", "classify.vgg16.weights=null"], path) == [
        "sources.xray.format", "sources.xray.csv", "classify.replicates"]
    p = load_params(path)
    assert (p.sources.xray.format, str(p.sources.xray.csv), p.classify.replicates) == (
        "manifest", "data/raw/xray/manifest.csv", 2)
    changed = [line for line in path.read_text().splitlines() if line not in before.splitlines()]
    assert len(changed) == 3 and "# replicate r trains the real arm" in changed[-1]  # comments stay
    assert "weights: null" in path.read_text()
    for bad, message in [(["sources.xray.formt=nih"], "key 'sources.xray.formt' is not in"),
                         (["sources.xray.format=dicom"], "sources.xray.format = 'dicom'"),
                         (["seed"], "expected key=value"),
                         (["classify.replicates=4"], r"classify.replicates \(4\) needs as many synthetic draws: "
                                                     "synthesize.draws is 3")]:
        with pytest.raises(ParamsError, match=message):
            set_params(bad, path)
    assert load_params(path).sources.xray.format == "manifest"  # a refused change writes nothing


# knobs that size an allocation; 2**30 is type-valid for each (a multiple of 128 for swd_directions)
ALLOCATING = ["gan.histology.latent_dim", "gan.xray.batch_size", "gan.dcgan.base_width", "gan.pggan.fmap_max",
              "gan.sg2ada.channel_max", "gan.sg2ada.mapping_layers", "gan.score.images", "gan.score.swd_directions",
              "synthesize.batch_size", "synthesize.evidence.images", "synthesize.evidence.side",
              "classify.vgg16.batch_size", "classify.vgg16.input_side", "sample.xray.max_side",
              "sample.histology.width"]


def _set_refused(tmp_path, monkeypatch, assignment: str) -> str:
    """`biomedsynth set assignment` on a copy of params.yaml: its one-line refusal (exit 2), the file unchanged."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    result = CliRunner().invoke(app, ["set", assignment])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert Path("params.yaml").read_text() == (ROOT / "params.yaml").read_text()
    return result.output


@pytest.mark.parametrize("knob", ALLOCATING)
def test_a_knob_too_big_to_allocate_is_refused_by_set_in_one_line(tmp_path, monkeypatch, knob):
    output = _set_refused(tmp_path, monkeypatch, f"{knob}={2 ** 30}")
    assert f"{knob} = {2 ** 30}: Input should be less than or equal to" in output


def test_the_issues_latent_dim_stops_train_gan_in_one_line_before_any_work(tmp_path, monkeypatch):
    """1e9 as `dvc exp run -S` can leave it in params.yaml: a float, which pydantic takes as an int. On the old code
    it passed params load (with data, train-gan then died allocating, in a traceback)."""
    path = _write(tmp_path, lambda d: d["gan"]["histology"].update(latent_dim=1e9))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train-gan", "dcgan-h_norm-uncond"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "gan.histology.latent_dim = 1000000000.0: Input should be less than or equal to 4096" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("value", ["[fd00::1]:29500", "`whoami`", "[a", "{a: 1}: 2"])
def test_set_refuses_a_value_yaml_cannot_read_in_one_line(tmp_path, monkeypatch, value):
    """The first is the IPv6 form launch.rdzv_endpoint's own message suggests: set as YAML text, it works."""
    output = _set_refused(tmp_path, monkeypatch, f"launch.rdzv_endpoint={value}")
    assert f"launch.rdzv_endpoint = {value!r} is not a YAML value" in output
    assert CliRunner().invoke(app, ["set", 'launch.rdzv_endpoint="[fd00::1]:29500"']).exit_code == 0
    assert load_params("params.yaml").launch.rdzv_endpoint == "[fd00::1]:29500"


def test_device_knob_pins_the_device_unless_the_environment_says_otherwise(tmp_path, monkeypatch):
    from biomedsynth import cli
    from biomedsynth.distributed import pick_device

    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    set_params(["device=cpu"], path)
    monkeypatch.delenv("BIOMEDSYNTH_DEVICE", raising=False)
    cli._params(path)
    assert os.environ["BIOMEDSYNTH_DEVICE"] == "cpu" and pick_device().type == "cpu"
    monkeypatch.setenv("BIOMEDSYNTH_DEVICE", "cuda:3")
    cli._params(path)
    assert os.environ["BIOMEDSYNTH_DEVICE"] == "cuda:3"


def test_x_norm_age_bins_follow_the_age_task_unless_set(tmp_path):
    """The age task's ranges are stated once: an X-ray group with age_bins: null takes them."""
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    set_params(["tasks.xray.age.young=[20, 35]", "tasks.xray.age.mature=[50, 70]"], path)
    p = load_params(path)
    assert p.studygroups.xray.x_norm.age_bins == [(20, 35), (50, 70)]
    assert p.studygroups.xray.x_norm_l.age_bins == [(18, 30), (31, 47), (48, 77)]  # set explicitly: kept
    with pytest.raises(ParamsError, match="young must end before mature starts"):
        set_params(["tasks.xray.age.mature=[30, 70]"], path)


def test_set_writes_a_list_emptied_again_as_valid_yaml(tmp_path):
    """Reproduced first: after the smoke profile filled export.allow_unlearnt, `set export.allow_unlearnt=[]` wrote a
    bare `[]` under the commented key (a YAML scanner error and a traceback). Lists are now written in flow style."""
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    set_params(["export.allow_unlearnt=[pggan-x_norm-cond]"], params)
    set_params(["export.allow_unlearnt=[]"], params)
    assert load_params(params).export.allow_unlearnt == []
    assert "  allow_unlearnt: []" in params.read_text()


def _stages(path) -> list[str]:
    return list(yaml.safe_load(Path(path).read_text())["gan"]["stages"])


def test_a_gan_stages_preset_is_written_as_its_table_under_the_tasks_as_set(tmp_path):
    """gan.stages is the table dvc.yaml loops over; `set` writes a preset's from the tasks it leaves, and a Table 3
    set no stage draws is refused at load (every command, check_params first), naming the -S that adds its stage."""
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    assert _stages(path) == ["dcgan-h_norm-uncond", "dcgan-h_tumor-uncond", "pggan-x_norm-cond"]  # table3
    assert set_params(["gan.stages=table3_sets"], path) == ["gan.stages"]
    assert _stages(path) == [f"{a}-{s}" for a in ("dcgan", "pggan", "sg2ada", "diffusion")
                             for s in ("x_norm-cond", "h_norm-uncond", "h_tumor-uncond")]
    assert len(set_params(["gan.stages=all"], path)) == 1 and len(_stages(path)) == 24
    assert set_params(["tasks.xray.arch=sg2ada", "gan.stages=table3"], path) == ["tasks.xray.arch", "gan.stages"]
    assert _stages(path) == ["dcgan-h_norm-uncond", "dcgan-h_tumor-uncond", "sg2ada-x_norm-cond"]
    assert set_params(["gan.stages=table3"], path) == []  # the same table: nothing changed
    with pytest.raises(ParamsError, match=r"the benchmark \(tasks\) uses dcgan-x_norm-cond, which gan.stages does not "
                       r"list: add it \(`biomedsynth set gan.stages=table3`, or dvc exp run -S "
                       r"'\+\+gan.stages.dcgan-x_norm-cond=\{arch: dcgan, group: x_norm, modality: xray\}'\)"):
        set_params(["tasks.xray.arch=dcgan"], path)
    with pytest.raises(ParamsError, match="gan.stages = 'table4': a preset"):
        set_params(["gan.stages=table4"], path)
    assert load_params(path).tasks.xray.arch == "sg2ada"  # nothing refused was written
    # the compared generators' stages are Table 3's too: table3 adds them, each on the task's group and setup
    assert set_params(["tasks.compare=[diffusion, dcgan]", "gan.stages=table3"], path) == ["tasks.compare", "gan.stages"]
    assert _stages(path) == ["dcgan-x_norm-cond", "dcgan-h_norm-uncond", "dcgan-h_tumor-uncond", "sg2ada-x_norm-cond",
                             "diffusion-x_norm-cond", "diffusion-h_norm-uncond", "diffusion-h_tumor-uncond"]
    assert ("    diffusion-h_tumor-uncond: {arch: diffusion, group: h_tumor, modality: histology}\n"
            in path.read_text())  # one line per stage, however long


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"dcgan-h_norm-uncond": {"arch": "pggan", "group": "h_norm", "modality": "histology"}}),
     "gan.stages: dcgan-h_norm-uncond: its entry must be {arch: dcgan, group: h_norm, modality: histology}"),
    (lambda s: s.update({"dcgan-h_norm-cond": {"arch": "dcgan", "group": "h_norm", "modality": "histology"}}),
     "gan.stages: 'dcgan-h_norm-cond' is no GAN stage"),  # the study trained no conditional histology model
    (lambda s: s.update({"x;touch X": {"arch": "dcgan", "group": "x_norm", "modality": "xray"}}),
     "gan.stages: 'x;touch X' is no GAN stage"),
    (lambda s: s.pop("pggan-x_norm-cond"), "the benchmark (tasks) uses pggan-x_norm-cond, which gan.stages does not"),
])
def test_a_gan_stage_entry_must_be_the_one_its_name_says(tmp_path, edit, message):
    path = _write(tmp_path, lambda d: edit(d["gan"]["stages"]))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_a_preset_left_in_the_file_by_an_earlier_version_is_refused_and_set_mends_it(tmp_path):
    path = _write(tmp_path, lambda d: d["gan"].update(stages="table3"))
    with pytest.raises(ParamsError, match="gan.stages = 'table3': a table of GAN stages, not a preset: `biomedsynth "
                                          "set gan.stages=table3` writes table3's"):
        load_params(path)
    result = CliRunner().invoke(app, ["set", "gan.stages=table3", "--params", str(path)])
    assert result.exit_code == 0, result.output
    assert list(load_params(path).gan.stages) == ["dcgan-h_norm-uncond", "dcgan-h_tumor-uncond", "pggan-x_norm-cond"]

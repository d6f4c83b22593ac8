"""Writing params.yaml: a profile's keys (profiles/<name>.yaml over the default profile's) and `biomedsynth set`'s,
comments and order kept, the result checked (params.py) before it is written. A gan.stages preset becomes its table
here, under the tasks as set."""
from __future__ import annotations

from io import StringIO
from pathlib import Path

import yaml
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from biomedsynth.params import GAN_STAGE_PRESETS, Params, ParamsError, Tasks, error_line, gan_stages_preset
from biomedsynth.store import atomic_write_text

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"


BASE_PROFILE = "default"  # every profile file holds only what it changes in this one


def _profile_file(name: str, profiles_dir: Path) -> dict:
    path = Path(profiles_dir) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(profiles_dir).glob("*.yaml"))
        raise ParamsError(f"profile '{name}' does not exist (known: {', '.join(known)})")
    return yaml.safe_load(path.read_text())


def _changed_by(base: dict, changes: dict) -> dict:
    """`base` with `changes` laid over it: mappings merge key by key, any other value (a list too) replaces."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = (_changed_by(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict)
                    else value)
    return out


def profile_values(name: str, profiles_dir: Path = PROFILES_DIR) -> dict:
    """Every key a profile sets: the default profile's, with profiles/<name>.yaml's changes over them."""
    base = _profile_file(BASE_PROFILE, profiles_dir)
    return base if name == BASE_PROFILE else _changed_by(base, _profile_file(name, profiles_dir))


def profile_table(profiles_dir: Path = PROFILES_DIR) -> tuple[list[str], list[tuple[str, list]]]:
    """(profile names, default first; [(dotted key, its value in each)]) for every key some profile changes."""
    names = [BASE_PROFILE, *sorted(p.stem for p in Path(profiles_dir).glob("*.yaml") if p.stem != BASE_PROFILE)]
    values = [dotted_keys(profile_values(n, profiles_dir)) for n in names]
    return names, [(key, [v[key] for v in values]) for key in values[0]
                   if key != "profile" and any(v[key] != values[0][key] for v in values)]


def dotted_keys(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        out.update(dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def apply_profile(name: str, params_path: Path | str = "params.yaml", profiles_dir: Path = PROFILES_DIR) -> list[str]:
    """Set every key of the profile (profile_values: the default profile and profiles/<name>.yaml's changes) in
    params.yaml, keeping its comments and order.

    Returns the dotted keys whose values changed. The result is validated before it is written.
    """
    return _overlay(profile_values(name, profiles_dir), Path(params_path), str(Path(profiles_dir) / f"{name}.yaml"))


def set_params(assignments: list[str], params_path: Path | str = "params.yaml") -> list[str]:
    """Set dotted keys from `key=value` strings (values read as YAML: 2, null, [1, 2], text), keeping
    comments and order; the same checks as a profile. Returns the keys whose values changed."""
    overlay: dict = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"'{item}': expected key=value, e.g. sources.xray.format=manifest")
        *parents, leaf = key.split(".")
        node = overlay
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:  # e.g. [fd00::1]:29500, which YAML starts reading as a list
            why = getattr(e, "problem", None) or str(e).splitlines()[0]  # YAML's own line, without its position
            raise ParamsError(f"set: {key} = {text!r} is not a YAML value ({why}); "
                              f"quote it to set it as text: '{key}=\"{text}\"'") from None
    return _overlay(overlay, Path(params_path), "set")


def _overlay(overlay: dict, params_path: Path, source: str) -> list[str]:
    """Write `overlay`'s values into params_path, keeping comments and order, after validating the result."""
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 120  # params.yaml's width: a stage's entry stays on its line (at 80 one wrapped mid-entry)
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(params_path.read_text())
    changed: list[str] = []

    def merge(node, over, prefix):
        for key, value in over.items():
            dotted = f"{prefix}{key}"
            if not hasattr(node, "keys") or key not in node:
                raise ParamsError(f"{source}: key '{dotted}' is not in {params_path}")
            if isinstance(value, dict) and dotted != "gan.stages":  # a table is set whole, not merged into
                merge(node[key], value, dotted + ".")
            elif node[key] != value:
                if isinstance(value, list):  # in flow style, as params.yaml writes every list: a sequence
                    node[key] = CommentedSeq(value)  # loaded from `[]` would dump in block style, and emptied
                    node[key].fa.set_flow_style()    # again, as a bare `[]` under its commented key (invalid YAML)
                else:
                    node[key] = value
                _align_comment(node, key)
                changed.append(dotted)

    before = dict(doc["gan"]["stages"]) if isinstance(doc["gan"]["stages"], dict) else None
    merge(doc, overlay, "")
    if isinstance(preset := doc["gan"]["stages"], str):  # a preset: its table, under the tasks as now set
        doc["gan"]["stages"] = _stage_table_doc(_not_a_preset_name(preset, source), doc["tasks"])
        if doc["gan"]["stages"] == before:
            changed.remove("gan.stages")
    buf = StringIO()
    rt.dump(doc, buf)
    try:
        Params.model_validate(yaml.safe_load(buf.getvalue()))
    except ValidationError as e:
        raise ParamsError(error_line(Path(source), e, yaml.safe_load(buf.getvalue()))) from None
    atomic_write_text(params_path, buf.getvalue())
    return changed


def _align_comment(mapping: CommentedMap, key: str) -> None:
    """Put the end-of-line comment of a key just set where most of its neighbours' comments start, unless one
    already starts where it does: ruamel keeps the column the file had, so a profile switched to and back (a long
    list, then null) left the comment where the list had pushed it."""
    def column(k):
        token = (mapping.ca.items.get(k) or [None] * 3)[2]
        return None if token is None else token.column
    columns = [c for k in mapping if k != key and (c := column(k)) is not None]
    if column(key) is not None and columns and column(key) not in columns:
        mapping.ca.items[key][2].column = min(set(columns), key=lambda c: (-columns.count(c), c))


def _not_a_preset_name(preset: str, source: str) -> str:
    if preset not in GAN_STAGE_PRESETS:
        raise ParamsError(f"{source}: gan.stages = {preset!r}: a preset ({', '.join(GAN_STAGE_PRESETS)}) or a table")
    return preset


def _stage_table_doc(preset: str, tasks_doc) -> CommentedMap:
    """gan.stages' table for a preset as params.yaml writes it, one line per stage."""
    try:
        tasks = Tasks.model_validate(tasks_doc)
    except ValidationError:  # the whole file's check, next, names the key
        return CommentedMap()
    table = CommentedMap()
    for name, entry in gan_stages_preset(preset, tasks).items():
        table[name] = CommentedMap(entry)
        table[name].fa.set_flow_style()
    return table

"""A stage's deps list the project modules its command runs (issue 27): from dvc.yaml's cmd to the CLI function, the
cli.py helpers it calls, the project modules those import and, transitively, every module they import (at the top or
inside a function). A module edited but not listed would leave the stage's outputs stale under `dvc repro`."""
import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CLI = SRC / "biomedsynth" / "cli.py"

# Modules a stage runs whose code cannot change what it writes, so editing them must not rerun the study.
NOT_SHAPING_OUTPUTS = {
    "biomedsynth.cli": "the dispatcher and what it imports for every command (argument names, error types): each "
                       "command's body and the helpers it calls are followed instead",
    "biomedsynth.lifetime": "signals and child processes: how a stage stops, not what it writes",
    "biomedsynth.tracking": "MLflow, a copy of the outputs beside them (tests/test_tracking.py)",
    "biomedsynth.paths": "the output paths, checked against dvc.yaml's outs and deps (tests/test_paths.py)",
    "biomedsynth.params": "the params models: every value a stage reads is a key of params.yaml, which DVC tracks "
                          "key by key, and check_params (deps params.py) validates the file before any stage runs",
    "biomedsynth.provenance": "the fingerprint of what a run read (code, data, params), written beside the metrics",
    "biomedsynth": "caps numpy's and torch's CPU kernels at AVX2, so every CPU computes what an AVX2 one does: like the "
                   "machine and the package versions (which DVC does not track either), it decides no output's design",
}


def _module_file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(tree: ast.AST, package: str) -> set[str]:
    """The project modules an AST imports, `from biomedsynth import x` counted as biomedsynth.x when x is a module."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("biomedsynth")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import, from the importing package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("biomedsynth"):
                continue
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}")}
    return {m for m in found if _module_file(m)}


def _closure(modules: set[str]) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module in seen or module in NOT_SHAPING_OUTPUTS:
            continue
        seen.add(module)
        path = _module_file(module)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        parents = [".".join(module.split(".")[:i]) for i in range(2, module.count(".") + 1)]
        todo += [*_imported(ast.parse(path.read_text()), package), *parents]  # a package's __init__ runs first
    return seen


def _command_modules() -> dict[str, set[str]]:
    """For each CLI command, the project modules its function and the cli.py helpers it calls import."""
    tree = ast.parse(CLI.read_text())
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}

    def reached(name: str, seen: set[str]) -> set[str]:
        seen.add(name)
        fn = functions[name]
        mods = _imported(fn, "biomedsynth")
        for node in ast.walk(fn):
            if isinstance(node, ast.Name) and node.id in functions and node.id not in seen:
                mods |= reached(node.id, seen)
        return mods

    commands = {}
    for fn in functions.values():
        for dec in fn.decorator_list:
            if isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "command":
                name = dec.args[0].value if dec.args else fn.name.replace("_", "-")
                commands[name] = reached(fn.name, set())
    return commands


def _runs_nothing(module: str) -> bool:
    """A package's __init__ of a docstring at most: importing it runs no code."""
    body = ast.parse(_module_file(module).read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def _covered(module: str, deps: list[str]) -> bool:
    path = _module_file(module).relative_to(ROOT)
    return _runs_nothing(module) or any(path == Path(d) or Path(d) in path.parents for d in deps)


def unlisted(stages: dict) -> dict[str, list[str]]:
    """Per stage of dvc.yaml's `stages`, the project modules its command runs that its deps do not list."""
    commands = _command_modules()
    missing = {}
    for name, stage in stages.items():
        do = stage.get("do", stage)
        loop = stage.get("foreach")  # a loop written out here: its keys (or items) fill the code deps' ${key}
        keys = [str(k) for k in loop] if isinstance(loop, (dict, list)) else [""]
        deps = [d.replace("${key}", k).replace("${item}", k) for k in keys for d in do.get("deps", [])]
        if modules := sorted(m for m in _closure(commands[do["cmd"].split()[1]]) if not _covered(m, deps)):
            missing[name] = modules
    return missing


def test_every_stage_lists_the_project_modules_its_command_runs():
    assert unlisted(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]) == {}


def test_a_module_a_stage_imports_and_does_not_list_is_named():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stages["classify"]["deps"].remove("src/biomedsynth/tasks.py")  # benchmark.py imports it
    stages["report"]["deps"].remove("src/biomedsynth/table3.py")
    assert unlisted(stages) == {"classify": ["biomedsynth.tasks"], "report": ["biomedsynth.table3"]}
    modules = _closure(_command_modules()["report"])
    assert "biomedsynth.lifetime" not in modules  # not shaping outputs, listed above with its reason
    assert _covered("biomedsynth.gan.checkpoint", ["src/biomedsynth/gan"])
    assert not _covered("biomedsynth.gan.checkpoint", ["src/biomedsynth/gan/score.py"])

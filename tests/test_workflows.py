import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_workflows_match_githubs_schema():
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert workflows
    exe = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run([str(exe), "--builtin-schema", "vendor.github-workflows", *map(str, workflows)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

"""The same numbers on any x86-64 CPU with AVX2: every biomedsynth process caps numpy, OpenBLAS, ATen and oneDNN at AVX2
(src/biomedsynth/__init__.py). On an AVX-512 CPU their AVX-512 kernels wrote another phantom sample and other results."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import biomedsynth, numpy, torch\n"
         "try:\n    from numpy._core._multiarray_umath import __cpu_features__ as f\n"
         "except ImportError:\n    from numpy.core._multiarray_umath import __cpu_features__ as f\n"
         "print(bool(f.get('X86_V4') or f.get('AVX512_SKX')), torch.backends.cpu.get_cpu_capability())")
CAPPED = ("NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def _kernels(**env) -> tuple[bool, str]:
    """(numpy runs AVX-512 kernels, torch's CPU capability) of a new process that imports biomedsynth first."""
    clean = {k: v for k, v in os.environ.items() if k not in (*CAPPED, "BIOMEDSYNTH_CPU_KERNELS")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, "PYTHONPATH": str(ROOT / "src"), **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", out[1]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the cap is x86-64's")
def test_a_biomedsynth_process_runs_no_avx512_kernel_unless_told_to():
    avx512, capability = _kernels()
    assert not avx512 and capability in ("AVX2", "DEFAULT"), (avx512, capability)
    native = _kernels(BIOMEDSYNTH_CPU_KERNELS="native")
    if "avx512f" in Path("/proc/cpuinfo").read_text():  # where the fault showed: the native kernels are AVX-512's
        assert native == (True, "AVX512"), native
    assert _kernels(ATEN_CPU_CAPABILITY="default")[1] == "DEFAULT"  # a variable already set wins

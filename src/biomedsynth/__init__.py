"""biomedsynth: can a synthetic copy of a medical image dataset stand in for the real one?

The same numbers on any x86-64 CPU with AVX2. numpy, OpenBLAS, PyTorch's ATen and oneDNN pick AVX-512 kernels where
the CPU has them, whose floating-point results differ from the AVX2 ones in their last bits, and training amplifies
those bits: on an AVX-512 EPYC the built-in sample came out other bytes (data.dvc) and the committed default run's
X-ray feature net scored 0.61 / 0.43 (sex / age) instead of 0.72 / 0.20. Every biomedsynth process (a stage, a torchrun
worker, a sample writer) imports this package before numpy or torch, so it caps them at AVX2 here; at the same speed
on that machine (the X-ray feature net in 58 s against 64 s). A variable already set wins;
BIOMEDSYNTH_CPU_KERNELS=native leaves all four alone.
"""
import os as _os

if _os.environ.get("BIOMEDSYNTH_CPU_KERNELS") != "native":
    for _name, _value in {
        # numpy 2's names, then 1.x's: it ignores (with an ImportWarning) those it does not dispatch
        "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX "
                                    "AVX512_CLX AVX512_CNL",
        "OPENBLAS_CORETYPE": "Haswell",
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    }.items():
        _os.environ.setdefault(_name, _value)

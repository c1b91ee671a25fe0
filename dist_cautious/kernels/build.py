"""Build the native kernels like DeepSpeed's op_builder: JIT on first use (cached), or ahead of time.

The sources live in ``csrc/``: ``csrc/cpu/*.cpp`` make ``dist_cautious_cpu_kernels``,
``csrc/cuda/*.cu`` + ``csrc/cuda/*.cpp`` make ``dist_cautious_cuda_kernels``. ``setup.py`` uses
``extension_kwargs`` for the ahead-of-time build (``DIST_CAUTIOUS_BUILD_OPS=1``,
``DIST_CAUTIOUS_BUILD_CUDA=1``); ``load`` imports that build if present, else JIT-compiles into
torch's extension cache (``TORCH_EXTENSIONS_DIR``), which later processes reuse.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

CSRC = Path(__file__).resolve().parents[2] / "csrc"
MODULE_NAMES = {"cpu": "dist_cautious_cpu_kernels", "cuda": "dist_cautious_cuda_kernels"}
# No -march=native: the AVX-512 / AVX2 kernels are compiled under per-file target pragmas and
# chosen at run time by what the CPU reports, so an ahead-of-time build runs on any x86-64 CPU and
# the tests can exercise every instruction set on one machine. -ffp-contract=off: the kernels
# reproduce torch's op sequence bit for bit and must decide themselves where an FMA is used.
CPU_FLAGS = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]
# CUDA: no --use_fast_math. The kernels must round like torch's own CUDA ops (IEEE sqrt and
# division, explicit __f*_rn intrinsics): they are tested element for element against the torch
# reference path. The .cu files include no torch header, so C++17 suffices for nvcc; the binding
# .cpp gets torch's own C++ standard (no -std here). tools/check_cuda_compile.sh uses CUDA_FLAGS.
CUDA_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
CUDA_CXX_FLAGS = ["-O3"]


def sources(kind: str, root: Path = CSRC) -> list[Path]:
    folder = root / kind
    patterns = ["*.cpp"] if kind == "cpu" else ["*.cu", "*.cpp"]
    return sorted(path for pattern in patterns for path in folder.glob(pattern))


def extension_kwargs(kind: str, relative_to: Path) -> dict[str, Any]:
    """Keyword arguments for ``CppExtension`` / ``CUDAExtension`` in ``setup.py``."""
    files = [str(path.relative_to(relative_to)) for path in sources(kind, relative_to / "csrc")]
    flags = {"cxx": CPU_FLAGS} if kind == "cpu" else {"cxx": CUDA_CXX_FLAGS, "nvcc": CUDA_FLAGS}
    return dict(name=MODULE_NAMES[kind], sources=files, extra_compile_args=flags, extra_link_args=["-fopenmp"] if kind == "cpu" else [])


def load(kind: str, verbose: bool = False) -> Any:
    """The compiled module for ``kind`` ('cpu' or 'cuda'): ahead-of-time build, else JIT."""
    try:
        return importlib.import_module(MODULE_NAMES[kind])
    except ImportError:
        pass
    files = sources(kind)
    if not files:
        raise RuntimeError(f"no {kind} kernel sources under {CSRC / kind}")
    from torch.utils.cpp_extension import load as jit_load

    if kind == "cpu":
        return jit_load(name=MODULE_NAMES[kind], sources=[str(f) for f in files], extra_cflags=CPU_FLAGS, extra_ldflags=["-fopenmp"], verbose=verbose)
    return jit_load(
        name=MODULE_NAMES[kind],
        sources=[str(f) for f in files],
        extra_cflags=CUDA_CXX_FLAGS,
        extra_cuda_cflags=CUDA_FLAGS,
        verbose=verbose or bool(os.environ.get("DIST_CAUTIOUS_VERBOSE_BUILD")),
    )

"""Build the CPU-emulated CUDA extension: the real ``csrc/cuda`` sources on host threads (tests only).

``load()`` JIT-compiles (``torch.utils.cpp_extension.load``, cached in torch's extension
directory) the real ``csrc/cuda/elementwise.cu``, ``factored.cu``, ``came_factors.cu``,
``step_scalars.cu`` and ``binding.cpp`` with the host C++ compiler, against the CUDA-on-CPU
headers in ``include/`` instead of the CUDA toolkit's.
The module has the shipped binding's entry points and checks, on CPU tensors, so
``CudaOps(load(), device_type="cpu")`` runs the whole CUDA path (wrapper, binding, launchers,
kernels) on the CPU.

The sizes are small so that every boundary occurs at small sizes: 64 threads per block (two
warps: the cross-warp step of every block reduction runs), 320-element chunks (not a multiple of
the 256 elements one ILP pass covers, so a chunk ends mid-pass), and 2 row passes per factored
tile (tiles of 4 rows at 32 lanes up to 128 rows at 1 lane).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
THREADS, CHUNK, ROW_ITERS = 64, 320, 2
DEFINES = {"DC_THREADS": THREADS, "DC_CHUNK": CHUNK, "DC_ROW_ITERS": ROW_ITERS}
# -ffp-contract=off: the host compiler must not fuse a*b+c where the kernels round each op (the
# __f*_rn intrinsics); the kernels' own fused ops are explicit __fmaf_rn calls.
FLAGS = ["-O2", "-std=c++20", "-ffp-contract=off", "-pthread"] + [f"-D{k}={v}" for k, v in DEFINES.items()]
SOURCES = ["emu_elementwise.cpp", "emu_factored.cpp", "emu_came_factors.cpp", "emu_step_scalars.cpp", "emu_binding.cpp", "emu_probe.cpp"]
NAME = "dist_cautious_cuda_on_cpu"

_module: Any = None


def load(verbose: bool = False) -> Any:
    """The emulated extension (built on first use, then imported from torch's cache)."""
    global _module
    if _module is None:
        import torch
        from torch.utils.cpp_extension import load as jit_load

        _module = jit_load(
            name=NAME,
            sources=[str(HERE / name) for name in SOURCES],
            extra_cflags=FLAGS,
            extra_include_paths=[str(HERE / "include")],
            extra_ldflags=["-pthread"],
            verbose=verbose or bool(os.environ.get("DIST_CAUTIOUS_VERBOSE_BUILD")),
        )
        torch.ops.load_library(_module.__file__)  # the probe ops (torch.ops.dc_cuda_emu)
    return _module

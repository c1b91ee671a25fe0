"""Build the native kernels like DeepSpeed's op_builder: JIT on first use (cached), or ahead of time.

The sources live in ``csrc/``: ``csrc/cpu/*.cpp`` make ``dist_cautious_cpu_kernels``,
``csrc/cuda/*.cu`` + ``csrc/cuda/*.cpp`` make ``dist_cautious_cuda_kernels``. ``setup.py`` uses
``extension_kwargs`` for the ahead-of-time build (``DIST_CAUTIOUS_BUILD_OPS=1``,
``DIST_CAUTIOUS_BUILD_CUDA=1``); ``load`` imports that build if present, else JIT-compiles into
torch's extension cache (``TORCH_EXTENSIONS_DIR``), which later processes reuse.

``cache_state`` says, without building, which of these ``load`` will do: import an
ahead-of-time build, load the JIT cache as it is, or compile (about half a minute for the CPU
kernels on two cores). ``load`` logs one INFO line on the ``dist_cautious`` logger before a
compile starts, so that a first run does not sit silent; the CLI shows that logger on stderr.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

CSRC = Path(__file__).resolve().parents[2] / "csrc"
MODULE_NAMES = {"cpu": "dist_cautious_cpu_kernels", "cuda": "dist_cautious_cuda_kernels"}
# No -march=native: the AVX-512 / AVX2 kernels are compiled under per-file target pragmas and
# chosen at run time by what the CPU reports, so an ahead-of-time build runs on any x86-64 CPU and
# the tests can exercise every instruction set on one machine. -ffp-contract=off: the kernels
# reproduce torch's op sequence bit for bit and must decide themselves where an FMA is used.
# -fno-math-errno: no kernel reads errno, and without it a loop with std::sqrt does not vectorize
# (CAME's factor loops ran 4x slower than the torch ops they replace); no value changes.
CPU_FLAGS = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off", "-fno-math-errno"]
# CUDA: no --use_fast_math. The kernels must round like torch's own CUDA ops (IEEE sqrt and
# division, explicit __f*_rn intrinsics): they are tested element for element against the torch
# reference path. The .cu files include no torch header, so C++17 suffices for nvcc; the binding
# .cpp gets torch's own C++ standard (no -std here). tools/check_cuda_compile.sh uses CUDA_FLAGS.
CUDA_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
CUDA_CXX_FLAGS = ["-O3"]

logger = logging.getLogger(__name__)  # a child of "dist_cautious": the CLI's handler shows it
#: How long a JIT build takes, for the messages (CPU: measured on 2 cores; CUDA: nvcc, slower).
BUILD_TIME = {"cpu": "about half a minute", "cuda": "minutes"}


def sources(kind: str, root: Path = CSRC) -> list[Path]:
    folder = root / kind
    patterns = ["*.cpp"] if kind == "cpu" else ["*.cu", "*.cpp"]
    return sorted(path for pattern in patterns for path in folder.glob(pattern))


def extension_kwargs(kind: str, relative_to: Path) -> dict[str, Any]:
    """Keyword arguments for ``CppExtension`` / ``CUDAExtension`` in ``setup.py``."""
    files = [str(path.relative_to(relative_to)) for path in sources(kind, relative_to / "csrc")]
    flags = {"cxx": CPU_FLAGS} if kind == "cpu" else {"cxx": CUDA_CXX_FLAGS, "nvcc": CUDA_FLAGS}
    return dict(name=MODULE_NAMES[kind], sources=files, extra_compile_args=flags, extra_link_args=["-fopenmp"] if kind == "cpu" else [])


def _jit_arguments(kind: str) -> dict[str, Any]:
    """The keyword arguments ``load`` passes to ``torch.utils.cpp_extension.load`` (bar
    ``verbose``): one definition for the build and for ``cache_state``'s prediction of it."""
    files = sources(kind, CSRC)
    if not files:
        raise RuntimeError(f"no {kind} kernel sources under {CSRC / kind}")
    arguments: dict[str, Any] = dict(name=MODULE_NAMES[kind], sources=[str(f) for f in files])
    if kind == "cpu":
        return dict(arguments, extra_cflags=CPU_FLAGS, extra_ldflags=["-fopenmp"])
    return dict(arguments, extra_cflags=CUDA_CXX_FLAGS, extra_cuda_cflags=CUDA_FLAGS)


@dataclass(frozen=True)
class CacheState:
    """What ``load(kind)`` would do now, found without compiling anything.

    ``status``: ``"ahead-of-time"`` (an installed build is imported), ``"cached"`` (torch's JIT
    cache holds an up-to-date build: loaded in about a second), ``"build"`` (``load`` compiles:
    nothing cached yet, or sources, flags, compiler or torch changed since), ``"unavailable"``
    (``load`` would fail, e.g. no ninja), ``"unknown"`` (the cache could not be inspected).
    ``location``: the installed module or the JIT build directory. ``reason``: why, in words.
    ``locked``: torch's build lock file exists. Every JIT load holds it briefly (while ``ninja``
    checks the build), a compile holds it throughout; ``load`` waits until it is gone, forever
    if a killed process left it behind."""

    status: str
    location: Optional[str]
    reason: str
    locked: bool = False


def _installed_spec(name: str) -> Any:
    """The import spec of an ahead-of-time build of ``name``, else None. A JIT build this process
    already loaded sits in ``sys.modules`` under the same name; it is set aside for the search."""
    loaded = sys.modules.pop(name, None)
    try:
        return importlib.util.find_spec(name)
    finally:
        if loaded is not None:
            sys.modules[name] = loaded


def cache_state(kind: str) -> CacheState:
    """Predict ``load(kind)`` exactly as torch decides it, without building.

    In a new process ``torch.utils.cpp_extension.load`` always (re)writes ``build.ninja`` in the
    build directory (``TORCH_EXTENSIONS_DIR``, else torch's cache root, then
    ``py<ver>_<cpu|cuXYZ>/<name>``) and runs ``ninja``, which compiles only what is out of date.
    So: emit the build file torch would write into a temporary folder and ask ``ninja -n`` (a
    dry run that runs and records nothing) whether it would compile anything against the
    directory's outputs and build log. This uses torch's private ninja-file writer; if that
    changes, the answer is ``"unknown"`` rather than a guess. The one side effect is torch's own:
    ``_get_build_directory`` creates the (empty) build directory if it does not exist."""
    name = MODULE_NAMES[kind]
    spec = _installed_spec(name)
    if spec is not None:
        return CacheState("ahead-of-time", spec.origin, "an ahead-of-time build is installed")
    try:
        from torch.utils import cpp_extension as extension

        arguments = _jit_arguments(kind)
        if not extension.is_ninja_available():
            return CacheState("unavailable", None, "ninja is not installed (pip install ninja): torch cannot build or load a JIT extension without it")
        directory = extension._get_build_directory(name, verbose=False)
        locked = os.path.exists(os.path.join(directory, "lock"))
        if not os.path.exists(os.path.join(directory, name + extension.LIB_EXT)):
            return CacheState("build", directory, "no build in the cache yet", locked)
        with_cuda = kind == "cuda"
        with tempfile.TemporaryDirectory() as scratch:
            build_file = os.path.join(scratch, "build.ninja")
            extension._write_ninja_file_to_build_library(
                path=build_file,
                name=name,
                sources=arguments["sources"],
                extra_cflags=arguments.get("extra_cflags", []),
                extra_cuda_cflags=arguments.get("extra_cuda_cflags", []),
                extra_sycl_cflags=[],
                extra_ldflags=extension._prepare_ldflags(arguments.get("extra_ldflags", []), with_cuda, False, False, False),
                extra_include_paths=[],
                with_cuda=with_cuda,
                with_sycl=False,
                is_standalone=False,
            )
            dry_run = subprocess.run(["ninja", "-n", "-C", directory, "-f", build_file], capture_output=True, text=True, timeout=60)
    except Exception as error:  # a torch version whose private writer differs, a broken CUDA set-up
        return CacheState("unknown", None, f"could not inspect torch's extension cache ({type(error).__name__}: {error})")
    if dry_run.returncode != 0:
        return CacheState("unknown", directory, f"ninja -n failed: {(dry_run.stderr or dry_run.stdout).strip()[-300:]}", locked)
    if "no work to do" in dry_run.stdout:
        return CacheState("cached", directory, "built and cached", locked)
    return CacheState("build", directory, "the cached build is out of date (sources, flags, compiler or torch changed)", locked)


def load(kind: str, verbose: bool = False) -> Any:
    """The compiled module for ``kind`` ('cpu' or 'cuda'): ahead-of-time build, else JIT.

    Before a JIT compile (``cache_state`` is not ``cached``) one INFO line says it is starting
    and about how long it takes; after it, one line says how long it took."""
    try:
        return importlib.import_module(MODULE_NAMES[kind])
    except ImportError:
        pass
    arguments = _jit_arguments(kind)
    from torch.utils.cpp_extension import load as jit_load

    state = cache_state(kind)
    compiles = state.status != "cached"
    if compiles:
        label = kind.upper()
        if state.locked:  # another process (a rank, a test) is building it; torch waits for it
            logger.info("dist_cautious: waiting for another process building the native %s kernels (%s; lock %s/lock)...", label, state.reason, state.location)
        else:
            logger.info("dist_cautious: building the native %s kernels (%s; %s, once per source change)...", label, state.reason, BUILD_TIME[kind])
    start = time.perf_counter()
    module = jit_load(**arguments, verbose=verbose or bool(os.environ.get("DIST_CAUTIOUS_VERBOSE_BUILD")))
    if compiles:
        logger.info("dist_cautious: native %s kernels ready after %.0f s (cached in %s)", kind.upper(), time.perf_counter() - start, state.location or "torch's extension cache")
    return module

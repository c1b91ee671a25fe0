"""dist_cautious: CautiousAdamW, CAME and CautiousLion, exact under FSDP2 and DeepSpeed ZeRO.

Native kernels are JIT-built on first use. To build them ahead of time at install, set
``DIST_CAUTIOUS_BUILD_OPS=1`` (CPU kernels) and/or ``DIST_CAUTIOUS_BUILD_CUDA=1`` (CUDA kernels,
needs nvcc), and install with ``--no-build-isolation`` so the build sees your torch.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def native_extensions():
    """Ahead-of-time builds, only when asked for: importing torch here needs the user's torch."""
    want_cpu = os.environ.get("DIST_CAUTIOUS_BUILD_OPS") == "1"
    want_cuda = os.environ.get("DIST_CAUTIOUS_BUILD_CUDA") == "1"
    if not (want_cpu or want_cuda):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    import importlib.util

    spec = importlib.util.spec_from_file_location("_build", ROOT / "dist_cautious" / "kernels" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    extensions = []
    if want_cpu:
        extensions.append(CppExtension(**build.extension_kwargs("cpu", relative_to=ROOT)))
    if want_cuda:
        extensions.append(CUDAExtension(**build.extension_kwargs("cuda", relative_to=ROOT)))
    return extensions, {"build_ext": BuildExtension}


ext_modules, cmdclass = native_extensions()

setup(
    name="dist_cautious",
    version="0.1.0",
    description="Cautious AdamW, CAME and Lion optimizers, exact under FSDP2 and DeepSpeed ZeRO sharding",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dist_cautious", "dist_cautious.*"]),
    python_requires=">=3.9",
    # ninja: torch.utils.cpp_extension JIT-builds the native kernels with it on first use
    # the tested releases: torch 2.13, deepspeed 0.19.8 (dist_cautious/versions.py refuses others at run
    # time unless DIST_CAUTIOUS_ALLOW_UNTESTED=1); no upper bound here, so pip never replaces a GPU user's torch
    install_requires=["torch>=2.13", "tqdm", "matplotlib", "ninja"],
    extras_require={"deepspeed": ["deepspeed>=0.19.8"], "mpi": ["mpi4py"]},
    entry_points={"console_scripts": ["dist-cautious=dist_cautious.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

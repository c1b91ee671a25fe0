"""One entry per fused op, chosen by device: native CPU SIMD / CUDA kernels, or the torch reference.

``ops_for(device)`` returns a namespace with the functions of ``kernels.reference``. The native
modules (``cpu_ops`` for CPU tensors, ``cuda_ops`` for CUDA tensors) expose ``load()``, which
JIT-builds and returns such a namespace or raises. ``DIST_CAUTIOUS_KERNELS`` chooses:
``auto`` (default: native where it builds and passes ``selfcheck.verify`` against the reference
path, else the reference path with one warning),
``reference`` (always the torch reference path), ``native`` (fail loudly if it cannot build).
Unsupported work never falls back silently to different math: both paths compute the same.

``ops_override(device_type, namespace)`` makes ``ops_for`` return ``namespace`` for that device
type within a block, whatever the mode: the tests hand the optimizers
``cuda_ops.fake_namespace()`` with it, to run whole CUDA steps on fake tensors without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

from dist_cautious.kernels import reference, selfcheck

logger = logging.getLogger("dist_cautious")

_NATIVE_MODULES = {"cpu": "dist_cautious.kernels.cpu_ops", "cuda": "dist_cautious.kernels.cuda_ops"}
_loaded: dict[str, Any] = {}
_overrides: dict[str, Any] = {}
MODES = ("auto", "reference", "native")


def kernel_mode() -> str:
    mode = os.environ.get("DIST_CAUTIOUS_KERNELS", "auto").lower()
    if mode not in MODES:
        raise ValueError(f"DIST_CAUTIOUS_KERNELS={mode!r}: expected one of {MODES}")
    return mode


def _load_native(device_type: str) -> Any | None:
    if device_type in _loaded:
        if _loaded[device_type] is not None or kernel_mode() != "native":
            return _loaded[device_type]
        # an earlier ``auto`` call fell back: under ``native`` that fallback must not be reused
        # silently, so the load is tried again and raises if it still fails
    ops = None
    try:
        module = importlib.import_module(_NATIVE_MODULES[device_type])
        candidate = module.load()
        selfcheck.verify(candidate, torch.device(device_type))
        ops = candidate
    except Exception as error:  # a missing compiler, a failed build, or a failed self-check
        if kernel_mode() == "native":
            raise RuntimeError(f"dist_cautious: native {device_type} kernels unavailable: {error}") from error
        logger.warning("dist_cautious: native %s kernels unavailable (%s); using the torch reference path", device_type, error)
    _loaded[device_type] = ops
    return ops


def ops_for(device: torch.device) -> ModuleType | Any:
    """The kernel namespace for tensors on ``device``."""
    override = _overrides.get(device.type)
    if override is not None:
        return override
    mode = kernel_mode()
    if mode == "reference" or device.type not in _NATIVE_MODULES:
        return reference
    native = _load_native(device.type)
    return reference if native is None else native


@contextlib.contextmanager
def ops_override(device_type: str, namespace: Any) -> Iterator[Any]:
    """Within the block, ``ops_for`` returns ``namespace`` for ``device_type`` tensors (nested
    overrides restore the outer one on exit). Explicit and scoped on purpose: ``ops_for`` itself
    never picks a namespace the real run would not use, e.g. under ``FakeTensorMode``, so a fake
    step shows exactly what the real step does with the kernels it names."""
    previous = _overrides.get(device_type)
    _overrides[device_type] = namespace
    try:
        yield namespace
    finally:
        if previous is None:
            _overrides.pop(device_type, None)
        else:
            _overrides[device_type] = previous


def prebuild(device_type: str = "cpu") -> None:
    """Build (or import) and self-check the native kernels for ``device_type`` in this process.

    Local launchers call it before they spawn ranks: the ranks then import a finished build,
    instead of each starting ``torch.utils.cpp_extension.load`` at once, where one compiles while
    the others wait on torch's build lock, all on the same few cores (minutes here, against the
    ranks' collective timeouts). Follows ``DIST_CAUTIOUS_KERNELS`` like ``ops_for``."""
    ops_for(torch.device(device_type))

"""The tested-versions gate: outside the torch and DeepSpeed releases this package is tested
with, fail closed.

The integrations read private layouts (DeepSpeed's flat partitions and ``_hp_mapping``, FSDP2's
DTensor shards, torch's optimizer state handling) that change between releases without notice;
an untested release could map pieces onto the wrong elements and still run. So an untested
version raises ``UntestedVersionError`` naming it and the tested range. Setting
``DIST_CAUTIOUS_ALLOW_UNTESTED=1`` runs anyway, with a warning: the tests of this package on
that version are then the user's to run.
"""

from __future__ import annotations

import os
import warnings

#: package -> (tested releases as version prefixes, what to tell the user)
TESTED: dict[str, tuple[tuple[str, ...], str]] = {
    "torch": (("2.13.",), "torch 2.13.x"),
    "deepspeed": (("0.19.8",), "deepspeed 0.19.8"),
}
ALLOW_ENV = "DIST_CAUTIOUS_ALLOW_UNTESTED"


class UntestedVersionError(RuntimeError):
    """A dependency's version is outside the range this package is tested with."""


def _release(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``; ``0.19.8+abc`` -> ``0.19.8``."""
    return version.split("+", 1)[0]


def check_version(package: str, version: str) -> None:
    """Raise ``UntestedVersionError`` (or warn, with ``DIST_CAUTIOUS_ALLOW_UNTESTED=1``) when
    ``version`` of ``package`` is not a tested release."""
    prefixes, tested = TESTED[package]
    release = _release(version)
    if any(release == prefix or (prefix.endswith(".") and release.startswith(prefix)) for prefix in prefixes):
        return
    message = f"dist_cautious is tested with {tested}, not {package} {version}"
    if os.environ.get(ALLOW_ENV) == "1":
        warnings.warn(f"{message}; running anyway because {ALLOW_ENV}=1", stacklevel=3)
        return
    raise UntestedVersionError(f"{message}: its integration reads internals that change between releases. Install a tested version, or set {ALLOW_ENV}=1 to run anyway")

"""The tested-versions gate: untested torch / DeepSpeed releases raise, naming them, unless the
user opts in (then a warning); tested ones pass silently."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from dist_cautious.versions import ALLOW_ENV, UntestedVersionError, check_version


@pytest.mark.parametrize("package, version", [("torch", "2.13.0+cpu"), ("torch", "2.13.1"), ("deepspeed", "0.19.8"), ("deepspeed", "0.19.8+deadbeef")])
def test_tested_releases_pass_silently(package: str, version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_version(package, version)


@pytest.mark.parametrize("package, version", [("torch", "2.6.0"), ("torch", "2.14.0"), ("torch", "2.1.30"), ("deepspeed", "0.19.9"), ("deepspeed", "0.16.0"), ("deepspeed", "0.19.80")])
def test_untested_releases_raise_unless_allowed(package: str, version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(UntestedVersionError, match=f"not {package} {version}.*{ALLOW_ENV}=1"):
        check_version(package, version)
    monkeypatch.setenv(ALLOW_ENV, "1")
    with pytest.warns(UserWarning, match="running anyway"):
        check_version(package, version)


def test_import_refuses_an_untested_torch() -> None:
    """The gate runs at ``import dist_cautious`` (a fresh interpreter with torch's version faked)."""
    script = "import torch; torch.__version__ = '2.99.0'; import dist_cautious"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0 and "UntestedVersionError: dist_cautious is tested with torch 2.13.x, not torch 2.99.0" in result.stderr, result.stderr[-2000:]

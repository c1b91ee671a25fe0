"""The native kernels' JIT build, as a user meets it: `report` says what `train` will do (build,
or load the cached build) without building; `load` announces a compile before it starts and
stays silent when it merely loads the cache.

A tiny stand-in extension (a bare Python module in C++, no torch headers: compiles in about a
second) takes the place of the real kernels, in a private TORCH_EXTENSIONS_DIR, so the real
cache is never touched. Whether torch really compiles is checked in fresh processes (torch
decides per process) by the library's modification time.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from cli_helpers import PYTHON, REPO, launch_env
from dist_cautious import cli
from dist_cautious.kernels import build

TINY_SOURCE = """#include <Python.h>
#define DC_CAT(a, b) a##b
#define DC_INIT(name) DC_CAT(PyInit_, name)
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "tiny", nullptr, -1, nullptr};
PyMODINIT_FUNC DC_INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module_def); }
"""

#: a fresh interpreter loads the stand-in through build.load, its log lines on stderr
LOAD_IN_FRESH_PROCESS = """
import logging, sys
from pathlib import Path
from dist_cautious.kernels import build
logging.basicConfig(level=logging.INFO, format="%(message)s")
build.CSRC, build.MODULE_NAMES = Path(sys.argv[1]), {"cpu": sys.argv[2]}
build.load("cpu")
"""


@pytest.fixture()
def tiny_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """build.py pointed at the stand-in sources and a private extension cache."""
    csrc = tmp_path / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    (csrc / "cpu" / "tiny.cpp").write_text(TINY_SOURCE)
    name = f"dc_tiny_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(build, "CSRC", csrc)
    monkeypatch.setattr(build, "MODULE_NAMES", {"cpu": name, "cuda": name + "_cuda"})
    return csrc, name


def _load_in_fresh_process(csrc: Path, name: str) -> str:
    """stderr of ``build.load('cpu')`` in a new interpreter (torch's per-process decision)."""
    result = subprocess.run(
        [PYTHON, "-c", LOAD_IN_FRESH_PROCESS, str(csrc), name], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_build_is_announced_predicted_and_reported(tiny_kernels, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    csrc, name = tiny_kernels
    state = build.cache_state("cpu")
    assert (state.status, state.reason) == ("build", "no build in the cache yet")
    library = Path(state.location) / f"{name}.so"

    # report: names the JIT build and its duration, builds nothing
    assert cli.main(["report"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("cpu kernels"))
    assert "JIT-builds it on first use, about half a minute" in line and state.location in line
    assert not library.exists()

    with caplog.at_level(logging.INFO, logger="dist_cautious"):
        build.load("cpu")
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith("dist_cautious: building the native CPU kernels (no build in the cache yet; about half a minute")
    assert messages[1].startswith("dist_cautious: native CPU kernels ready after")
    assert library.exists()

    assert build.cache_state("cpu").status == "cached"
    assert cli.main(["report"]) == 0
    assert f"built and cached in {state.location}; `train` loads it without building" in capsys.readouterr().out

    # a new process finds the cache: torch does not compile, and nothing is announced
    built_at = library.stat().st_mtime_ns
    assert "building" not in _load_in_fresh_process(csrc, name)
    assert library.stat().st_mtime_ns == built_at

    # an edited source: predicted out of date, and a new process does compile (and says so)
    source = csrc / "cpu" / "tiny.cpp"
    source.write_text(source.read_text() + "// edited\n")
    os.utime(source, ns=(built_at + 10**9, built_at + 10**9))
    state = build.cache_state("cpu")
    assert state.status == "build" and "out of date" in state.reason
    assert "dist_cautious: building the native CPU kernels (the cached build is out of date" in _load_in_fresh_process(csrc, name)
    assert library.stat().st_mtime_ns != built_at
    assert build.cache_state("cpu").status == "cached"


def test_changed_flags_make_the_cache_stale(tiny_kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags are part of torch's build file: a flag change means a compile, like a source edit."""
    build.load("cpu")
    assert build.cache_state("cpu").status == "cached"
    monkeypatch.setattr(build, "CPU_FLAGS", [*build.CPU_FLAGS, "-DDIST_CAUTIOUS_TEST_FLAG=1"])
    assert build.cache_state("cpu").status == "build"


def test_report_under_reference_mode_does_not_inspect_the_cache(tiny_kernels, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DIST_CAUTIOUS_KERNELS", "reference")
    monkeypatch.setattr(build, "cache_state", lambda kind: pytest.fail("reference mode must not look at the JIT cache"))
    assert cli.main(["report"]) == 0
    assert "torch reference (forced by DIST_CAUTIOUS_KERNELS=reference)" in capsys.readouterr().out

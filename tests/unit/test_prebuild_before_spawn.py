"""Both local launchers build the native kernels in the parent before any rank starts, so ranks
never race torch's build lock (one compiling, the others waiting against their timeouts)."""

from __future__ import annotations

import pytest

import dist_cautious.kernels as kernels
from dist_cautious import local_ranks
from dist_cautious.train import backend


class _Spawned(Exception):
    """Raised by the stand-in for torch's process start: nothing is really spawned."""


@pytest.mark.parametrize("launch", ["run_ranks", "spawn_local"])
def test_kernels_are_built_before_ranks_start(monkeypatch: pytest.MonkeyPatch, launch: str) -> None:
    events: list[str] = []
    monkeypatch.setattr(kernels, "ops_for", lambda device: events.append(f"ops_for {device.type}"))

    def start_processes(*args, **kwargs):
        events.append("spawn")
        raise _Spawned

    monkeypatch.setattr("torch.multiprocessing.start_processes", start_processes)
    monkeypatch.setattr(local_ranks.mp, "start_processes", start_processes)
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # spawn_local sets them: restore after the test
        monkeypatch.setenv(name, "unset")
    with pytest.raises(_Spawned):
        if launch == "run_ranks":
            local_ranks.run_ranks(print, 2)
        else:
            backend.spawn_local(print, 2)
    assert events == ["ops_for cpu", "spawn"]

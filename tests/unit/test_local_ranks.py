"""``run_ranks`` forks its ranks from a fork server that outlives each launch: the ranks must
still see the caller's environment as it is at the launch, not as it was when the server began."""

from __future__ import annotations

import os

import pytest

from dist_cautious.local_ranks import run_ranks

MARKER = "DIST_CAUTIOUS_TEST_LAUNCH_MARKER"


def _environment_seen(rank: int, world_size: int, names: list[str]) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in [*names, "RANK", "WORLD_SIZE"]}


def test_ranks_see_the_environment_of_each_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MARKER, "first")
    first = run_ranks(_environment_seen, 2, [MARKER, "HOME"])  # the fork server runs from here on
    assert [seen[MARKER] for seen in first] == ["first", "first"]
    assert [seen["HOME"] for seen in first] == [os.environ.get("HOME")] * 2

    monkeypatch.setenv(MARKER, "second")
    monkeypatch.delenv("HOME", raising=False)  # set when the server started: must not come back
    second = run_ranks(_environment_seen, 2, [MARKER, "HOME"])
    assert second == [
        {MARKER: "second", "HOME": None, "RANK": str(rank), "WORLD_SIZE": "2"} for rank in range(2)
    ]

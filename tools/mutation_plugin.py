"""A pytest plugin for tools/mutation_check.py: run a chosen subset of the launched test cases.

The sharded-invariance tests launch one process group per world size and run every case of
that size in it (tests/dist/test_fsdp.py ``cases_for``, tests/dist/test_deepspeed.py ``plan``).
A mutation run needs only the cases that can see its fault, so this plugin narrows those two
functions before collection, from environment variables, leaving the tests themselves as they
are (same workers, same references, same tolerances):

- ``MUTATION_FSDP_MESH``: keep only the FSDP2 cases on this mesh (``fsdp``, ``hsdp``, ``ddp``);
- ``MUTATION_DS_CASES``: ``"3:id,id;2:id"``, the DeepSpeed case ids to keep per world size
  (other world sizes are dropped).

Each wanted id must exist, else the run stops with a usage error: a misspelt id must not turn
into a run of nothing that then "passes".
"""

from __future__ import annotations

import os
from typing import Any

import pytest


def _wanted_ds_cases(spec: str) -> dict[int, list[str]]:
    wanted: dict[int, list[str]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        size, _, ids = part.partition(":")
        wanted[int(size)] = [i.strip() for i in ids.split(",") if i.strip()]
    return wanted


def _narrow_deepspeed_plan(spec: str) -> None:
    from tests.dist import test_deepspeed

    full_plan = test_deepspeed.plan
    wanted = _wanted_ds_cases(spec)

    def plan(tmp: Any) -> dict[int, list[dict[str, Any]]]:
        cases = full_plan(tmp)
        narrowed = {}
        for size, ids in wanted.items():
            by_id = {case["id"]: case for case in cases.get(size, [])}
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise pytest.UsageError(f"mutation_plugin: no DeepSpeed case {missing} at world size {size}")
            narrowed[size] = [by_id[i] for i in ids]
        return narrowed

    test_deepspeed.plan = plan


def _narrow_fsdp_cases(mesh: str) -> None:
    from tests.dist import test_fsdp

    full_cases = test_fsdp.cases_for

    def cases_for(world_size: int) -> list[dict[str, Any]]:
        kept = [case for case in full_cases(world_size) if case.get("mesh", "fsdp") == mesh and not case.get("model") and not case.get("mixed_precision") and not case.get("offload")]
        if not kept:
            raise pytest.UsageError(f"mutation_plugin: no FSDP2 case on mesh {mesh!r} at world size {world_size}")
        return kept

    test_fsdp.cases_for = cases_for


def pytest_configure(config: pytest.Config) -> None:
    spec = os.environ.get("MUTATION_DS_CASES")
    if spec:
        _narrow_deepspeed_plan(spec)
    mesh = os.environ.get("MUTATION_FSDP_MESH")
    if mesh:
        _narrow_fsdp_cases(mesh)

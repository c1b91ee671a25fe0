"""FSDP2: torch.distributed.checkpoint round trips across world sizes, and refused placements.

Save at 4 ranks after 4 steps; resume at 2 and at 3 ranks for 4 more; the weights must equal an
uninterrupted 8-step single-process run (rtol 1e-4, atol 1e-6, as in test_fsdp). CAME's factored
row/column state is replicated on every rank, so it is saved once and loaded whole by every rank.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


from tests.dist.fsdp_worker import refused_placements, run_cases
from tests.dist.launcher import run_ranks
from tests.dist.optimizer_cases import CASES
from tests.dist.test_fsdp import assert_same_weights, single_process


def test_save_at_4_resume_at_2_and_3() -> None:
    with tempfile.TemporaryDirectory() as root:
        directory = {case: str(Path(root) / f"{case[0]}_{case[1]}") for case in CASES}
        saves = [dict(optimizer=name, cautious=cautious, steps=4, save_to=directory[(name, cautious)]) for name, cautious in CASES]
        run_ranks(run_cases, 4, saves)
        resumes = [dict(optimizer=name, cautious=cautious, steps=4, first_step=4, load_from=directory[(name, cautious)]) for name, cautious in CASES]
        for world_size in (2, 3):
            results = run_ranks(run_cases, world_size, resumes)[0]
            for (name, cautious), result in zip(CASES, results):
                assert_same_weights(result["weights"], single_process(name, cautious, steps=8), f"resume at {world_size}: {name} cautious={cautious}")


def test_unsupported_placements_are_refused_by_name() -> None:
    errors = run_ranks(refused_placements, 2)[0]
    assert "Shard(dim=1)" in errors[0] and "params[0] of shape (4, 6)" in errors[0]
    assert "several mesh dims" in errors[1]

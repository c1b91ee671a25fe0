"""Under FSDP2 too, the ops one step dispatches do not grow with the number of tensors (issue 12):
after the first step, a step over 10 DTensors dispatches as many ops as one over 100 (the
single-process form is tests/unit/test_dispatch_count.py). 2 CPU ranks over gloo."""

from __future__ import annotations

import pytest
import torch

from dist_cautious.kernels import ops_for
from tests.dist.fsdp_worker import dispatch_counts
from tests.dist.launcher import run_ranks


def test_fsdp2_step_dispatches_the_same_ops_for_10_and_100_tensors() -> None:
    if not hasattr(ops_for(torch.device("cpu")), "trusted"):
        pytest.skip("native CPU kernels unavailable: the torch reference path issues ops per tensor by design")
    per_rank = run_ranks(dispatch_counts, 2, [5, 50])
    for rank, counts in enumerate(per_rank):
        assert len(counts) == 4
        for name, (few, many) in counts.items():
            assert few == many, f"rank {rank} {name}: {few} ops for 10 tensors, {many} for 100"
            assert few > 0

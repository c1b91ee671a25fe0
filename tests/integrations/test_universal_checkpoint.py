"""DeepSpeed's universal checkpoint changes the world size for CAME and CautiousLion too.

Saved at 4 ranks after 4 of 8 steps (``engine.save_checkpoint``), converted by DeepSpeed's own
``python -m deepspeed.checkpoint.ds_to_universal`` (as a user runs it), resumed with
``"checkpoint": {"load_universal": true}`` at 3 and at 2 ranks: the last 4 steps end at the
weights of the uninterrupted single-process 8-step run (``tests/dist/deepspeed_harness.py``).
CAME at ZeRO-2 (tensors cut mid-row: the factored rows / columns must come back whole, on every
rank holding a piece) and CautiousLion (no ``exp_avg_sq``, which the converter requires) at
ZeRO-3; the restore goes through the same piece mapping at every stage (CAME's full-state
resume at ZeRO-3 is in ``tests/dist/test_deepspeed.py``). CautiousAdamW: ``tests/dist``.

Control: the same resume with the per-tensor state left out (CAME's factors restart from zero)
misses the reference by far more than the tolerance, so the comparison sees that state.

Tolerance: rtol 1e-4, atol 1e-6 as in ``tests/dist/test_deepspeed.py`` (ALGORITHMS.md): a
sharded run adds gradients and partial sums in another order; over 8 steps that stays orders of
magnitude below it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.dist import deepspeed_harness as harness  # noqa: E402

TOLERANCE = dict(rtol=1e-4, atol=1e-6)
SAVED = [("CAME", 2), ("CautiousLion", 3)]


def _case(kind: str, optimizer: str, stage: int, tmp: Path, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "optimizer": optimizer, "cautious": True, "stage": stage, "dir": str(tmp / f"{optimizer}-zero{stage}"),
            "id": f"{kind}-{optimizer}-zero{stage}", **extra}


def run_without_per_tensor_state(case: dict[str, Any], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """The universal resume with the per-tensor restore replaced by a no-op (control)."""
    from dist_cautious.integrations import deepspeed_universal

    deepspeed_universal.restore_per_tensor_state = lambda engine, folder: deepspeed_universal.drop_placeholders(engine.basic_optimizer)
    return harness.run_load_universal_case(case, rank, world_size)


def run_cases(rank: int, world_size: int, cases: list[dict[str, Any]]) -> list[Any]:
    """``harness.run_cases`` with the control's worker added."""
    harness.WORKERS["load_universal_without_per_tensor_state"] = run_without_per_tensor_state
    return harness.run_cases(rank, world_size, cases)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], Any]:
    tmp = tmp_path_factory.mktemp("universal")
    plan = {
        4: [_case("save_universal", o, s, tmp) for o, s in SAVED],
        3: [_case("load_universal", o, s, tmp) for o, s in SAVED],
        2: [*(_case("load_universal", o, s, tmp) for o, s in SAVED),
            # last: it replaces the restore for the rest of this rank's process
            _case("load_universal_without_per_tensor_state", "CAME", 2, tmp)],
    }
    out: dict[tuple[int, str], Any] = {}
    for world_size, cases in plan.items():
        per_rank = harness.run_ranks(run_cases, world_size, cases, timeout=240)
        for index, case in enumerate(cases):
            out[(world_size, case["id"])] = (case, [rank_results[index] for rank_results in per_rank])
    return out


def _outcome(results: dict, key: tuple[int, str]) -> tuple[dict[str, Any], list[Any]]:
    case, per_rank = results[key]
    for outcome in per_rank:
        assert not (isinstance(outcome, dict) and "error" in outcome), outcome.get("error")
    return case, per_rank


@pytest.mark.parametrize("world_size", [3, 2])
@pytest.mark.parametrize("saved", SAVED, ids=lambda s: f"{s[0]}-zero{s[1]}")
def test_universal_checkpoint_resumes_at_another_world_size(results: dict, saved: tuple[str, int], world_size: int) -> None:
    optimizer, stage = saved
    _, converted = _outcome(results, (4, f"save_universal-{optimizer}-zero{stage}"))
    assert converted[0]["returncode"] == 0, converted[0]["output"]
    case, per_rank = _outcome(results, (world_size, f"load_universal-{optimizer}-zero{stage}"))
    expected = harness.reference_weights(case)
    for rank, weights in enumerate(per_rank):
        assert weights.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(weights[name], value, **TOLERANCE, msg=lambda m: f"rank {rank} {name}: {m}")


def test_the_comparison_sees_the_per_tensor_state(results: dict) -> None:
    case, per_rank = _outcome(results, (2, "load_universal_without_per_tensor_state-CAME-zero2"))
    expected = harness.reference_weights(case)
    worst = max(((per_rank[0][n] - v).abs() / (TOLERANCE["atol"] + TOLERANCE["rtol"] * v.abs())).max().item() for n, v in expected.items())
    assert worst > 100, worst


def test_the_converter_got_every_state_file(results: dict) -> None:
    """The universal folder holds fp32, exp_avg and exp_avg_sq per param (the converter's
    contract) and the per-tensor state in zero/optimizer_state.pt, for every saved case."""
    from dist_cautious.integrations.deepspeed_universal import PER_TENSOR_KEY

    for optimizer, stage in SAVED:
        case, _ = _outcome(results, (4, f"save_universal-{optimizer}-zero{stage}"))
        zero = Path(case["dir"]) / "half_universal" / "zero"
        per_tensor = torch.load(zero / "optimizer_state.pt", weights_only=False)[PER_TENSOR_KEY]
        trainable = {name for name, p in harness.make_model(0).named_parameters() if p.requires_grad}
        assert set(per_tensor) == trainable
        for name in trainable:
            assert {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"} <= set(os.listdir(zero / name)), name
        if optimizer == "CAME":
            factored = [name for name, state in per_tensor.items() if "exp_avg_sq_row" in state]
            assert factored and all(per_tensor[name]["step"].item() == harness.STEPS // 2 for name in per_tensor)

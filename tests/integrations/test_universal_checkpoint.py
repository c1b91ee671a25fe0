"""DeepSpeed's universal checkpoint changes the world size for CAME and CautiousLion too.

Saved at 4 ranks after 4 of 8 steps (``engine.save_checkpoint``), converted by DeepSpeed's own
``python -m deepspeed.checkpoint.ds_to_universal`` (as a user runs it), resumed with
``"checkpoint": {"load_universal": true}`` at 3 and at 2 ranks: the last 4 steps end at the
weights of the uninterrupted single-process 8-step run (``tests/dist/deepspeed_harness.py``).
CAME at ZeRO-2 (tensors cut mid-row: the factored rows / columns must come back whole, on every
rank holding a piece) and CautiousLion (no ``exp_avg_sq``, which the converter requires) at
ZeRO-3, and CautiousAdamW with ``amsgrad`` (its ``max_exp_avg_sq`` is kept per tensor) at ZeRO-2; the restore goes through the same piece mapping at every stage (CAME's full-state
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
#: (optimizer, ZeRO stage, amsgrad): amsgrad's max_exp_avg_sq is per element but kept per tensor
#: under ZeRO, so the converter does not carry it either
SAVED = [("CAME", 2, False), ("CautiousLion", 3, False), ("CautiousAdamW", 2, True)]


def _case(kind: str, optimizer: str, stage: int, amsgrad: bool, tmp: Path) -> dict[str, Any]:
    name = f"{optimizer}{'-amsgrad' if amsgrad else ''}-zero{stage}"
    case = {"kind": kind, "optimizer": optimizer, "cautious": True, "stage": stage, "dir": str(tmp / name), "id": f"{kind}-{name}"}
    if amsgrad:  # the config's optimizer section and the reference's params, both with amsgrad
        params = {**harness.PARAMS[optimizer], "amsgrad": True}
        case["params"] = params
        case["extra"] = {"optimizer": {"type": optimizer, "params": {**params, "cautious": True}}}
    return case


def run_without_per_tensor_state(case: dict[str, Any], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """The universal resume with the per-tensor restore replaced by a no-op (control)."""
    from dist_cautious.integrations import deepspeed_universal

    deepspeed_universal.restore_per_tensor_state = lambda engine, folder: deepspeed_universal.drop_placeholders(engine.basic_optimizer)
    return harness.run_load_universal_case(case, rank, world_size)


def run_restored_state(case: dict[str, Any], rank: int, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """The full optimizer state right after the universal load (before any step), every key
    of every param, gathered through the integration (``gather_full_state``)."""
    from dist_cautious.integrations.deepspeed import gather_full_state

    case = {**case, "extra": {**case.get("extra", {}), "checkpoint": {"load_universal": True}}}
    engine = harness.make_engine(case, world_size)
    engine.load_checkpoint(case["dir"], tag="half_universal")
    return gather_full_state(engine)


def run_cases(rank: int, world_size: int, cases: list[dict[str, Any]]) -> list[Any]:
    """``harness.run_cases`` with this module's workers added."""
    harness.WORKERS["load_universal_without_per_tensor_state"] = run_without_per_tensor_state
    harness.WORKERS["restored_state"] = run_restored_state
    return harness.run_cases(rank, world_size, cases)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], Any]:
    tmp = tmp_path_factory.mktemp("universal")
    plan = {
        4: [_case("save_universal", o, s, a, tmp) for o, s, a in SAVED],
        3: [*(_case("load_universal", o, s, a, tmp) for o, s, a in SAVED),
            *(_case("restored_state", o, s, a, tmp) for o, s, a in SAVED)],
        2: [*(_case("load_universal", o, s, a, tmp) for o, s, a in SAVED),
            # last: it replaces the restore for the rest of this rank's process
            _case("load_universal_without_per_tensor_state", "CAME", 2, False, tmp)],
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
@pytest.mark.parametrize("saved", SAVED, ids=lambda s: f"{s[0]}{'-amsgrad' if s[2] else ''}-zero{s[1]}")
def test_universal_checkpoint_resumes_at_another_world_size(results: dict, saved: tuple[str, int, bool], world_size: int) -> None:
    name = f"{saved[0]}{'-amsgrad' if saved[2] else ''}-zero{saved[1]}"
    _, converted = _outcome(results, (4, f"save_universal-{name}"))
    assert converted[0]["returncode"] == 0, converted[0]["output"]
    case, per_rank = _outcome(results, (world_size, f"load_universal-{name}"))
    expected = harness.reference_weights(case)
    for rank, weights in enumerate(per_rank):
        assert weights.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(weights[name], value, **TOLERANCE, msg=lambda m: f"rank {rank} {name}: {m}")


@pytest.mark.parametrize("saved", SAVED, ids=lambda s: f"{s[0]}{'-amsgrad' if s[2] else ''}-zero{s[1]}")
def test_the_restored_state_is_the_single_process_state(results: dict, saved: tuple[str, int, bool]) -> None:
    """Right after the universal load at 3 ranks, every state key of every param (CAME's
    factors, amsgrad's maximum, the steps) equals the single-process optimizer's after 4 steps.
    Near-zero entries of an EMA carry the rounding of larger terms that cancelled, so atol is
    rtol of the tensor's largest entry, as in tests/dist/test_deepspeed.py."""
    name = f"{saved[0]}{'-amsgrad' if saved[2] else ''}-zero{saved[1]}"
    case, per_rank = _outcome(results, (3, f"restored_state-{name}"))
    model, optimizer = harness.reference_run(case, harness.STEPS // 2)
    params = dict(model.named_parameters())
    for state in per_rank:
        assert set(state) == {n for n, p in params.items() if p.requires_grad}
        for param_name, entry in state.items():
            expected = optimizer.state[params[param_name]]
            assert set(entry) - {"fp32"} == set(expected), param_name
            torch.testing.assert_close(entry["fp32"], params[param_name].detach(), **TOLERANCE)
            for key, value in expected.items():
                reference = value.float()
                atol = max(TOLERANCE["atol"], 1e-4 * reference.abs().max().item())
                torch.testing.assert_close(entry[key], reference, rtol=TOLERANCE["rtol"], atol=atol, msg=lambda m: f"{param_name}.{key}: {m}")


def test_the_comparison_sees_the_per_tensor_state(results: dict) -> None:
    case, per_rank = _outcome(results, (2, "load_universal_without_per_tensor_state-CAME-zero2"))
    expected = harness.reference_weights(case)
    worst = max(((per_rank[0][n] - v).abs() / (TOLERANCE["atol"] + TOLERANCE["rtol"] * v.abs())).max().item() for n, v in expected.items())
    assert worst > 100, worst


def test_the_converter_got_every_state_file(results: dict) -> None:
    """The universal folder holds fp32, exp_avg and exp_avg_sq per param (the converter's
    contract) and the per-tensor state in zero/optimizer_state.pt, for every saved case."""
    from dist_cautious.integrations.deepspeed_universal import PER_TENSOR_KEY

    for optimizer, stage, amsgrad in SAVED:
        case, _ = _outcome(results, (4, f"save_universal-{optimizer}{'-amsgrad' if amsgrad else ''}-zero{stage}"))
        zero = Path(case["dir"]) / "half_universal" / "zero"
        per_tensor = torch.load(zero / "optimizer_state.pt", weights_only=False)[PER_TENSOR_KEY]
        trainable = {name for name, p in harness.make_model(0).named_parameters() if p.requires_grad}
        assert set(per_tensor) == trainable
        for name in trainable:
            assert {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"} <= set(os.listdir(zero / name)), name
        assert all(per_tensor[name]["step"].item() == harness.STEPS // 2 for name in per_tensor)
        if optimizer == "CAME":
            assert [name for name, state in per_tensor.items() if "exp_avg_sq_row" in state]
        if amsgrad:
            assert all("max_exp_avg_sq" in state for state in per_tensor.values())
            assert any(state["max_exp_avg_sq"].abs().sum() > 0 for state in per_tensor.values())

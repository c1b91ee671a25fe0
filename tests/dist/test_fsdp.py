"""FSDP2 / HSDP: sharded runs give the single-process weights, with a constant collective count.

Each world size is launched once (spawned CPU ranks, gloo) and runs every case; the tests below
read those results. The single-process reference trains plain tensors on the global batch in
the test process. Tolerance: rtol 1e-4, atol 1e-6 (ALGORITHMS.md): sharded gradients are
averaged in a different order (a few fp32 ulps), which the optimizers carry for 8 steps.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from tests.dist.fsdp_worker import run_cases, train
from tests.dist.launcher import run_ranks
from tests.dist.optimizer_cases import CASES

STEPS = 8
RTOL, ATOL = 1e-4, 1e-6
WORLD_SIZES = (1, 2, 3, 4)
#: float64 runs: long enough for rounding to compound (50 steps), compared at rtol 1e-10: the
#: sharded gradient's different averaging order costs a few float64 ulps (~1e-16 relative),
#: which the fp32 runs show the optimizers amplify by at most ~1e3 over their steps; a
#: statistic taken over a shard instead of the whole tensor is wrong by far more (>1e-3)
FLOAT64_STEPS = 50
FLOAT64_RTOL, FLOAT64_ATOL = 1e-10, 1e-12


def plain_cases(**extra: Any) -> list[dict[str, Any]]:
    return [dict(optimizer=name, cautious=cautious, steps=STEPS, **extra) for name, cautious in CASES]


def float64_cases(**extra: Any) -> list[dict[str, Any]]:
    return [dict(optimizer=name, cautious=cautious, steps=FLOAT64_STEPS, dtype="float64", **extra) for name, cautious in CASES]


def option_cases() -> list[dict[str, Any]]:
    """The elementwise options, each exact under sharding without communication of its own."""
    cwd, maximize, amsgrad = ("cautious_weight_decay", True), ("maximize", True), ("amsgrad", True)
    return [
        dict(optimizer="adamw", cautious=True, steps=STEPS, options=(cwd, amsgrad)),
        dict(optimizer="came", cautious=True, steps=STEPS, options=(cwd, maximize)),
        dict(optimizer="lion", cautious=False, steps=STEPS, options=(cwd,)),
    ]


def cases_for(world_size: int) -> list[dict[str, Any]]:
    cases = plain_cases()
    if world_size in (2, 4):
        cases += plain_cases(mesh="hsdp")
    if world_size == 3:
        cases += float64_cases()
    if world_size == 4:
        cases += float64_cases(mesh="hsdp")
    if world_size == 2:
        cases += plain_cases(model="deep") + plain_cases(mesh="ddp")
        cases += [dict(optimizer="adamw", cautious=True, steps=STEPS, offload=True), dict(optimizer="came", cautious=True, steps=STEPS, offload=True)]
        cases += [dict(optimizer=name, cautious=True, steps=STEPS, mixed_precision=True) for name in ("adamw", "came", "lion")]
        cases += option_cases()
    return cases


@functools.lru_cache(maxsize=None)
def launched(world_size: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(case, rank-0 result) for every case of one launch at ``world_size``."""
    cases = cases_for(world_size)
    return list(zip(cases, run_ranks(run_cases, world_size, cases)[0]))


@functools.lru_cache(maxsize=None)
def single_process(
    optimizer: str, cautious: bool, model: str = "awkward", steps: int = STEPS, dtype: str = "float32", options: tuple = ()
) -> dict[str, torch.Tensor]:
    case = dict(optimizer=optimizer, cautious=cautious, steps=steps, model=model, dtype=dtype, options=options)
    return train(case, rank=0, world_size=0)["weights"]


def reference_for(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    return single_process(
        case["optimizer"], case["cautious"], case.get("model", "awkward"), case["steps"], case.get("dtype", "float32"), case.get("options", ())
    )


def assert_same_weights(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], label: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert ours.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=rtol, atol=atol, msg=lambda m: f"{label} {name}: {m}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fsdp_and_hsdp_match_single_process(world_size: int) -> None:
    initial = train(dict(optimizer="adamw", cautious=True, steps=0), rank=0, world_size=0)["weights"]
    checked = 0
    for case, result in launched(world_size):
        if case.get("mixed_precision") or case.get("dtype") == "float64":
            continue
        reference = reference_for(case)
        assert_same_weights(result["weights"], reference, f"world {world_size} {case}")
        if case.get("model", "awkward") == "awkward":
            assert not torch.equal(reference["wide.weight"], initial["wide.weight"]), "the reference did not train"
            assert torch.equal(result["weights"]["frozen"], initial["frozen"])
            assert torch.equal(result["weights"]["unused"], initial["unused"]), "a param without grad was stepped"
        checked += 1
    assert checked >= len(CASES)


def test_all_reduces_per_step_do_not_grow_with_the_number_of_tensors() -> None:
    """One all-reduce per step for cautious AdamW / Lion, none without the mask, three for CAME,
    whether the model has 10 tensors or 16."""
    expected = {("adamw", True): 1, ("adamw", False): 0, ("lion", True): 1, ("lion", False): 0, ("came", True): 3, ("came", False): 3}
    seen = {}
    for case, result in launched(2):
        if case.get("mesh", "fsdp") == "fsdp" and not case.get("mixed_precision") and not case.get("offload"):
            key = (case["optimizer"], case["cautious"])
            assert result["all_reduces"] == [expected[key]] * STEPS, (case, result["all_reduces"])
            seen.setdefault(key, set()).add(case.get("model", "awkward"))
    assert all(models == {"awkward", "deep"} for models in seen.values()) and len(seen) == len(expected)


def test_ddp_plain_tensors_communicate_nothing_in_step() -> None:
    ddp = [(case, result) for case, result in launched(2) if case.get("mesh") == "ddp"]
    assert len(ddp) == len(CASES)
    for case, result in ddp:
        assert result["all_reduces"] == [0] * STEPS, case


#: how far (L2, per tensor) a bf16-compute run may end from the fp32 run, as a fraction of how
#: far the fp32 run moved that tensor. bf16 compute perturbs gradients by ~2^-8 relative: measured
#: at most 2.3% for AdamW / CAME, 7.3% for Lion (whose sign flips where |m| is tiny). A step that
#: did nothing scores 100%, half a step 50%: a fixed atol of 2e-2 could not see a Lion run at all
#: (8 steps of lr 1e-3 move a weight by at most 0.008).
MIXED_PRECISION_DEVIATION = 0.25


def test_mixed_precision_keeps_fp32_state_and_tracks_the_fp32_run() -> None:
    """bf16 compute, fp32 sharded params and reduction: state stays fp32, and each weight ends
    much closer to the fp32 single-process run than to where it started."""
    mixed = [(case, result) for case, result in launched(2) if case.get("mixed_precision")]
    assert len(mixed) == 3
    initial = train(dict(optimizer="adamw", cautious=True, steps=0), rank=0, world_size=0)["weights"]
    for case, result in mixed:
        assert result["state_dtypes"] == {torch.float32}
        reference = reference_for(case)
        assert result["weights"].keys() == reference.keys()
        for name, expected in reference.items():
            moved = (expected - initial[name]).norm().item()
            deviation = (result["weights"][name] - expected).norm().item()
            assert deviation <= MIXED_PRECISION_DEVIATION * moved, (case, name, deviation, moved)


def test_cpu_offload_policy_is_exact() -> None:
    offloaded = [(case, result) for case, result in launched(2) if case.get("offload")]
    assert len(offloaded) == 2
    for case, result in offloaded:
        assert_same_weights(result["weights"], reference_for(case), f"offload {case}")


def worst_relative_difference(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """max |ours - reference| / max(|reference|, FLOAT64_ATOL / FLOAT64_RTOL) over every weight."""
    floor = FLOAT64_ATOL / FLOAT64_RTOL
    return max(((ours[n] - reference[n]).abs() / reference[n].abs().clamp(min=floor)).max().item() for n in reference)


@pytest.mark.parametrize("world_size,mesh", [(3, "fsdp"), (4, "hsdp")])
def test_float64_keeps_float64_state_and_matches_single_process_to_float64_rounding(world_size: int, mesh: str) -> None:
    """float64 params get float64 state and math (as torch.optim), so the sharded run equals the
    single-process run to float64 rounding over 50 steps, CAME's factored statistics included."""
    runs = [(case, result) for case, result in launched(world_size) if case.get("dtype") == "float64"]
    assert len(runs) == len(CASES) and all(case.get("mesh", "fsdp") == mesh for case, _ in runs)
    initial = train(dict(optimizer="adamw", cautious=True, steps=0, dtype="float64"), rank=0, world_size=0)["weights"]
    for case, result in runs:
        assert result["state_dtypes"] == {torch.float64}, case
        reference = reference_for(case)
        assert reference["wide.weight"].dtype == torch.float64
        assert not torch.equal(reference["wide.weight"], initial["wide.weight"]), "the reference did not train"
        assert_same_weights(result["weights"], reference, f"float64 world {world_size} {case}", rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


def test_capturable_steps_give_the_host_scalar_steps_bits_under_fsdp2_and_hsdp() -> None:
    """``capturable=True`` (step counts and lr on the device, the kernels' scalars from a device
    table) on sharded DTensors, through the CUDA kernels' sources built for CPU threads: every
    optimizer lands on the bits of the same run with host scalars, with the same all-reduces,
    and on the single-process weights to the tolerance above."""
    pairs = [(name, cautious, "fsdp") for name, cautious in CASES] + [("adamw", True, "hsdp"), ("came", True, "hsdp")]
    cases = [
        dict(optimizer=name, cautious=cautious, steps=STEPS, mesh=mesh, cuda_emulated=True, options=(("capturable", capturable),))
        for name, cautious, mesh in pairs
        for capturable in (False, True)
    ]
    results = run_ranks(run_cases, 2, cases)[0]
    for index, (name, cautious, mesh) in enumerate(pairs):
        host, device = results[2 * index], results[2 * index + 1]
        label = f"{name} cautious={cautious} {mesh}"
        assert device["all_reduces"] == host["all_reduces"], label
        for key, expected in host["weights"].items():
            assert torch.equal(device["weights"][key], expected), f"{label}: {key} capturable vs host scalars"
        assert_same_weights(device["weights"], single_process(name, cautious), f"{label} capturable vs single process")

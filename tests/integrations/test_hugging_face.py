"""Hugging Face ``Trainer`` and ``accelerate`` (FSDP2, with and without ``torch.compile``) run
our optimizers, launched as a user launches them, and end at the single-process weights.

Three launches (``tests/integrations/hf_worker.py`` has the runs):
- ``python hf_worker.py local``: the single-process reference loops, then
  ``Trainer(optimizer_cls_and_kwargs=(CAME, {...}))`` and the other two optimizers;
- ``torchrun --nproc_per_node 2 hf_worker.py trainer``: ``TrainingArguments(deepspeed=config)``
  with the optimizer named in the config (class names and aliases: ``c-came``, ``cadamw``),
  ZeRO-2 and ZeRO-3;
- ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 hf_worker.py
  accelerate_fsdp2``: an accelerate script, FSDP2 plugin, one case with the model compiled.

What each test rules out: a trainer that quietly steps its own optimizer (class checked); a
sharded run that steps each rank's shard as a whole tensor (weights compared with the single
process, which such a run misses by far more than the tolerance: see the cautious-flip control);
optimizer state held whole on every rank (per-rank state sizes checked); a run that never
moved the weights (distance from the initial weights checked).

Tolerance: rtol 1e-4, atol 1e-6 (ALGORITHMS.md), 4 steps. The reference builds each step's
gradient as two data-parallel ranks do (each half-batch's mean loss halved, accumulated in rank
order: halving is exact and a two-term sum is order-free), so the gradient matches the sharded
run's to the bit and what differs is the optimizer's sharded arithmetic (partial row, column and
square sums added in another order, each a few fp32 ulps) and, under DeepSpeed, its gradient
reduction. Measured (largest |difference|; worst |difference| / (atol + rtol |w|)): Trainer in
one process, FSDP2 CautiousAdamW, ZeRO-2 CautiousLion and the compiled FSDP2 CautiousLion 0 (equal
to the bit); FSDP2 CAME 6.9e-8 (0.033); ZeRO-2 C-CAME 1.2e-7 (0.033); ZeRO-3 CautiousAdamW 1.2e-7
(0.034); ZeRO-3 C-CAME 1.2e-7 (0.066). The control (C-CAME against unmasked CAME) is 4e4 times the
tolerance away.

The launched runs use the torch reference kernels (DIST_CAUTIOUS_KERNELS=reference): these tests
check the wiring into Trainer / DeepSpeed / accelerate; the native kernels are checked against
the reference elsewhere, and no rank then waits for a JIT build.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.sessions import run_in_session

for _package in ("transformers", "accelerate"):  # requirements-test.txt; under CI (CI=true) a missing one fails
    if os.environ.get("CI") == "true":
        __import__(_package)
    else:
        pytest.importorskip(_package)

from dist_cautious.local_ranks import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("hf_worker.py")
RTOL, ATOL = 1e-4, 1e-6
LAUNCH_TIMEOUT = 300

#: Trainer with optimizer_cls_and_kwargs, one process (Trainer's two weight-decay groups)
SINGLE = [{"id": f"cls-{name}", "optimizer": name, "groups": "hf"} for name in ("CautiousAdamW", "CAME", "CautiousLion")]
#: Trainer + DeepSpeed config, 2 ranks: "type" as written in the config
DEEPSPEED = [
    {"id": "ds-zero2-c-came", "optimizer": "CAME", "type": "c-came", "stage": 2},
    {"id": "ds-zero2-CautiousLion", "optimizer": "CautiousLion", "type": "CautiousLion", "stage": 2},
    {"id": "ds-zero3-cadamw", "optimizer": "CautiousAdamW", "type": "cadamw", "stage": 3},
    {"id": "ds-zero3-CAME", "optimizer": "CAME", "type": "CAME", "stage": 3, "config_cautious": True},
]
#: accelerate + FSDP2 plugin, 2 ranks
FSDP2 = [
    {"id": "fsdp2-CAME", "optimizer": "CAME"},
    {"id": "fsdp2-CautiousAdamW", "optimizer": "CautiousAdamW"},
    # torch.compile on the FSDP2-prepared model; aot_eager: dynamo + AOTAutograd through FSDP2's
    # hooks and DTensors without inductor's C++ build (about 2 minutes more on 2 CPU cores)
    {"id": "fsdp2-compiled-CautiousLion", "optimizer": "CautiousLion", "compile": True, "backend": "aot_eager", "layers": 1},
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", DIST_CAUTIOUS_KERNELS="reference", TOKENIZERS_PARALLELISM="false")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(name, None)
    return env


def launch(command: list[str], what: str) -> None:
    """Run ``command`` in its own session with a deadline; on timeout or exit the whole session
    (launcher and ranks) is killed. Fails the test with the output's tail if it fails."""
    done = run_in_session(command, REPO, _env(), LAUNCH_TIMEOUT, what=what, merge_stderr=True)
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{done.stdout[-6000:]}"


def _load(out: Path, mode: str, ranks: int) -> list[dict[str, Any]]:
    return [torch.load(out / f"{mode}-rank{rank}.pt", weights_only=False) for rank in range(ranks)]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hugging_face")


@pytest.fixture(scope="module")
def local_runs(out: Path) -> dict[str, dict[str, Any]]:
    """One process: the single-process plain-loop runs every launch is compared with (plus a
    control with the cautious mask flipped), then Trainer with ``optimizer_cls_and_kwargs``."""
    references = [{**case, "world": 1} for case in SINGLE]
    references += [{"id": c["id"], "optimizer": c["optimizer"], "world": 2, "layers": c.get("layers", 2)} for c in DEEPSPEED + FSDP2]
    references.append({"id": "control-ds-zero2-c-came-unmasked", "optimizer": "CAME", "world": 2, "cautious": False})
    launch([sys.executable, str(WORKER), "local", str(out), json.dumps({"reference": references, "trainer": SINGLE})], "reference runs, Trainer in one process")
    return {mode: _load(out, mode, 1)[0] for mode in ("reference", "trainer")}


@pytest.fixture(scope="module")
def references(local_runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return local_runs["reference"]


@pytest.fixture(scope="module")
def single(local_runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return local_runs["trainer"]


@pytest.fixture(scope="module")
def deepspeed_runs(out: Path) -> list[dict[str, Any]]:
    pytest.importorskip("deepspeed")
    sub = out / "deepspeed"
    sub.mkdir()
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(WORKER), "trainer", str(sub), json.dumps(DEEPSPEED)], "torchrun Trainer + DeepSpeed")
    return _load(sub, "trainer", 2)


@pytest.fixture(scope="module")
def fsdp2_runs(out: Path) -> list[dict[str, Any]]:
    sub = out / "fsdp2"
    sub.mkdir()
    launch([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(free_port()), "--use_fsdp", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "true",
            "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER), "accelerate_fsdp2", str(sub), json.dumps(FSDP2)],
           "accelerate launch FSDP2")
    return _load(sub, "accelerate_fsdp2", 2)


def assert_same_weights(actual: dict[str, torch.Tensor], reference: dict[str, Any], what: str) -> None:
    expected, initial = reference["weights"], reference["initial"]
    assert actual.keys() == expected.keys(), what
    moved = 0
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {name}: {m}")
        moved += int(((value - initial[name]).abs() > 10 * (ATOL + RTOL * value.abs())).any())
    assert moved == len(expected), f"{what}: only {moved} of {len(expected)} tensors moved well past the tolerance"


@pytest.mark.parametrize("case", SINGLE, ids=lambda c: c["id"])
def test_trainer_with_optimizer_cls_and_kwargs(case: dict[str, Any], single: dict[str, Any], references: dict[str, Any]) -> None:
    """``Trainer(optimizer_cls_and_kwargs=(cls, kwargs))`` steps our optimizer, in Trainer's two
    weight-decay groups, to the weights of the plain loop with the same groups."""
    run = single[case["id"]]
    assert run["optimizer"].endswith("." + case["optimizer"]) and run["optimizer"].startswith("dist_cautious.")
    assert run["cautious"] is True
    assert len(run["groups"]) == 2 and run["groups"][1] == 5  # 5 RMSNorm weights without decay
    assert_same_weights(run["weights"], references[case["id"]], case["id"])


@pytest.mark.parametrize("case", DEEPSPEED, ids=lambda c: c["id"])
def test_trainer_with_a_deepspeed_config_naming_our_optimizer(case: dict[str, Any], deepspeed_runs: list[dict[str, Any]], references: dict[str, Any]) -> None:
    """``TrainingArguments(deepspeed=...)`` with ``"optimizer": {"type": <name>}``: DeepSpeed's
    engine steps our optimizer (the class and the mask the name means) on ZeRO partitions, each
    rank holds half the per-element state, and the weights equal the single process."""
    per_rank = [run[case["id"]] for run in deepspeed_runs]
    wrapper = {2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}[case["stage"]]
    for run in per_rank:
        assert run["optimizer"] == f"dist_cautious.optim.{ {'CAME': 'came', 'CautiousAdamW': 'adamw', 'CautiousLion': 'lion'}[case['optimizer']] }.{case['optimizer']}"
        assert run["cautious"] is True and run["wrapper"] == wrapper and run["fragment_source"] == "ZeroFragmentSource"
        assert 0 < run["exp_avg_numel"] < run["model_numel"]
    total = sum(run["exp_avg_numel"] for run in per_rank)
    numel = per_rank[0]["model_numel"]
    # ZeRO-2: the flat buffer split in two (padding to an even length at most); ZeRO-3: each
    # param split in ceil(numel / 2) slots, so at most one padding element per param and rank
    assert numel <= total <= numel + (2 if case["stage"] == 2 else 2 * 21), (total, numel)
    for rank, run in enumerate(per_rank):
        assert_same_weights(run["weights"], references[case["id"]], f"{case['id']} rank {rank}")


def test_the_comparison_sees_the_mask(deepspeed_runs: list[dict[str, Any]], references: dict[str, Any]) -> None:
    """Control: the ZeRO-2 C-CAME run is far from the unmasked single-process CAME, so the
    weight comparison above would catch a mask computed wrongly (or not at all)."""
    run = deepspeed_runs[0]["ds-zero2-c-came"]["weights"]
    unmasked = references["control-ds-zero2-c-came-unmasked"]["weights"]
    worst = max(((run[n] - unmasked[n]).abs() / (ATOL + RTOL * unmasked[n].abs())).max().item() for n in run)
    assert worst > 100, worst


@pytest.mark.parametrize("case", FSDP2, ids=lambda c: c["id"])
def test_accelerate_fsdp2_plugin(case: dict[str, Any], fsdp2_runs: list[dict[str, Any]], references: dict[str, Any]) -> None:
    """An accelerate script with the FSDP2 plugin (and ``torch.compile`` on the prepared model
    in one case): every param a DTensor shard, our optimizer's state split between the ranks
    with nothing replicated, and the single-process weights."""
    per_rank = [run[case["id"]] for run in fsdp2_runs]
    for run in per_rank:
        assert run["optimizer"].startswith("dist_cautious.optim.") and run["optimizer"].endswith("." + case["optimizer"])
        assert run["fsdp_version"] == 2 and run["dtensor_params"] == run["params"] > 0
        assert 0 < run["exp_avg_numel"] < run["model_numel"]
        assert run["compiled"] == ("OptimizedModule" if case.get("compile") else "FSDPLlamaForCausalLM")
    assert sum(run["exp_avg_numel"] for run in per_rank) == per_rank[0]["model_numel"]
    for rank, run in enumerate(per_rank):
        assert_same_weights(run["weights"], references[case["id"]], f"{case['id']} rank {rank}")

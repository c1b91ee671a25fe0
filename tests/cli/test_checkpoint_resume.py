"""Checkpoints of `dist-cautious train`: a stopped or killed job resumes bit for bit; an
incomplete, truncated or poisoned checkpoint is never loaded; a checkpoint resumes at another
world size (FSDP2 through DCP, DeepSpeed through its universal checkpoint).

Each comparison is with the same job run without a stop, and reads whole checkpoints back: DCP
folders as full tensors (every weight and every optimizer state tensor, CAME's row/column
factors included), DeepSpeed folders file by file (the model states and each rank's fp32
partitions and optimizer state). The loss curve a resumed job reports includes the steps before
its checkpoint (restored from it), so it is compared whole.

Process start-up dominates the cost, so the multi-rank jobs share three spawns (4, 2 and 3
ranks) in a module fixture, and the torchrun test compares with a job of the 2-rank spawn.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoint_jobs import TINY_JOB, deepspeed_weights, differences, init_rank, read_dcp, read_deepspeed_files, run_jobs
from cli_helpers import PYTHON, launch_env, run_cli
from dist_cautious.local_ranks import run_ranks
from dist_cautious.train.checkpoint import MARKER, CheckpointError
from dist_cautious.train.loop import NonFiniteLoss, NonFiniteState, TrainConfig, train

TIMEOUT_S = 400
STEP = "step-{:08d}".format


def _job(directory: Path, **settings: Any) -> dict[str, Any]:
    return {"config": {**TINY_JOB, "checkpoint_dir": str(directory), **settings}}


def _deepspeed_available() -> bool:
    from dist_cautious.train.backend import deepspeed_available

    return deepspeed_available()


# --------------------------------------------------------------------------------- multi-rank runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    """Saved at 4 ranks; at 2 ranks the references and stop/resume pairs, and resumes of the
    4-rank checkpoints; at 3 ranks the same resumes."""
    if not _deepspeed_available():
        pytest.skip("DeepSpeed is not installed")
    root = tmp_path_factory.mktemp("checkpoints")
    fsdp_ws = dict(backend="fsdp2", optimizer="c-came", steps=4)
    zero_ws = dict(backend="deepspeed", zero_stage=2, optimizer="cautious-adamw", steps=4)
    four = run_ranks(run_jobs, 4, [_job(root / "ws4-fsdp2", **fsdp_ws), _job(root / "ws4-zero2", **zero_ws)], timeout=TIMEOUT_S, init=init_rank)
    two_jobs = [_job(root / "fsdp2-ref", backend="fsdp2", optimizer="c-came")]  # the torchrun test's reference
    for stage, optimizer in ((2, "came"), (3, "c-came")):
        settings = dict(backend="deepspeed", zero_stage=stage, optimizer=optimizer, steps=4)
        two_jobs += [_job(root / f"zero{stage}-ref", **settings),
                     {**_job(root / f"zero{stage}-resumed", **settings), "resume_from": str(root / f"zero{stage}-ref" / STEP(2))}]
    resumes = lambda world: [  # noqa: E731
        {**_job(root / f"ws{world}-fsdp2", **fsdp_ws), "resume_from": str(root / "ws4-fsdp2" / STEP(2))},
        {**_job(root / f"ws{world}-zero2", **zero_ws), "resume_from": str(root / "ws4-zero2" / STEP(2))},
    ]
    two = run_ranks(run_jobs, 2, two_jobs + resumes(2), timeout=TIMEOUT_S, init=init_rank)
    three = run_ranks(run_jobs, 3, resumes(3), timeout=TIMEOUT_S, init=init_rank)
    return root, {"four": four[0], "two": two[0], "three": three[0]}


@pytest.mark.parametrize("stage, index", [(2, 1), (3, 3)], ids=["zero2-came", "zero3-c-came"])
def test_deepspeed_resume_is_bit_identical(runs: tuple[Path, dict], stage: int, index: int) -> None:
    """DeepSpeed on 2 ranks, resumed from the step-2 checkpoint of the uninterrupted job: its
    step-4 checkpoint equals the uninterrupted job's in every tensor of every file (each rank's
    fp32 partition, CAME's exp_avg and factored row/column state), and so does the loss curve."""
    root, outcome = runs
    ref, resumed = outcome["two"][index], outcome["two"][index + 1]
    assert ref["resumed_from"] is None and resumed["resumed_from"] == 2
    assert resumed["losses"] == ref["losses"] and len(ref["losses"]) == 4
    straight = read_deepspeed_files(root / f"zero{stage}-ref" / STEP(4))
    again = read_deepspeed_files(root / f"zero{stage}-resumed" / STEP(4))
    assert any("exp_avg_sq_row" in key or "exp_avg_res_col" in key for key in straight), "CAME's factored state is not in the checkpoint"
    assert differences(straight, again) == []
    assert sorted(p.name for p in (root / f"zero{stage}-ref").iterdir()) == [STEP(2), STEP(4)]  # keep 2


def _fraction_off(expected: dict[str, Any], actual: dict[str, Any], prefix: str = "") -> float:
    """The fraction of the float elements under keys starting with ``prefix`` that differ by
    more than fp32 rounding allows (rtol 1e-4, atol 1e-6, the sharding tests' tolerance)."""
    off = total = 0
    for key, want in expected.items():
        if key.startswith(prefix) and torch.is_tensor(want) and want.is_floating_point():
            got = actual[key].double()
            off += int(((got - want.double()).abs() > 1e-6 + 1e-4 * want.double().abs()).sum())
            total += want.numel()
    assert total, f"no tensors under {prefix!r}"
    return off / total


@pytest.mark.parametrize("world", [2, 3])
def test_resume_at_another_world_size(runs: tuple[Path, dict], world: int) -> None:
    """Saved at 4 ranks after 2 steps, resumed at 2 and at 3 for 2 more; compared with the
    4-rank run: FSDP2 (CAME, resharded by DCP) weights and whole optimizer state, DeepSpeed ZeRO-2
    (CautiousAdamW, through DeepSpeed's ds_to_universal) weights.

    Not bit for bit: the ranks split the batch differently, so gradients differ in fp32 summation
    order, and where a gradient is itself rounding noise (the key bias: its true gradient is 0)
    a normalised update turns that noise into a full-size step. So the test bounds the fraction
    of elements beyond fp32 tolerance: measured 0.11-0.37% of weights and 0.30-0.73% of FSDP2's
    optimizer state (mostly qkv.bias); allowed 2%. A resume that lost the optimizer state puts
    78% of the weights beyond it (measured, single process, both optimizers); the weights moved
    between the two checkpoints far beyond it too, so the comparison has something to see."""
    root, outcome = runs
    resumed_runs = outcome["two"][-2:] if world == 2 else outcome["three"]
    assert [r["resumed_from"] for r in resumed_runs] == [2, 2]
    for saved, resumed in zip(outcome["four"], resumed_runs):
        assert resumed["losses"][:2] == saved["losses"][:2]  # restored from the checkpoint
        assert resumed["losses"] == pytest.approx(saved["losses"], rel=1e-5)  # measured <= 1.3e-7
    fsdp_saved, fsdp_resumed = read_dcp(root / "ws4-fsdp2" / STEP(4)), read_dcp(root / f"ws{world}-fsdp2" / STEP(4))
    assert any(key.endswith("exp_avg_res_row") for key in fsdp_saved)  # CAME's factors went through DCP's resharding
    assert _fraction_off(fsdp_saved, fsdp_resumed, "model.") <= 0.02
    assert _fraction_off(fsdp_saved, fsdp_resumed, "optim.state.") <= 0.02
    assert _fraction_off(read_dcp(root / "ws4-fsdp2" / STEP(2)), fsdp_saved, "model.") > 0.5
    zero_saved, zero_resumed = deepspeed_weights(root / "ws4-zero2" / STEP(4)), deepspeed_weights(root / f"ws{world}-zero2" / STEP(4))
    assert _fraction_off(zero_saved, zero_resumed) <= 0.02


def test_fsdp2_survives_killed_ranks_under_torchrun(runs: tuple[Path, dict], tmp_path: Path) -> None:
    """`torchrun --max-restarts 2`, FSDP2 on 2 ranks, CAME, checkpoints every 2 of 6 steps.
    Attempt 0: rank 1 is SIGKILLed after step 3 (between checkpoints). Attempt 1 resumes from
    step 2 and rank 1 is SIGKILLed while checkpoint 4 is being written (its files written, the
    checkpoint not complete). Attempt 2 must resume from step 2 again, never from the half
    written step 4 (which it removes), and finish: loss curve and every weight and optimizer
    state tensor of the final checkpoint identical to the uninterrupted 2-rank job's."""
    from checkpoint_jobs import cli_arguments, run_command

    root, outcome = runs
    settings = {**TINY_JOB, "backend": "fsdp2", "optimizer": "c-came", "checkpoint_dir": tmp_path / "ck", "metrics": tmp_path / "metrics.json"}
    env = {**launch_env(), "DIST_CAUTIOUS_FAULT": "kill:rank=1:step=3,kill:rank=1:step=4:at=save:attempt=1"}
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "2",
               "-m", "dist_cautious.cli", "train", *cli_arguments(settings)]
    done = run_command(command, tmp_path, env, TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(re.findall(r"failed \(exitcode: -9\) local_rank: 1", done.stderr)) == 2, done.stderr[-3000:]  # both kills fired
    assert done.stderr.count("dist_cautious: resumed from step 2 ") == 2
    assert f"removed {tmp_path / 'ck' / '.tmp-step-00000004'}" in done.stderr
    assert "6 steps (resumed from step 2)" in done.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["losses"] == outcome["two"][0]["losses"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [STEP(4), STEP(6)]
    assert differences(read_dcp(root / "fsdp2-ref" / STEP(6)), read_dcp(tmp_path / "ck" / STEP(6))) == []


def test_fsdp2_survives_a_killed_rank_under_the_commands_own_restarts(runs: tuple[Path, dict], tmp_path: Path) -> None:
    """`dist-cautious train --nproc 2 --max-restarts 1` (the command's own spawner), FSDP2, CAME:
    rank 1 SIGKILLed after step 3 on the first attempt; the second attempt resumes from step 2
    and ends with the uninterrupted job's loss curve and final checkpoint, bit for bit."""
    from checkpoint_jobs import cli_arguments, run_command

    root, outcome = runs
    settings = {**TINY_JOB, "backend": "fsdp2", "optimizer": "c-came", "checkpoint_dir": tmp_path / "ck", "metrics": tmp_path / "metrics.json"}
    env = {**launch_env(), "DIST_CAUTIOUS_FAULT": "kill:rank=1:step=3"}
    command = [PYTHON, "-m", "dist_cautious.cli", "train", "--nproc", "2", "--max-restarts", "1", *cli_arguments(settings)]
    done = run_command(command, tmp_path, env, TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "restarting the job (restart 1 of 1)" in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("dist_cautious: resumed from step 2 ") == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["losses"] == outcome["two"][0]["losses"]
    assert differences(read_dcp(root / "fsdp2-ref" / STEP(6)), read_dcp(tmp_path / "ck" / STEP(6))) == []


def test_restarts_are_refused_where_no_ranks_are_spawned(tmp_path: Path) -> None:
    done = run_cli(["train", "--backend", "single", "--max-restarts", "1", "--steps", "1", "--quiet"], tmp_path, 120)
    assert done.returncode != 0 and "--max-restarts restarts spawned ranks" in done.stderr


# ------------------------------------------------------------------------------------ one process
SINGLE = {**TINY_JOB, "backend": "single", "optimizer": "cautious-adamw"}


@pytest.fixture(scope="module")
def single_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], dict[str, Any], Path]:
    """The uninterrupted single-process job: its loss curve, final checkpoint and directory."""
    directory = tmp_path_factory.mktemp("single-reference")
    result = train(TrainConfig(**SINGLE, checkpoint_dir=str(directory)))
    return result.losses, read_dcp(directory / STEP(6)), directory


def test_a_checkpoint_without_its_marker_is_never_loaded(single_reference: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`dist-cautious train` SIGKILLed after checkpoint 4 got its final name but before its
    completion marker: the next start (here in-process) removes it, resumes from step 2 and ends
    identical to the job that never stopped."""
    from checkpoint_jobs import cli_arguments

    config = TrainConfig(**SINGLE, checkpoint_dir=str(tmp_path / "ck"))
    killed = run_cli(["train", *cli_arguments({**SINGLE, "checkpoint_dir": tmp_path / "ck"})], tmp_path, TIMEOUT_S,
                     env={**launch_env(), "DIST_CAUTIOUS_FAULT": "kill:step=4:at=rename"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "ck" / STEP(4)).is_dir() and not (tmp_path / "ck" / STEP(4) / MARKER).exists()
    with caplog.at_level("INFO", logger="dist_cautious"):
        result = train(config)
    assert result.resumed_from == 2
    assert f"removed {tmp_path / 'ck' / STEP(4)}" in caplog.text and "resumed from step 2 " in caplog.text
    losses, final, _ = single_reference
    assert result.losses == losses
    assert differences(final, read_dcp(tmp_path / "ck" / STEP(6))) == []


def test_a_damaged_checkpoint_is_named_and_skipped(single_reference: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A job stopped after step 5 (checkpoints 2 and 4 kept), then step 4's DCP shard truncated:
    the next start warns naming the file, sets step 4 aside, resumes from step 2 and ends
    identical to the uninterrupted job. When no complete checkpoint verifies (one truncated, one
    with a changed byte), it refuses to start, naming both files."""
    from dist_cautious.train.faults import InjectedFault

    config = TrainConfig(**SINGLE, checkpoint_dir=str(tmp_path / "ck"))
    monkeypatch.setenv("DIST_CAUTIOUS_FAULT", "raise:step=5")
    with pytest.raises(InjectedFault):
        train(config)
    monkeypatch.delenv("DIST_CAUTIOUS_FAULT")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [STEP(2), STEP(4)]
    shard = tmp_path / "ck" / STEP(4) / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="dist_cautious"):
        result = train(config)
    assert result.resumed_from == 2
    assert any(str(shard) in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records), caplog.text
    assert len(list((tmp_path / "ck").glob(f".rejected-{STEP(4)}-*"))) == 1
    losses, final, _ = single_reference
    assert result.losses == losses
    assert differences(final, read_dcp(tmp_path / "ck" / STEP(6))) == []

    shard = tmp_path / "ck" / STEP(6) / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1])
    job = tmp_path / "ck" / STEP(4) / "job.json"
    job.write_bytes(job.read_bytes().replace(b'"step": 4', b'"step": 5'))
    with pytest.raises(CheckpointError, match=re.escape(str(shard))) as refused:
        train(config)
    assert str(job) in str(refused.value) and "sha256" in str(refused.value)


def test_a_nonfinite_gradient_writes_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A nan gradient element before step 3: step 3's loss (computed before the update) is
    finite, but its update turns the weight and moments nan. The checkpoint due at step 3 finds
    it, names the tensor, stops the job at step 3, and writes nothing (no step 3, no half-written
    folder)."""
    monkeypatch.setenv("DIST_CAUTIOUS_FAULT", "nan:step=3")
    with pytest.raises(NonFiniteState) as stopped:
        train(TrainConfig(**{**SINGLE, "checkpoint_every": 1}, checkpoint_dir=str(tmp_path / "ck")))
    assert stopped.value.step == 3
    assert re.search(r"step 3: non-finite values in (exp_avg(_sq)? of )?tokens\.weight on rank 0", str(stopped.value)), str(stopped.value)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [STEP(1), STEP(2)]


def test_a_nonfinite_loss_writes_no_checkpoint_of_it(tmp_path: Path) -> None:
    """`--lr 1e9`, a checkpoint every step: the job stops at the step whose loss (or state) is
    not finite; the newest checkpoint is of an earlier step, and every tensor in it is finite."""
    with pytest.raises(NonFiniteLoss) as stopped:
        train(TrainConfig(**{**SINGLE, "checkpoint_every": 1, "lr": 1e9}, checkpoint_dir=str(tmp_path / "ck")))
    written = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert written and all(name.startswith("step-") for name in written)
    newest = int(written[-1].removeprefix("step-"))
    assert newest == stopped.value.step - 1
    contents = read_dcp(tmp_path / "ck" / written[-1])
    assert all(bool(torch.isfinite(v).all()) for v in contents.values() if torch.is_tensor(v) and v.is_floating_point())


def test_only_a_new_hyperparameter_may_be_missing(single_reference: tuple) -> None:
    """Loading DCP: a param-group entry the checkpoint lacks (a hyperparameter added since it was
    written) keeps this job's value and is reported; a missing weight or optimizer-state entry
    refuses the checkpoint, naming the entry."""
    from dist_cautious.train.resume import _missing_hyperparameters

    folder = single_reference[2] / STEP(6) / "dcp"
    groups = [{"lr": 0.1, "params": ["tokens.weight"], "added_since": True}]
    state = {"model": {"tokens.weight": None}, "optim": {"state": {"tokens.weight": {"exp_avg": None}}, "param_groups": groups}}
    assert _missing_hyperparameters(state, folder) == ["optim.param_groups.0.added_since"]
    state["optim"]["state"]["head.weight"] = {"exp_avg": None, "not_saved": None}
    with pytest.raises(CheckpointError, match=r"lacks 1 entries this job needs: optim\.state\.head\.weight\.not_saved$"):
        _missing_hyperparameters(state, folder)

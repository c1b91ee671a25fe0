"""What a user sees from `dist-cautious train` besides the loss: a diverging run stops with one
line naming the step (exit status 1, on one rank or several); DeepSpeed's deprecation warnings
are filtered inside the job and nowhere else."""

from __future__ import annotations

import logging
import re
import subprocess
import warnings

import pytest

from cli_helpers import PYTHON, REPO, TINY_TRAIN, launch_env, run_cli
from dist_cautious import cli

TIMEOUT_S = 240
#: the CLI's line for a diverged run, and the step it names
DIVERGED = re.compile(r"^dist-cautious train: error: step (\d+): loss is (nan|inf|-inf); stopping \(peak learning rate 1e\+09: lower --lr\?\)$")
SINGLE = [arg if arg != "fsdp2" else "single" for arg in TINY_TRAIN] + ["--steps", "30"]


def _only_error_line(stderr: str) -> re.Match:
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, stderr[-3000:]
    match = DIVERGED.match(lines[0])
    assert match, lines[0]
    assert "Traceback" not in stderr and "Terminating process" not in stderr, stderr[-3000:]
    return match


def test_nonfinite_loss_stops_a_single_process_run(capsys: pytest.CaptureFixture[str]) -> None:
    """`--lr 1e9`: exit status 1 and one line naming the first step whose loss is not finite."""
    from dist_cautious.train.loop import NonFiniteLoss, TrainConfig, train

    assert cli.main([*SINGLE, "--lr", "1e9"]) == cli.TRAINING_FAILED
    captured = capsys.readouterr()
    step = int(_only_error_line(captured.err).group(1))
    assert "final train loss" not in captured.out  # no summary of a failed run
    # the named step is the loop's: the same job through the library raises there, and every
    # step before it had a finite loss (the first step's loss, before any update, is finite)
    with pytest.raises(NonFiniteLoss) as raised:
        train(TrainConfig(backend="single", steps=30, global_batch=4, context=16, width=32, layers=1, warmup=20, corpus_bytes=65536, lr=1e9, progress=False))
    assert raised.value.step == step > 1


def test_nonfinite_loss_stops_every_rank(tmp_path) -> None:
    """Two spawned FSDP2 ranks: all stop at the same step and leave the process group; rank 0
    alone reports, the command exits 1 without a traceback or killed ranks."""
    result = run_cli([*TINY_TRAIN, "--steps", "30", "--nproc", "2", "--lr", "1e9"], tmp_path, TIMEOUT_S)
    assert result.returncode == cli.TRAINING_FAILED, result.stderr[-3000:]
    assert int(_only_error_line(result.stderr).group(1)) > 1


def test_a_finite_run_exits_zero_and_leaves_warnings_and_logging_as_they_were(capsys: pytest.CaptureFixture[str]) -> None:
    """`main` filters warnings and adds its log handler for the command only."""
    logger = logging.getLogger("dist_cautious")
    filters, handlers, level = list(warnings.filters), list(logger.handlers), logger.level
    assert cli.main([*SINGLE, "--steps", "3"]) == 0
    assert "single / 1 rank(s): 3 steps" in capsys.readouterr().out
    assert warnings.filters == filters
    assert logger.handlers == handlers and logger.level == level


def test_job_filter_is_narrow() -> None:
    """Inside the job: exactly torch.distributed's deprecation FutureWarnings for the two
    collectives DeepSpeed calls are dropped; the same text from elsewhere, another message or
    another category still shows."""

    def emitted(message: str, category: type[Warning], module: str) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with cli.job_warning_filters():
                warnings.warn_explicit(message, category, "c10d_logger.py", 83, module=module)
        return bool(caught)

    deprecated = "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single` instead."
    scatter = "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed.reduce_scatter_single` instead."
    assert not emitted(deprecated, FutureWarning, "torch.distributed.c10d_logger")
    assert not emitted(scatter, FutureWarning, "torch.distributed.c10d_logger")
    assert emitted(deprecated, FutureWarning, "my_program")
    assert emitted(deprecated, DeprecationWarning, "torch.distributed.c10d_logger")
    assert emitted("`torch.distributed.all_reduce` is deprecated.", FutureWarning, "torch.distributed.c10d_logger")


def test_importing_dist_cautious_leaves_warning_filters_alone() -> None:
    """A program that imports the package (CLI and train loop included) keeps its filters
    (torch, imported first, adds its own: those are torch's, not the package's)."""
    code = (
        "import warnings, torch; before = list(warnings.filters)\n"
        "import dist_cautious, dist_cautious.cli, dist_cautious.train.loop, dist_cautious.kernels\n"
        "assert warnings.filters == before, [f for f in warnings.filters if f not in before]\n"
        "print('unchanged', len(before))\n"
    )
    result = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "unchanged" in result.stdout, result.stderr[-3000:]


def test_zero3_job_output_has_no_deprecation_warnings(tmp_path) -> None:
    """DeepSpeed ZeRO-3 on 2 ranks, progress bar on: without the job's filter this printed about
    four `torch.distributed.* is deprecated` FutureWarnings per step through the bar."""
    from dist_cautious.train.backend import deepspeed_available

    if not deepspeed_available():
        pytest.skip("DeepSpeed is not installed")
    args = [arg for arg in TINY_TRAIN if arg not in ("--quiet", "fsdp2", "--backend")]
    result = run_cli([*args, "--backend", "deepspeed", "--zero-stage", "3", "--optimizer", "came", "--nproc", "2"], tmp_path, TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "came / deepspeed / 2 rank(s): 3 steps" in result.stdout
    assert "3/3" in result.stderr  # the progress bar ran (through stderr, where the warnings were)
    assert "Warning" not in result.stderr and "deprecated" not in result.stderr, result.stderr[-3000:]

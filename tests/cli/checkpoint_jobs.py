"""Helpers of the checkpoint tests: several `train` jobs in one set of spawned ranks (process
start-up, not training, is what costs here), and the full contents of a checkpoint, read back
the way a user would (DCP's ``dcp_to_torch_save``; DeepSpeed's own files and ``zero_to_fp32``),
so that two runs can be compared tensor by tensor."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tests.sessions import run_in_session

#: a tiny job whose global batch splits over 1, 2, 3 and 4 ranks; checkpoints every 2 steps
TINY_JOB: dict[str, Any] = dict(
    steps=6, global_batch=12, context=16, width=32, layers=1, corpus_bytes=65536, warmup=2,
    progress=False, checkpoint_every=2,
)


def cli_arguments(settings: dict[str, Any]) -> list[str]:
    """The `dist-cautious train` flags of a job described by TrainConfig fields (``progress``
    False is ``--quiet``), so a CLI run and an in-process run are the same job."""
    arguments = []
    for name, value in settings.items():
        if name == "progress":
            arguments += [] if value else ["--quiet"]
        else:
            arguments += [f"--{name.replace('_', '-')}", str(value)]
    return arguments


def run_command(command: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    """``command`` in its own session with a deadline; everything it started is killed after."""
    return run_in_session(command, cwd, env, timeout_s)


def init_rank(rank: int, world_size: int) -> None:
    """A spawned rank's process group: gloo through DeepSpeed (which FSDP2 and DDP jobs then use
    too), with a one-minute timeout so a rank whose peer died fails fast."""
    import datetime
    import logging

    os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=60))


def run_jobs(rank: int, world_size: int, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Worker for ``run_ranks``: each job is ``{"config": TrainConfig fields, "fault": spec,
    "resume_from": checkpoint folder}``. ``resume_from`` is copied into the job's (fresh)
    checkpoint directory first, so the job resumes there as a job stopped after that checkpoint
    would. ``fault`` is set as ``DIST_CAUTIOUS_FAULT`` (a ``raise`` fault stops the job on every
    rank at once). Returns per job its loss curve, the step it resumed from, or that it stopped."""
    import torch.distributed as dist

    from dist_cautious.train import faults
    from dist_cautious.train.loop import TrainConfig, train

    outcomes = []
    for job in jobs:
        if "resume_from" in job:
            if rank == 0:
                source = Path(job["resume_from"])
                shutil.copytree(source, Path(job["config"]["checkpoint_dir"]) / source.name)
            dist.barrier()
        os.environ[faults.ENV] = job.get("fault", "")
        start = time.perf_counter()
        try:
            result = train(TrainConfig(**job["config"]))
        except faults.InjectedFault:
            outcomes.append({"stopped": True})
            continue
        finally:
            os.environ.pop(faults.ENV, None)
        outcomes.append({"losses": result.losses, "resumed_from": result.resumed_from, "seconds": time.perf_counter() - start})
    return outcomes


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts / lists / tuples as one dict of dotted keys to leaves (tensors, numbers ...)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def read_dcp(checkpoint: Path) -> dict[str, Any]:
    """Everything in a checkpoint's DCP folder (model weights and optimizer state, whole
    tensors whatever the world size that wrote it), flattened: ``model.*``, ``optim.*``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "full.pt"
        dcp_to_torch_save(checkpoint / "dcp", target)
        return flatten(torch.load(target, weights_only=False))


def read_deepspeed_files(checkpoint: Path) -> dict[str, Any]:
    """Every file DeepSpeed's ``save_checkpoint`` wrote (model states, each rank's optimizer
    partitions and state), flattened with the file name in front."""
    out: dict[str, Any] = {}
    for path in sorted((checkpoint / "deepspeed").glob("*.pt")):
        out.update(flatten(torch.load(path, weights_only=False), path.name))
    return out


def deepspeed_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a DeepSpeed checkpoint, rebuilt from its fp32 partitions by
    DeepSpeed's own ``zero_to_fp32`` (any world size, ZeRO-1/2/3)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="deepspeed"))


def differences(a: dict[str, Any], b: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """Keys whose values are not identical (tensors: same dtype, shape and bits), keys only one
    side has, skipping keys that contain any of ``skip``."""
    wanted = lambda key: not any(part in key for part in skip)  # noqa: E731
    keys_a, keys_b = {k for k in a if wanted(k)}, {k for k in b if wanted(k)}
    found = [f"{k}: only in the first" for k in sorted(keys_a - keys_b)] + [f"{k}: only in the second" for k in sorted(keys_b - keys_a)]
    for key in sorted(keys_a & keys_b):
        x, y = a[key], b[key]
        if torch.is_tensor(x) or torch.is_tensor(y):
            same = torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        else:  # an object without == (DeepSpeed's loss scaler) is compared by what it prints
            same = x == y or (type(x) is type(y) and repr(x) == repr(y))
        if not same:
            found.append(f"{key}: {_describe(x)} != {_describe(y)}")
    return found


def _describe(value: Any) -> str:
    if torch.is_tensor(value):
        return f"tensor{tuple(value.shape)} {value.dtype}"
    return repr(value)[:80]

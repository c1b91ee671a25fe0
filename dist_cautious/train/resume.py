"""What a checkpoint of the train job holds, and how every rank writes and reads it.

A checkpoint (``dist_cautious.train.checkpoint`` makes it complete) holds:

- the model and the optimizer state, in the backend's own format. Single process, DDP and FSDP2:
  one ``torch.distributed.checkpoint`` (DCP) folder ``dcp/`` of ``{"model", "optim"}`` from
  ``get_state_dict``, whose keys are the model's parameter names whatever the wrapper, so DCP
  reshards it onto any world size (and any of the three backends). DeepSpeed:
  ``engine.save_checkpoint`` into ``deepspeed/``; at another world size, DeepSpeed's universal
  checkpoint (``ds_to_universal``, then ``load_universal``) reshards it.
- ``job.json``: the step, the data position (the index of the next batch: batches are drawn by
  step, so it equals the step), the loss curve so far, the world size, and the job's settings.
- ``rng/rank-XXXXX.pt``: each rank's torch (and CUDA) and Python random states.

Rank 0 does all folder work (``checkpoint.begin`` / ``commit`` / ``prune``) and tells the others
how it went, so a failure there raises on every rank instead of leaving them waiting. The folder
must be one filesystem every rank sees (DCP's requirement too).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from dist_cautious.train import checkpoint as folders
from dist_cautious.train.faults import FaultPlan

logger = logging.getLogger("dist_cautious")

JOB_FILE = "job.json"
DCP_FOLDER = "dcp"
DEEPSPEED_TAG = "deepspeed"
#: settings a resumed job must share with its checkpoint: they fix the model, the data or the math
MUST_MATCH = (
    "optimizer", "global_batch", "context", "width", "layers", "heads", "lr", "weight_decay", "cautious_weight_decay", "warmup",
    "corpus_bytes", "seed", "precision",
)  # fmt: skip
DEEPSPEED_MUST_MATCH = ("zero_stage", "offload", "zero3_persistence_threshold")


class PoisonedState(RuntimeError):
    """The state a checkpoint would hold has nan/inf values: nothing was written."""


@dataclass(frozen=True)
class Resume:
    """The checkpoint a job resumes from, as rank 0 found and verified it."""

    step: int
    path: str
    job: dict[str, Any]

    @property
    def universal(self) -> bool:
        """A DeepSpeed checkpoint written at another world size: loaded through DeepSpeed's
        universal checkpoint (the engine must be built with ``load_universal``)."""
        return self.job["backend"] == "deepspeed" and self.job["world_size"] != _world_size()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _on_rank0(work: Callable[[], Any]) -> Any:
    """``work()`` on rank 0, its result (or its error, raised on every rank) on all ranks."""
    outcome: list[Any] = [None]
    if _rank() == 0:
        try:
            outcome[0] = ("ok", work())
        except Exception as error:  # re-raised below, on every rank
            outcome[0] = ("error", error)
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise value
    return value


def _settings(config: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if k in MUST_MATCH + DEEPSPEED_MUST_MATCH + ("steps", "backend")}


def check_compatible(job: dict[str, Any], config: Any, path: str) -> None:
    """``ValueError`` naming the first setting in which ``config`` differs from the job that
    wrote the checkpoint (other widths, optimizers, data ... would load wrong or not at all)."""
    saved = {**asdict(type(config)()), **job["settings"]}  # a setting added since: its default
    if (saved["backend"] == "deepspeed") != (config.backend == "deepspeed"):
        raise ValueError(f"checkpoint {path} was written by backend {saved['backend']}; this job runs {config.backend} (DeepSpeed's format and DCP's do not mix)")
    names = MUST_MATCH + (DEEPSPEED_MUST_MATCH if config.backend == "deepspeed" else ())
    for name in names:
        if saved[name] != getattr(config, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"checkpoint {path} was written with {flag} {saved[name]!r}; this job has {getattr(config, name)!r} (use another --checkpoint-dir, or the same settings)")
    if saved["steps"] != config.steps and _rank() == 0:
        logger.warning("dist_cautious: checkpoint %s was written by a job of --steps %d; this one runs to %d, so its learning-rate schedule differs from there on", path, saved["steps"], config.steps)


class Checkpointer:
    """Checkpoints of one job in ``config.checkpoint_dir``: found, written, loaded, pruned."""

    def __init__(self, config: Any, faults: FaultPlan) -> None:
        self.config = config
        self.root = Path(config.checkpoint_dir)
        self.faults = faults

    # ------------------------------------------------------------------------------- finding
    def find(self) -> Optional[Resume]:
        """The newest complete, verified checkpoint (rank 0 looks, every rank gets the answer);
        also clears what crashed saves left behind. ``None`` on a fresh directory."""
        resume = _on_rank0(self._find_on_rank0)
        if resume is not None:
            check_compatible(resume.job, self.config, resume.path)
        return resume

    def _find_on_rank0(self) -> Optional[Resume]:
        found = folders.newest_loadable(self.root, logger.warning)
        if found is not None:
            for moved in folders.set_aside_newer(self.root, found.step):
                logger.warning("dist_cautious: set aside %s (newer than the checkpoint resumed from, but not loadable)", moved)
        for removed in folders.remove_incomplete(self.root):
            logger.info("dist_cautious: removed %s (an incomplete checkpoint a crash left)", removed)
        if found is None:
            return None
        job = json.loads((found.path / JOB_FILE).read_text())
        return Resume(found.step, str(found.path), job)

    # ------------------------------------------------------------------------------- writing
    def due(self, step: int) -> bool:
        """A checkpoint after every ``checkpoint_every`` steps, and after the last step."""
        return step % self.config.checkpoint_every == 0 or step == self.config.steps

    def save(self, step: int, model: torch.nn.Module, optimizer: Any, engine: Any, losses: list[float]) -> None:
        """Write the checkpoint of the state after ``step`` (a collective: every rank calls
        it). ``PoisonedState`` on every rank, and nothing written, if that state is not finite."""
        trouble = nonfinite_state(model, optimizer, engine)
        if trouble is not None:
            raise PoisonedState(trouble)
        tmp = Path(_on_rank0(lambda: str(folders.begin(self.root, step))))
        if engine is not None:
            engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False)
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(model, optimizer)
            with _dcp_quiet():
                dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / DCP_FOLDER))
        rank = _rank()
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
        if rank == 0:
            job = {"step": step, "data_position": step, "world_size": _world_size(), "backend": self.config.backend,
                   "losses": losses, "settings": _settings(self.config)}
            (tmp / JOB_FILE).write_text(json.dumps(job, indent=1))
        self.faults.fire("save", step)
        if dist.is_initialized():
            dist.barrier()  # every rank's files are written before rank 0 hashes them
        _on_rank0(lambda: self._commit(tmp, step))

    def _commit(self, tmp: Path, step: int) -> None:
        done = folders.commit(tmp, step, on_renamed=lambda: self.faults.fire("rename", step))
        for path in folders.prune(self.root, self.config.keep_checkpoints):
            logger.debug("dist_cautious: deleted %s (keeping the newest %d)", path, self.config.keep_checkpoints)
        logger.debug("dist_cautious: checkpoint %s complete", done.path)

    # ------------------------------------------------------------------------------- loading
    def load(self, resume: Resume, model: torch.nn.Module, optimizer: Any, engine: Any) -> tuple[int, list[float]]:
        """Restore model, optimizer and RNG states from ``resume``; the step to continue from
        and the loss curve so far."""
        path = Path(resume.path)
        if engine is not None:
            if resume.universal:
                self._load_universal(resume, engine)
            else:
                loaded, _ = engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_lr_scheduler_states=False)
                if loaded is None:  # DeepSpeed returns None (and only logs) when it found nothing
                    raise folders.CheckpointError(f"DeepSpeed found no checkpoint under {path / DEEPSPEED_TAG}")
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state}
            defaulted = _missing_hyperparameters(state, path / DCP_FOLDER)
            with _dcp_quiet():  # partial only in param-group hyperparameters (checked just above)
                dcp.load(state, checkpoint_id=str(path / DCP_FOLDER), planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
            if defaulted and _rank() == 0:
                logger.warning("dist_cautious: checkpoint %s has no %s (written by an older version?): this job's values are kept", path, ", ".join(defaulted))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if resume.job["world_size"] == _world_size():
            _set_rng_state(torch.load(path / "rng" / f"rank-{_rank():05d}.pt", weights_only=True))
        elif _rank() == 0:
            logger.info("dist_cautious: random states not restored (saved by %d ranks, resumed on %d); the job draws no random numbers after initialisation", resume.job["world_size"], _world_size())
        if _rank() == 0:
            logger.info("dist_cautious: resumed from step %d (%s)", resume.step, path)
        return resume.step, [float(v) for v in resume.job["losses"]]

    def _load_universal(self, resume: Resume, engine: Any) -> None:
        """DeepSpeed at another world size: rank 0 converts the checkpoint with DeepSpeed's own
        ``ds_to_universal`` into a ``.tmp-`` folder; every rank loads it; the folder is removed."""
        work = self.root / f".tmp-universal-{Path(resume.path).name}"

        def convert() -> None:
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(Path(resume.path) / DEEPSPEED_TAG),
                       "--output_folder", str(work / "universal"), "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
            env = dict(os.environ)
            if not torch.cuda.is_available():
                env.setdefault("DS_ACCELERATOR", "cpu")
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                raise folders.CheckpointError(f"ds_to_universal failed on {resume.path} (saved by {resume.job['world_size']} ranks, resuming on {_world_size()}):\n{(done.stdout + done.stderr)[-3000:]}")

        _on_rank0(convert)
        try:
            loaded, _ = engine.load_checkpoint(str(work), tag="universal", load_lr_scheduler_states=False)
            if loaded is None:
                raise folders.CheckpointError(f"DeepSpeed found no universal checkpoint under {work / 'universal'}")
        finally:
            if dist.is_initialized():
                dist.barrier()
            _on_rank0(lambda: shutil.rmtree(work, ignore_errors=True))


def _missing_hyperparameters(state: dict[str, Any], folder: Path) -> list[str]:
    """The param-group entries (``optim.param_groups.<i>.<name>``) this job has and the DCP
    checkpoint in ``folder`` lacks: a hyperparameter added since it was written. A missing
    weight or optimizer-state entry raises ``CheckpointError`` naming it: those are never
    left at their fresh values."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = set(FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
    needed = [f"model.{name}" for name in state["model"]]
    needed += [f"optim.state.{name}.{key}" for name, entries in state["optim"]["state"].items() for key in entries]
    missing = [key for key in needed if key not in saved]
    if missing:
        raise folders.CheckpointError(f"checkpoint {folder} lacks {len(missing)} entries this job needs: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    groups = [f"optim.param_groups.{index}.{key}" for index, group in enumerate(state["optim"]["param_groups"]) for key in group]
    return [key for key in groups if key not in saved]


@contextmanager
def _dcp_quiet() -> Iterator[None]:
    """DCP warns on every save and load in a single process that it assumes a single process:
    that is this job's intent (backend single), so exactly that warning is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to (save|load) in a single process", category=UserWarning)
        yield


def _local_tensors(model: torch.nn.Module, optimizer: Any, engine: Any) -> list[tuple[str, torch.Tensor]]:
    """(name, local tensor) for what a checkpoint holds of the weights and the optimizer state:
    the params and the state of the optimizer that steps (DeepSpeed's: its fp32 partitions)."""
    basic = getattr(engine.optimizer, "optimizer", engine.optimizer) if engine is not None else optimizer
    names = {id(p): n for n, p in (engine.module if engine is not None else model).named_parameters()}
    out = []
    for group_index, group in enumerate(basic.param_groups):
        for index, param in enumerate(group["params"]):
            name = names.get(id(param), f"param {index} of group {group_index} (a flat fp32 partition)")
            out.append((name, param.detach()))
            for key, value in basic.state.get(param, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    out.append((f"{key} of {name}", value))
    return out


def nonfinite_state(model: torch.nn.Module, optimizer: Any, engine: Any) -> Optional[str]:
    """The first non-finite weight or optimizer-state tensor on any rank, named, or ``None``
    (a collective: one all-reduce, and an all-gather only when something is wrong)."""
    mine = None
    for name, tensor in _local_tensors(model, optimizer, engine):
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.numel() and not bool(torch.isfinite(local).all()):
            mine = f"{name} on rank {_rank()}"
            break
    if not dist.is_initialized():
        return mine
    flag = torch.tensor([mine is not None], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return None
    everyone: list[Any] = [None] * _world_size()
    dist.all_gather_object(everyone, mine)
    return next(t for t in everyone if t is not None)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

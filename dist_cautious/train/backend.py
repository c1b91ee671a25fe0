"""Where the ranks come from and how the model is wrapped.

Rank discovery, in order: a launcher that sets ``RANK`` / ``WORLD_SIZE`` (torchrun, the
deepspeed launcher, a SLURM script); ``mpirun`` (Open MPI / MPICH / PMIx environment), where the
ranks are read through mpi4py and rank 0's address and a free port are broadcast so that
``torch.distributed`` can rendezvous over TCP; otherwise nothing: the CLI spawns ``--nproc``
local ranks itself. CPU ranks use gloo, GPU ranks NCCL (one GPU per local rank).

Backends: ``single`` (one process, whole tensors), ``ddp`` (DistributedDataParallel: whole
tensors on every rank, the optimizer communicates nothing), ``fsdp2`` (``fully_shard`` per block
and at the root: ``Shard(0)`` DTensor params, the optimizer reduces its partial sums), and
``deepspeed`` when ``dist_cautious.integrations.deepspeed`` is installed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from dist_cautious.integrations.deepspeed_shm import release_cpu_allreduce_buffer
from dist_cautious.local_ranks import free_port, start_processes
from dist_cautious.netif import choose_socket_interface, host_networks, master_address

logger = logging.getLogger("dist_cautious")

BACKENDS = ("single", "ddp", "fsdp2", "deepspeed")
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def deepspeed_available() -> bool:
    """True when the DeepSpeed integration and DeepSpeed itself import."""
    try:
        import deepspeed  # noqa: F401

        from dist_cautious.integrations import deepspeed as _integration  # noqa: F401
    except Exception:
        return False
    return True


def external_launcher() -> Optional[str]:
    """``"env"`` when RANK/WORLD_SIZE are set, ``"mpi"`` under mpirun, else ``None``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "env"
    if any(name in os.environ for name in _MPI_SIZE_VARS):
        return "mpi"
    return None


def export_mpi_environment() -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from MPI.

    Rank 0 picks the address and broadcasts it: loopback when every rank shares its host, else
    its address on the network the other hosts share (``netif.master_address``, from every
    host's networks: not its hostname's address, which may be loopback); an existing
    ``MASTER_ADDR`` / ``MASTER_PORT`` wins.
    """
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise RuntimeError("launched by mpirun but mpi4py is not installed (pip install mpi4py)") from error
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    single_host = local.Get_size() == comm.Get_size()  # the same answer on every rank
    networks = comm.gather(None if single_host else host_networks(), root=0)
    rendezvous = None
    if comm.Get_rank() == 0:
        address = os.environ.get("MASTER_ADDR") or (
            "127.0.0.1" if single_host else master_address(networks, interface=os.environ.get("GLOO_SOCKET_IFNAME"))
        )
        rendezvous = (address, os.environ.get("MASTER_PORT") or str(free_port()))
    address, port = comm.bcast(rendezvous, root=0)
    os.environ.update(
        RANK=str(comm.Get_rank()),
        WORLD_SIZE=str(comm.Get_size()),
        LOCAL_RANK=str(local.Get_rank()),
        LOCAL_WORLD_SIZE=str(local.Get_size()),
        MASTER_ADDR=address,
        MASTER_PORT=port,
    )
    local.Free()


@dataclass
class Runtime:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    mesh: Any = None  # a 1-D DeviceMesh over all ranks (fsdp2)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if device != "cpu":
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device("cpu")


def init_runtime(backend: str, device: str = "auto", timeout_s: float = 300.0) -> Runtime:
    """Join (or, for ``single``, skip) the process group described by the environment."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if external_launcher() == "mpi" and "RANK" not in os.environ:
        export_mpi_environment()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if backend == "single" and world_size != 1:
        raise ValueError(f"backend 'single' runs one process, but WORLD_SIZE={world_size}; use ddp or fsdp2")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    run_device = pick_device(device, local_rank)
    if backend != "single" and not dist.is_initialized():
        kind = "nccl" if run_device.type == "cuda" else "gloo"
        interface = choose_socket_interface(nccl=kind == "nccl")
        if interface is not None and rank == 0:
            logger.info("dist_cautious: the job spans hosts; ranks talk over %s (GLOO_SOCKET_IFNAME%s)", interface, ", NCCL_SOCKET_IFNAME" if kind == "nccl" else "")
        store = torchelastic_store(rank, timeout_s)
        joined = {"store": store, "rank": rank, "world_size": world_size} if store is not None else {}
        dist.init_process_group(kind, timeout=timedelta(seconds=timeout_s), **joined, **({"device_id": run_device} if kind == "nccl" else {}))
    runtime = Runtime(rank, world_size, local_rank, local_world, run_device)
    if backend == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        runtime.mesh = init_device_mesh(run_device.type, (world_size,))
    return runtime


def torchelastic_store(rank: int, timeout_s: float) -> Optional[dist.Store]:
    """Under torchrun with one agent, the store the job's process group meets in: torchrun's
    shared rendezvous store, under a prefix of the restart count. Otherwise ``None`` (the
    default ``env://`` rendezvous).

    torchrun (torch 2.13) shares its rendezvous TCPStore with the workers and keeps it across
    restarts, so a restarted job's ranks read the previous attempt's gloo/NCCL addresses
    ("Connection refused" at ``init_process_group``; pytorch issue 135712). One agent restarts
    all its workers with the same ``TORCHELASTIC_RESTART_COUNT``, so the count is a key every
    rank agrees on. Several agents may not agree on it (a healthy node restarts its workers
    without counting): there the fix is torchrun's own ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``,
    and rank 0 says so when restarts are enabled without it."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            logger.warning("dist_cautious: torchrun shares its rendezvous store with the job, so a restart on several nodes may read the previous attempt's addresses (pytorch issue 135712); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun")
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"dist_cautious/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def wrap_model(model: nn.Module, backend: str, runtime: Runtime, precision: str = "fp32") -> nn.Module:
    """Move ``model`` to the device and wrap it for ``backend`` (``deepspeed`` is wrapped by
    its engine in the loop, together with the optimizer)."""
    model = model.to(runtime.device)
    if backend in ("single", "deepspeed"):
        return model
    if backend == "ddp":
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if backend == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=runtime.mesh, mp_policy=policy)
        fully_shard(model, mesh=runtime.mesh, mp_policy=policy)
        return model
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    release_cpu_allreduce_buffer()  # DeepSpeed on CPU leaves a /dev/shm segment per rank


def spawn_local(target: Any, nproc: int, args: tuple = ()) -> None:
    """Run ``target(*args)`` on ``nproc`` fresh local processes forming one job (loopback
    rendezvous on a free port); raises if any rank fails. Used when no launcher started us. The
    processes are forked from a fork server that has imported torch (``local_ranks``)."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    from dist_cautious.kernels import prebuild

    prebuild("cpu")  # CPU ranks (and the CPU offload paths of GPU ranks) then import one build
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    start_processes(_spawned_rank, (nproc, target, args), nproc, join=True)


def _spawned_rank(local_rank: int, nproc: int, target: Any, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(nproc))
    target(*args)

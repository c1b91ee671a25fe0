"""``dist-cautious``: report the install, train the demo job, estimate memory, run benchmarks.

Every subcommand has ``--help``. Bad arguments end with one line on stderr and exit status 2,
never a traceback; errors the user can fix (a bad value, a missing file, a backend not in this
build) are reported the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import logging
import os
import platform
import shutil
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Callable, NoReturn, Optional

from dist_cautious.train.job_warnings import JOB_WARNING_FILTERS, job_warning_filters  # noqa: F401 (re-exported)

USAGE_ERROR = 2
TRAINING_FAILED = 1  # the job ran and stopped on an error it reported itself (a non-finite loss)


class CliError(Exception):
    """An error whose one-line message is all the user needs."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an argument error is one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(USAGE_ERROR)


def _checked_number(convert: Callable[[str], Any], accept: Callable[[Any], bool], unparsable: str, rejected: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the text, then ``accept`` the value, each failure a
    one-line ``expected ...`` message."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {unparsable}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {rejected}, got {text!r}")
        return value

    return parse


_positive_int = _checked_number(int, lambda v: v >= 1, "a positive integer", "a positive integer")
_nonnegative_int = _checked_number(int, lambda v: v >= 0, "an integer >= 0", "an integer >= 0")
_nonnegative_float = _checked_number(float, lambda v: v >= 0 and v != float("inf"), "a number", "a finite number >= 0")


# ----------------------------------------------------------------------------------------- report
def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        try:
            return str(getattr(importlib.import_module(module), "__version__", "installed"))
        except Exception:
            return "not installed"


def cmd_report(args: argparse.Namespace) -> int:
    """Versions, devices, distributed backends, and which optimizer kernels are usable here."""
    import torch
    import torch.distributed as dist

    import dist_cautious
    from dist_cautious import kernels

    rows = [
        ("dist_cautious", f"{dist_cautious.__version__} ({os.path.dirname(dist_cautious.__file__)})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})"),
    ]
    for name in ("deepspeed", "mpi4py", "tqdm", "matplotlib"):
        rows.append((name, _version(name)))
    rows.append(("cpu", f"{platform.machine()}, {os.cpu_count()} cores"))
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        rows.append(("cuda devices", f"{torch.cuda.device_count()}: {names}"))
    else:
        rows.append(("cuda devices", "none"))
    available = [name for name in ("gloo", "nccl", "mpi") if getattr(dist, f"is_{name}_available")()]
    rows.append(("torch.distributed", ", ".join(available) or "unavailable"))
    rows.append(("FSDP2 (fully_shard)", "yes" if _importable("torch.distributed.fsdp", "fully_shard") else "no"))
    rows.append(("DeepSpeed integration", "yes" if _importable("dist_cautious.integrations.deepspeed") else "not in this build"))
    rows.append(("c++ compiler", shutil.which(os.environ.get("CXX", "c++")) or "not found"))
    rows.append(("nvcc", shutil.which("nvcc") or "not found"))
    mode = kernels.kernel_mode()
    rows.append(("DIST_CAUTIOUS_KERNELS", mode))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        rows.append((f"{device} kernels", _kernel_status(device, mode, args.build)))
    width = max(len(key) for key, _ in rows)
    print("dist_cautious report")
    print("-" * (width + 50))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _importable(module: str, attribute: Optional[str] = None) -> bool:
    try:
        loaded = importlib.import_module(module)
    except Exception:
        return False
    return attribute is None or hasattr(loaded, attribute)


def _kernel_status(device: str, mode: str, build: bool) -> str:
    """Which path ``train`` (``ops_for``) will take on ``device``: without ``build``, predicted
    from the install and torch's JIT cache (``kernels.build.cache_state``), nothing compiled;
    with ``build``, the result of loading (JIT-building if needed) and self-checking it."""
    import torch

    from dist_cautious import kernels
    from dist_cautious.kernels import build as kernel_build
    from dist_cautious.kernels import reference

    module_name = f"dist_cautious.kernels.{device}_ops"
    if mode == "reference":
        return "torch reference (forced by DIST_CAUTIOUS_KERNELS=reference)"
    if not _importable(module_name):
        return f"torch reference (native module {module_name} not in this build)"
    if not build:
        return _predicted_kernel_status(kernel_build.cache_state(device), device, mode)
    try:
        ops = kernels.ops_for(torch.device(device))
    except Exception as error:  # mode == native and the build failed
        return f"native build FAILED: {error}"
    return "torch reference (native build failed, see the warning above)" if ops is reference else "native (built and loaded)"


def _predicted_kernel_status(state: Any, device: str, mode: str) -> str:
    """One report line from a ``kernels.build.CacheState``: what the first ``train`` will do."""
    from dist_cautious.kernels.build import BUILD_TIME

    if mode == "native":
        otherwise = "if it fails, `train` stops (DIST_CAUTIOUS_KERNELS=native)"
    else:
        otherwise = "if that fails, the torch reference path"
    check = "self-checked against the reference path on first use"
    if state.status == "ahead-of-time":
        return f"native: ahead-of-time build {state.location}, imported by `train` ({check})"
    lock = f"; {state.location}/lock exists: a process is building or checking it now, or one was killed and left it (then delete it: loads wait for it)" if state.locked else ""
    if state.status == "cached":
        return f"native: built and cached in {state.location}; `train` loads it without building ({check}){lock}"
    if state.status == "build":
        return f"native: `train` JIT-builds it on first use, {BUILD_TIME[device]} ({state.reason}; into {state.location}); {otherwise}; `dist-cautious report --build` builds it now{lock}"
    if state.status == "unavailable":
        return f"`train` fails: {state.reason}" if mode == "native" else f"torch reference: {state.reason}"
    return f"native if it builds or loads on first use (up to {BUILD_TIME[device]}); {otherwise} ({state.reason})"


# ------------------------------------------------------------------------------------------ train
def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from dist_cautious.train.backend import BACKENDS
    from dist_cautious.train.loop import TrainConfig
    from dist_cautious.train.optimizers import OPTIMIZERS, canonical_name

    d = TrainConfig()
    parser.add_argument(
        "--optimizer", default=d.optimizer, type=_argument_type(canonical_name), choices=list(OPTIMIZERS),
        help="optimizer (default: %(default)s; adamw is the baseline; any case, timm's cadamw / clion accepted)",
    )  # fmt: skip
    parser.add_argument("--backend", default=d.backend, choices=list(BACKENDS), help="single process, DDP, FSDP2 (sharded optimizer state) or DeepSpeed ZeRO (default: %(default)s)")
    parser.add_argument("--nproc", type=_positive_int, default=None, help="local ranks to spawn when no launcher started this command (default: 2 CPU ranks, or one per GPU; 1 for single)")
    parser.add_argument("--max-restarts", type=_nonnegative_int, default=0, metavar="N", help="spawned ranks only: when a rank dies, start the job again, up to N times; with --checkpoint-dir it resumes from its newest checkpoint (torchrun: use its own --max-restarts)")
    parser.add_argument("--steps", type=_positive_int, default=d.steps, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--global-batch", type=_positive_int, default=d.global_batch, help="sequences per step over all ranks (default: %(default)s)")
    parser.add_argument("--context", type=_positive_int, default=d.context, help="sequence length in bytes (default: %(default)s)")
    parser.add_argument("--width", type=_positive_int, default=d.width, help="model width (default: %(default)s)")
    parser.add_argument("--layers", type=_positive_int, default=d.layers, help="transformer blocks (default: %(default)s)")
    parser.add_argument("--heads", type=_positive_int, default=d.heads, help="attention heads (default: %(default)s)")
    parser.add_argument("--lr", type=_nonnegative_float, default=None, help="peak learning rate (default: per optimizer, see docs/cli.md)")
    parser.add_argument("--weight-decay", type=_nonnegative_float, default=None, help="decoupled weight decay (default: per optimizer)")
    parser.add_argument("--cautious-weight-decay", action="store_true", help="decay only where update and weight agree in sign (CWD, arXiv 2510.12402)")
    parser.add_argument("--warmup", type=_nonnegative_int, default=d.warmup, help="linear warm-up steps before cosine decay (default: %(default)s)")
    parser.add_argument("--corpus-bytes", type=_positive_int, default=d.corpus_bytes, help="bytes of standard-library source to train on (default: %(default)s)")
    parser.add_argument("--seed", type=_nonnegative_int, default=d.seed, help="weights and data seed (default: %(default)s)")
    parser.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="auto: CUDA with NCCL if present, else CPU with gloo (default: %(default)s)")
    parser.add_argument("--precision", default=d.precision, choices=["fp32", "bf16"], help="bf16: FSDP2 mixed precision (bf16 compute, fp32 params and reductions), or DeepSpeed's bf16 mode (bf16 params, fp32 master partitions)")
    parser.add_argument("--zero-stage", type=int, default=d.zero_stage, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage, backend deepspeed (default: %(default)s)")
    parser.add_argument("--offload", action="store_true", help="DeepSpeed: optimizer state and step on the CPU (ZeRO-Offload)")
    parser.add_argument("--zero3-persistence-threshold", type=_nonnegative_int, default=d.zero3_persistence_threshold, metavar="N", help="DeepSpeed ZeRO-3 keeps params of at most N elements whole on every rank (stage3_param_persistence_threshold; default: %(default)s, DeepSpeed's)")
    parser.add_argument("--metrics", default=None, metavar="PATH", help="write the losses and per-rank memory as JSON (rank 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="checkpoint into DIR/step-XXXXXXXX/ and resume from the newest complete checkpoint there (docs/checkpoint.md)")
    parser.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N", help=f"steps between checkpoints; one is also written after the last step (default: {d.checkpoint_every})")
    parser.add_argument("--keep-checkpoints", type=_positive_int, default=None, metavar="K", help=f"complete checkpoints to keep; older ones are deleted once a newer one is complete (default: {d.keep_checkpoints})")


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse ``type``: its ``ValueError`` message becomes argparse's (one line)."""

    def checked(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return checked


def _train_config(args: argparse.Namespace) -> Any:
    from dist_cautious.train.loop import TrainConfig

    checkpoints = {k: getattr(args, k) for k in ("checkpoint_dir", "checkpoint_every", "keep_checkpoints") if getattr(args, k) is not None}
    if checkpoints and "checkpoint_dir" not in checkpoints:
        raise ValueError("--checkpoint-every and --keep-checkpoints need --checkpoint-dir")
    return TrainConfig(**checkpoints,
        optimizer=args.optimizer, backend=args.backend, steps=args.steps, global_batch=args.global_batch,
        context=args.context, width=args.width, layers=args.layers, heads=args.heads, lr=args.lr,
        weight_decay=args.weight_decay, cautious_weight_decay=args.cautious_weight_decay,
        warmup=min(args.warmup, args.steps), corpus_bytes=args.corpus_bytes,
        seed=args.seed, device=args.device, precision=args.precision, zero_stage=args.zero_stage, offload=args.offload, zero3_persistence_threshold=args.zero3_persistence_threshold, progress=not args.quiet, metrics_path=args.metrics,
    )


@contextlib.contextmanager
def log_to_stderr() -> Iterator[None]:
    """Show the ``dist_cautious`` logger's INFO lines (a native kernel build starting) and
    warnings on stderr, one plain line each, for the duration of a command. Nothing is set at
    import: a program using dist_cautious as a library keeps its own logging configuration."""
    logger = logging.getLogger("dist_cautious")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def train_rank(config: Any) -> int:
    """One rank of the job: train, print the summary on rank 0, leave the process group.

    Returns the exit status: 0, or ``TRAINING_FAILED`` when the loss turned nan/inf (every rank
    stops at the same step; rank 0 names it on stderr)."""
    from dist_cautious.train import backend
    from dist_cautious.train.checkpoint import CheckpointError
    from dist_cautious.train.loop import NonFiniteLoss, train

    with job_warning_filters():
        try:
            result = train(config)
        except NonFiniteLoss as error:
            if _is_rank_zero():
                sys.stderr.write(f"dist-cautious train: error: {error} (peak learning rate {error.peak_lr:g}: lower --lr?)\n")
                sys.stderr.flush()
            backend.shutdown()
            return TRAINING_FAILED
        except CheckpointError as error:  # raised on every rank: one line, not a traceback per rank
            if _is_rank_zero():
                sys.stderr.write(f"dist-cautious train: error: {error}\n")
                sys.stderr.flush()
            backend.shutdown()
            return TRAINING_FAILED
        if _is_rank_zero():
            print(result.summary(), flush=True)
        backend.shutdown()
    return 0


def _is_rank_zero() -> bool:
    """Read after ``train`` started: under mpirun it is ``train`` that sets ``RANK`` (from MPI)."""
    return int(os.environ.get("RANK", 0)) == 0


def spawned_train_rank(config: Any, failed: Any) -> None:
    """``train_rank`` in a rank that ``spawn_local`` started: it shows the CLI's log lines, and a
    failure status sets the multiprocessing event ``failed`` for the parent to return. The rank
    itself ends normally (exiting non-zero would make torch kill the other ranks mid-shutdown)."""
    with log_to_stderr():
        if train_rank(config):
            failed.set()


def cmd_train(args: argparse.Namespace) -> int:
    """Train the byte-level GPT on Python's standard library source."""
    from dist_cautious.train import backend

    config = _train_config(args)
    if config.backend == "deepspeed" and not backend.deepspeed_available():
        raise CliError("backend deepspeed needs DeepSpeed and dist_cautious.integrations.deepspeed, which this build lacks")
    launcher = backend.external_launcher()
    if launcher is not None:
        if args.nproc is not None:
            raise CliError(f"--nproc is for local runs; this process was started by a launcher ({launcher}), which sets the ranks")
        if launcher == "env":
            config.validate(int(os.environ["WORLD_SIZE"]))
        return train_rank(config)
    on_gpu = config.device == "cuda" or (config.device == "auto" and _cuda_count() > 0)
    default_nproc = 1 if config.backend == "single" else (max(1, _cuda_count()) if on_gpu else 2)
    nproc = args.nproc if args.nproc is not None else default_nproc
    if config.backend == "single" and nproc != 1:
        raise CliError("backend single runs one process; use --backend ddp or fsdp2 for several ranks")
    config.validate(nproc)
    if on_gpu and nproc > max(1, _cuda_count()):
        raise CliError(f"--nproc {nproc} exceeds the {_cuda_count()} visible GPUs (use --device cpu for CPU ranks)")
    if config.backend == "single":
        if args.max_restarts:
            raise CliError("--max-restarts restarts spawned ranks; backend single runs in this process")
        return train_rank(config)
    return _spawn_with_restarts(config, nproc, args.max_restarts)


def _spawn_with_restarts(config: Any, nproc: int, max_restarts: int) -> int:
    """Spawn the job's ranks; when one dies (a signal, an exception), start them all again, up
    to ``max_restarts`` times, as ``torchrun --max-restarts`` does: each attempt sees its number
    in ``TORCHELASTIC_RESTART_COUNT`` (the name torchrun uses, so the job treats both alike). A
    failure the job reported itself (a nan loss) is final: a rerun would fail the same way."""
    import multiprocessing

    from torch.multiprocessing.spawn import ProcessException

    from dist_cautious.train import backend

    for attempt in range(max_restarts + 1):
        os.environ["TORCHELASTIC_RESTART_COUNT"] = str(attempt)
        failed = multiprocessing.get_context("forkserver").Event()
        try:
            backend.spawn_local(spawned_train_rank, nproc, (config, failed))
        except ProcessException as error:
            if attempt == max_restarts:
                raise
            reason = str(error).strip().splitlines()[0]
            logging.getLogger("dist_cautious").warning("dist_cautious: %s; restarting the job (restart %d of %d)", reason, attempt + 1, max_restarts)
            continue
        return TRAINING_FAILED if failed.is_set() else 0  # rank 0 has said why on stderr
    raise AssertionError("unreachable")


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ----------------------------------------------------------------------------------------- memory
def _add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    from dist_cautious.bench.memory import OFFLOADS, OPTIMIZER_NAMES, PRECISIONS, SHARDINGS
    from dist_cautious.bench.model_shapes import PRESETS

    parser.add_argument("--model", nargs="+", default=["llama-7b"], help=f"presets ({', '.join(PRESETS)}) or Hugging Face config.json paths (default: llama-7b)")
    parser.add_argument("--optimizer", nargs="+", default=list(OPTIMIZER_NAMES), choices=list(OPTIMIZER_NAMES), help="optimizers to compare (default: all six)")
    parser.add_argument("--sharding", default="fsdp", choices=list(SHARDINGS), help="none (single / DDP), DeepSpeed zero1/2/3, or fsdp (FSDP2) (default: %(default)s)")
    parser.add_argument("--world-size", nargs="+", type=_positive_int, default=[8], help="ranks (several values: one row each) (default: 8)")
    parser.add_argument("--precision", default="bf16-mixed", choices=list(PRECISIONS), help="(default: %(default)s)")
    parser.add_argument("--offload", default="none", choices=list(OFFLOADS), help="move optimizer state (+master) or everything sharded to host memory (default: %(default)s)")
    parser.add_argument("--rank", type=_nonnegative_int, default=0, help="which rank to report (rank 0 holds the largest shard) (default: 0)")
    parser.add_argument("--compare", action="store_true", help="print the settings comparison (DDP, ZeRO-1/2/3, offload, FSDP2 at 8 and 64 ranks) for --model and --precision")
    parser.add_argument("--plot", metavar="PNG", default=None, help="also write per-rank memory vs world size (1..256) for this model")
    parser.add_argument("--measure", action="store_true", help="measured mode: run real steps of the train model on local CPU ranks (single process, DDP, FSDP2 fp32/bf16, DeepSpeed ZeRO-1/2/3 with and without offload in fp32/bf16) and print measured vs estimated bytes per rank")
    parser.add_argument("--measure-world-sizes", nargs="+", type=_positive_int, default=[1, 2], help="world sizes for --measure (default: 1 2)")
    parser.add_argument("--measure-width", type=_positive_int, default=128, help="model width for --measure (default: %(default)s)")
    parser.add_argument("--measure-layers", type=_positive_int, default=2, help="model blocks for --measure (default: %(default)s)")


def _size(nbytes: int) -> str:
    if nbytes == 0:
        return "0"
    return f"{nbytes / 2**30:.2f}" if nbytes >= 2**26 else f"{nbytes / 2**30:.4f}"


def cmd_memory(args: argparse.Namespace) -> int:
    """Per-rank memory: analytic estimate for a model, or measured next to the estimate."""
    if args.measure:
        return _memory_measure(args)
    from dist_cautious.bench.model_shapes import resolve_model

    models = [resolve_model(spec) for spec in args.model]
    if args.compare:
        from dist_cautious.bench.memory import comparison_table

        for model in models:
            print(f"{model.name}: {model.numel:,} params; precision {args.precision}; rank-0 device GiB (host GiB in parentheses)")
            print(comparison_table(model, args.precision, tuple(args.optimizer)))
    else:
        for model in models:
            _estimate_table(model, args)
    if args.plot:
        from dist_cautious.bench.memory_plot import plot_world_sizes

        path = plot_world_sizes(models, [1, 2, 4, 8, 16, 32, 64, 128, 256], args.plot, args.sharding, args.precision, args.offload)
        print(f"wrote {path}")
    return 0


def _estimate_table(model: Any, args: argparse.Namespace) -> None:
    from dist_cautious.bench.memory import Setup, estimate

    print(f"{model.name}: {model.numel:,} params in {len(model.shapes)} tensors; sharding {args.sharding}, precision {args.precision}, offload {args.offload}; rank {args.rank}; GiB")
    header = ["optimizer", "world", "params", "grads", "master", "opt. state", "device total", "host total"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for world in args.world_size:
        if args.rank >= world:
            raise CliError(f"--rank {args.rank} is not a rank of world size {world}")
        for optimizer in args.optimizer:
            e = estimate(model, Setup(optimizer, args.sharding, world, args.precision, args.offload), args.rank)
            cells = [optimizer, str(world)] + [_size(e.total(k)) for k in ("params", "grads", "master", "optimizer_state")]
            cells += [_size(e.device_total), _size(e.host_total)]
            print("| " + " | ".join(cells) + " |")


def _memory_measure(args: argparse.Namespace) -> int:
    from dist_cautious.bench.memory_measure import measure, table
    from dist_cautious.train.backend import deepspeed_available

    width = args.measure_width
    if width % 4:
        raise CliError(f"--measure-width must be divisible by 4 (the model's heads), got {width}")
    with_deepspeed = deepspeed_available()
    if not with_deepspeed:
        print("DeepSpeed is not importable here: measuring single process, DDP and FSDP2 only", file=sys.stderr)
    rows = measure(args.measure_world_sizes, args.optimizer, dict(context=32, width=width, layers=args.measure_layers, heads=4), deepspeed=with_deepspeed)
    print("measured / estimated bytes per rank: storages held at the optimizer step, after real steps on local CPU ranks")
    print(table(rows))
    return 0


# ------------------------------------------------------------------------------------------ bench
BENCHMARKS = {"cpu": "dist_cautious.bench.cpu_step", "gpu": "dist_cautious.bench.gpu_step", "overhead": "dist_cautious.bench.host_overhead"}


def cmd_bench(args: argparse.Namespace) -> int:
    """Dispatch to a throughput benchmark's own ``main`` with the remaining arguments."""
    module_name = BENCHMARKS[args.which]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise CliError(f"benchmark {args.which!r} is not in this build ({module_name} is missing)") from None
        raise
    entry = getattr(module, "main", None)
    if not callable(entry):
        raise CliError(f"benchmark {args.which!r}: {module_name} has no main()")
    if inspect.signature(entry).parameters:
        result = entry(list(args.rest))
    else:
        saved, sys.argv = sys.argv, [f"dist-cautious bench {args.which}", *args.rest]
        try:
            result = entry()
        finally:
            sys.argv = saved
    return int(result or 0)


# ------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from dist_cautious import __version__

    parser = _Parser(prog="dist-cautious", description="CautiousAdamW, CAME and CautiousLion, exact under FSDP2 and DeepSpeed sharding.")
    parser.add_argument("--version", action="version", version=f"dist_cautious {__version__}")
    # the deepspeed launcher (without --no_local_rank) passes --local_rank=N before the command;
    # the rank comes from the environment, so it is accepted and ignored
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    report = commands.add_parser("report", help="versions, devices, and which kernels are built and usable", description=cmd_report.__doc__)
    report.add_argument("--build", action="store_true", help="JIT-build / load the native kernels to check they work (may take minutes)")
    report.set_defaults(func=cmd_report)

    train = commands.add_parser(
        "train",
        help="train a small GPT on the standard library's source (default: 2 CPU ranks, FSDP2, CautiousAdamW)",
        description=cmd_train.__doc__ + " Without a launcher it spawns --nproc local ranks (gloo on CPU, NCCL on GPUs); under torchrun, the deepspeed launcher or mpirun it joins their job.",
    )
    _add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    memory = commands.add_parser("memory", help="per-rank memory of params, grads, master weights and optimizer state", description=cmd_memory.__doc__)
    _add_memory_arguments(memory)
    memory.set_defaults(func=cmd_memory)

    bench = commands.add_parser("bench", help="optimizer-step throughput benchmarks (cpu, gpu)", description=cmd_bench.__doc__ + " Arguments after the benchmark name go to it (e.g. `dist-cautious bench cpu -- --help`).")
    bench.add_argument("which", choices=list(BENCHMARKS), help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with log_to_stderr():
            return args.func(args)
    except (CliError, ValueError, TypeError, FileNotFoundError) as error:
        sys.stderr.write(f"dist-cautious {args.command}: error: {error}\n")
        return USAGE_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("dist-cautious: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())

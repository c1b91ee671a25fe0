"""DeepSpeed integration: the optimizers by name in a config JSON, exact under ZeRO-1/2/3.

After ``register()`` (``import dist_cautious`` calls it), a DeepSpeed config may say::

    "optimizer": {"type": "CautiousAdamW" | "CAME" | "CautiousLion", "params": {...}}

or any spelling ``dist_cautious.integrations.names`` accepts (any case, ``-`` / ``_`` optional,
timm's ``cadamw`` / ``clion``; not ``adamw`` / ``lion``, which are DeepSpeed's own optimizers),
and a plain ``deepspeed.initialize`` builds it (DeepSpeed falls back to ``torch.optim.<type>``
for names it does not know, so the classes are published there), with or without
``zero_optimization`` stages 0-3 and ``offload_optimizer: {"device": "cpu"}``. Right after
DeepSpeed wraps the optimizer, the integration installs a fragment source that knows how the flat
fp32 partitions map onto the original tensors (``dist_cautious.shard.zero``), so whole-tensor
statistics are reduced over the group DeepSpeed partitions each tensor over. Settings under
which that mapping would be wrong, or the state could not be saved, raise ``ValueError`` at
``deepspeed.initialize``, naming the setting.

Full-state access (``get_full_optimizer_state``) covers CAME's row / column factors, which
DeepSpeed's own ``safe_get_full_optimizer_state`` cannot see (they are not shaped like the
partition). DeepSpeed's universal checkpoint (``ds_to_universal``) changes the world size for all three
optimizers: ``deepspeed_universal`` makes the saved state carry what the converter does not
know (CAME's factors, per-tensor steps); ``save_full_state`` / ``load_full_state`` are a
second, DeepSpeed-independent path.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from dist_cautious.integrations.names import NAMES, accepted_names, lookup, normalise
from dist_cautious.optim import CAME, CautiousAdamW, CautiousLion
from dist_cautious.optim.base import FragmentOptimizer
from dist_cautious.shard.zero import PER_TENSOR, Piece, ZeroFragmentSource, tensor_state, zero12_layout, zero3_layout

OPTIMIZERS: dict[str, type[FragmentOptimizer]] = {"CautiousAdamW": CautiousAdamW, "CAME": CAME, "CautiousLion": CautiousLion}

#: CAME's per-tensor, replicated factors (everything else but ``step`` is per element)
FACTOR_KEYS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col")

_ENGINE_MODULE = "deepspeed.runtime.engine"
_PATCHED = "_dist_cautious_patched"


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------


def register() -> None:
    """Publish the optimizers as ``torch.optim.<Name>`` (DeepSpeed's fallback for config names)
    and patch DeepSpeed's engine, now if it is imported, else as soon as it is. Idempotent."""
    for name, cls in OPTIMIZERS.items():
        existing = getattr(torch.optim, name, None)
        if existing is not None and existing is not cls:
            raise RuntimeError(f"dist_cautious: torch.optim.{name} is already {existing!r}; refusing to replace it")
        setattr(torch.optim, name, cls)
    if _ENGINE_MODULE in sys.modules:
        _patch_engine(sys.modules[_ENGINE_MODULE])
    elif importlib.util.find_spec("deepspeed") is not None and not any(isinstance(f, _EngineImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _EngineImportHook())


class _EngineImportHook(importlib.abc.MetaPathFinder):
    """Patches ``deepspeed.runtime.engine`` right after it is first imported, so that
    ``import dist_cautious`` does not pay for importing DeepSpeed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _ENGINE_MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            _patch_engine(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def _patch_engine(engine_module: Any) -> None:
    engine_cls = engine_module.DeepSpeedEngine
    if getattr(engine_cls, _PATCHED, False):
        return
    from importlib.metadata import version

    from dist_cautious.versions import check_version

    # deepspeed.__version__ may not be set yet: the engine module is imported while deepspeed is
    check_version("deepspeed", version("deepspeed"))  # its partition layout is read, not a public API
    from deepspeed.runtime.zero import utils as zero_utils

    for cls in OPTIMIZERS.values():
        if cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
            zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)
    original_sanity_check = engine_cls._do_sanity_check

    def _do_sanity_check(self: Any) -> None:
        resolve_config_name(self._config)
        original_sanity_check(self)

    engine_cls._do_sanity_check = _do_sanity_check
    original = engine_cls._configure_optimizer

    def _configure_optimizer(self: Any, client_optimizer: Any, model_parameters: Any) -> None:
        ours = isinstance(client_optimizer, FragmentOptimizer) or (
            client_optimizer is None and self.optimizer_name() in OPTIMIZERS
        )
        if ours:
            check_config(self)
        original(self, client_optimizer, model_parameters)
        basic = getattr(self, "basic_optimizer", None)
        if ours and not isinstance(basic, FragmentOptimizer):
            raise ValueError(
                f"dist_cautious: DeepSpeed's engine has no basic_optimizer of ours after _configure_optimizer "
                f"(found {type(basic).__name__}); this DeepSpeed version is not one the integration knows, and "
                "stepping its flat partitions as tensors would be wrong math"
            )
        if isinstance(basic, FragmentOptimizer):
            if not ours:
                check_config(self)
            install(self)

    engine_cls._configure_optimizer = _configure_optimizer
    setattr(engine_cls, _PATCHED, True)


def resolve_config_name(config: Any) -> None:
    """Rewrite a DeepSpeed config's ``optimizer.type`` that names one of ours in another spelling
    (``cadamw``, ``c-came``, ``cautious_lion`` ...) to the class name DeepSpeed looks up in
    ``torch.optim``, and put the keywords the name implies (``cautious``) under the params the
    config gives, which win. DeepSpeed's own names (``adamw``, ``lion``, ...) and ``torch.optim``
    classes are left alone; a name that is none of these raises ``ValueError`` listing ours
    (DeepSpeed itself would only assert)."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    name = getattr(config, "optimizer_name", None)
    if not isinstance(name, str) or name in OPTIMIZERS:
        return
    if name.lower() in DEEPSPEED_OPTIMIZERS or (getattr(torch.optim, name, None) is not None and normalise(name) not in _our_keys()):
        return
    try:
        entry = lookup(name, include_baselines=False)
    except ValueError as error:
        raise ValueError(
            f"dist_cautious: DeepSpeed config optimizer.type {name!r} is none of DeepSpeed's optimizers "
            f"({', '.join(DEEPSPEED_OPTIMIZERS)}), torch.optim's classes or ours ({', '.join(accepted_names(False))}; "
            f"case-insensitive, '-' or '_' optional): {error}"
        ) from None
    config.optimizer_name = entry.cls.__name__
    config.optimizer_params = {**entry.implied, **(config.optimizer_params or {})}


def _our_keys() -> set[str]:
    return {key for key, entry in NAMES.items() if not entry.baseline}


# ---------------------------------------------------------------------------------------------
# settings that are refused
# ---------------------------------------------------------------------------------------------


def check_config(engine: Any) -> None:
    """Raise ``ValueError`` naming the first DeepSpeed setting the optimizers cannot run under."""
    zero = engine._config.zero_config
    stage = engine.zero_optimization_stage()
    name = engine.optimizer_name() or type(getattr(engine, "client_optimizer", None)).__name__
    offload = zero.offload_optimizer
    device = str(getattr(getattr(offload, "device", None), "value", getattr(offload, "device", "none")))

    def refuse(setting: str, why: str) -> None:
        raise ValueError(f"dist_cautious ({name}): DeepSpeed setting {setting} is not supported: {why}")

    if stage in (1, 2) and zero.round_robin_gradients:
        refuse("zero_optimization.round_robin_gradients=true", "it reorders tensors inside the flat partition and DeepSpeed's own _hp_mapping of the reordered layout is wrong, so whole-tensor statistics would mix tensors")
    if stage in (1, 2) and zero.elastic_checkpoint:
        refuse("zero_optimization.elastic_checkpoint=true", "it re-partitions only state shaped like the partition and drops the per-tensor state (step counts, CAME factors); use dist_cautious.integrations.deepspeed.save_full_state / load_full_state to change the world size")
    if device == "nvme":
        refuse('zero_optimization.offload_optimizer.device="nvme"', "the NVMe swapper moves flat tensors only, not the per-tensor state (step counts, CAME's factored row/column state); use device \"cpu\"")
    if offload is not None and getattr(offload, "ratio", 1.0) != 1.0:
        refuse("zero_optimization.offload_optimizer.ratio<1", "partial offload steps part of the sub-groups with a second optimizer instance, splitting the state")
    if getattr(offload, "super_offload", False):
        refuse("zero_optimization.offload_optimizer.super_offload=true", "it replaces the optimizer step with its own CPU kernel")
    if getattr(zero, "zenflow", None) is not None:
        refuse("zero_optimization.zenflow", "ZenFlow steps a top-k selection of the gradient with its own optimizer")
    if engine.autotp_size() and engine.autotp_size() > 1:
        refuse("tensor_parallel.autotp_size>1", "tensor-parallel slices would be treated as whole tensors, so masks, RMS and CAME factors would be per slice")
    mpu = getattr(engine, "mpu", None)
    if mpu is not None:
        for getter in ("get_model_parallel_world_size", "get_tensor_model_parallel_world_size"):
            if hasattr(mpu, getter) and getattr(mpu, getter)() > 1:
                refuse("mpu (model/tensor parallelism)", "tensor-parallel slices would be treated as whole tensors")
    compile_config = getattr(engine._config, "compile_config", None)
    if compile_config is not None and getattr(compile_config, "deepcompile", False):
        refuse("compile.deepcompile=true", "DeepCompile replaces ZeRO's partition bookkeeping this integration reads")


# ---------------------------------------------------------------------------------------------
# installing the fragment source
# ---------------------------------------------------------------------------------------------


def _basic_and_wrapper(engine: Any) -> tuple[FragmentOptimizer, Any]:
    return engine.basic_optimizer, engine.optimizer


def install(engine: Any) -> Optional[ZeroFragmentSource]:
    """Give the engine's basic optimizer a fragment source that maps DeepSpeed's flat fp32
    partitions to the original tensors; ``None`` when params stay whole (ZeRO stage 0 in fp32,
    or the fp16 wrapper that keeps one fp32 copy per param: the default source is exact).
    Fails closed: a wrapper it does not know, a param without DeepSpeed's mapping, or pieces
    that do not tile a partition exactly raise ``ValueError`` naming what was found."""
    optimizer, wrapper = _basic_and_wrapper(engine)
    names = dict(getattr(engine, "param_names", {}))
    build = None
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):
        build = lambda: checked_layout(zero3_layout(wrapper, names), wrapper)  # noqa: E731
    elif hasattr(wrapper, "single_partition_of_fp32_groups") or hasattr(wrapper, "fp32_groups_flat_partition"):
        _require_hp_mappings(wrapper)
        build = lambda: checked_layout(zero12_layout(wrapper, names), wrapper)  # noqa: E731
    if build is None:
        _require_whole_params(engine, optimizer, wrapper)
        for param, name in names.items():
            param._dist_cautious_name = name
        return None
    source = ZeroFragmentSource(build, type(optimizer).partition_state_keys)
    optimizer.fragment_source = source  # instance attribute: shadows the class default
    for flat, pieces in source.layout.values():
        for piece in pieces:
            piece.param._dist_cautious_piece = (optimizer, flat, piece)
    from dist_cautious.integrations import deepspeed_universal

    deepspeed_universal.enable(engine)  # ds_to_universal carries every optimizer's state
    return source


def _require_whole_params(engine: Any, optimizer: FragmentOptimizer, wrapper: Any) -> None:
    """Without partitions the default fragment source steps each tensor it is handed as a whole
    tensor. That is exact only when DeepSpeed hands over one tensor per model param: no wrapper
    (stage 0, fp32), or the unfused fp16 wrapper's per-param fp32 copies. Anything else (a
    wrapper that flattens params, a new DeepSpeed class) is refused, naming it."""
    known = wrapper is optimizer
    if not known:
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        known = isinstance(wrapper, FP16_UnfusedOptimizer)
    shapes = sorted(tuple(p.shape) for p in engine.module.parameters() if p.requires_grad)
    stepped = sorted(tuple(p.shape) for group in optimizer.param_groups for p in group["params"])
    if not known or stepped != shapes:
        raise ValueError(
            f"dist_cautious: DeepSpeed optimizer wrapper {type(wrapper).__module__}.{type(wrapper).__name__} is not one the "
            "integration knows (ZeRO-1/2/3, the bf16 wrapper, the unfused fp16 wrapper, or none): the tensors it hands the "
            "optimizer may not be whole params, and whole-tensor statistics of them would be wrong"
        )


def _require_hp_mappings(wrapper: Any) -> None:
    """Every low-precision param of a ZeRO-1/2 / bf16 partition must carry DeepSpeed's
    ``_hp_mapping`` attribute (``None`` means: no element on this rank). A param without the
    attribute means DeepSpeed changed how it links params to partitions: reading it as "holds
    nothing" would freeze the weight silently."""
    groups = getattr(wrapper, "bit16_groups", None) or getattr(wrapper, "bf16_groups", None)
    if groups is None:
        raise ValueError(f"dist_cautious: {type(wrapper).__name__} has neither bit16_groups nor bf16_groups: unknown DeepSpeed layout")
    for group_index, params in enumerate(groups):
        for index, param in enumerate(params):
            if not hasattr(param, "_hp_mapping"):
                raise ValueError(
                    f"dist_cautious: param {index} of DeepSpeed group {group_index} (shape {tuple(param.shape)}) has no "
                    "_hp_mapping: this DeepSpeed version links params to partitions in a way the integration does not know"
                )


def checked_layout(layout: dict[int, tuple[Tensor, list[Piece]]], wrapper: Any) -> dict[int, tuple[Tensor, list[Piece]]]:
    """``layout`` after checking that each flat partition's pieces tile it exactly: the local
    pieces, in partition order, start at 0 and follow each other with no gap or overlap, each
    within its tensor; ZeRO-3 pieces sit at DeepSpeed's ``grad_position`` offsets with
    ``ceil(numel / world)`` elements each, as its ``partition_numel`` says. Raises
    ``ValueError`` naming the first piece that does not fit."""
    zero3 = hasattr(wrapper, "fp32_partitioned_groups_flat")
    for flat, pieces in layout.values():
        end = 0
        # ZeRO-3 reserves ceil(numel / world) slots for every param, held elements or not
        for piece in sorted((p for p in pieces if p.numel or zero3), key=lambda p: p.flat_offset):
            if piece.flat_offset != end or piece.start < 0 or piece.start + piece.numel > piece.global_shape.numel():
                raise ValueError(
                    f"dist_cautious: DeepSpeed's mapping of {piece.name} does not tile its flat partition: elements "
                    f"[{piece.start}, {piece.start + piece.numel}) of a {piece.global_shape.numel()}-element tensor at partition "
                    f"offset {piece.flat_offset}, where {end} was expected"
                )
            end = piece.flat_offset + piece.numel
            if zero3:
                per_rank = piece.param.partition_numel()
                world = dist.get_world_size(group=piece.group) if piece.group is not None and dist.is_initialized() else 1
                if per_rank != -(-piece.param.ds_numel // world) or piece.param.ds_tensor.numel() != per_rank:
                    raise ValueError(
                        f"dist_cautious: ZeRO-3 partition of {piece.name} holds {per_rank} elements ({piece.param.ds_tensor.numel()} in "
                        f"ds_tensor), not ceil({piece.param.ds_numel} / {world}): the ranges rank * partition_numel would be wrong"
                    )
                end = piece.flat_offset + per_rank
        if end > flat.numel():
            raise ValueError(f"dist_cautious: DeepSpeed's pieces span {end} elements of a {flat.numel()}-element flat partition")
    return layout


# ---------------------------------------------------------------------------------------------
# full state of one param (debugging, export, world-size change)
# ---------------------------------------------------------------------------------------------


def _piece_of(param: Tensor) -> tuple[FragmentOptimizer, Tensor, Piece]:
    entry = getattr(param, "_dist_cautious_piece", None)
    if entry is None:
        raise ValueError("dist_cautious: this param is not managed by a ZeRO-partitioned dist_cautious optimizer")
    return entry


def _is_owner(piece: Piece) -> bool:
    """The one rank of the group that holds the tensor's first element contributes replicated
    (per-tensor) state; the others send zeros. Known from the layout alone, no communication."""
    return piece.numel > 0 and piece.start == 0


def get_full_optimizer_state(param: Tensor, key: str) -> Optional[Tensor]:
    """The full optimizer state ``key`` of one original param, on every rank of its group
    (a collective: every rank of the group must call it, for the same param and key).

    Per-element keys (``exp_avg``, ``exp_avg_sq``) come back shaped like the param; CAME's
    factors (``exp_avg_sq_row`` ...) in came-pytorch's shapes; ``step`` as a 0-d tensor.
    ``None`` if the key does not exist for this param (e.g. before the first step)."""
    optimizer, flat, piece = _piece_of(param)
    partition_state = optimizer.state.get(flat, {})
    group = piece.group
    if key in FACTOR_KEYS or key == "step":
        from dist_cautious.optim.came import _factor_shapes

        if key == "step":
            shape: tuple[int, ...] = ()
        else:
            rows, cols = _factor_shapes(piece.global_shape)
            shape = rows if key.endswith("_row") else cols
        local = partition_state.get(PER_TENSOR, {}).get(piece.index, {}).get(key)
        if local is None and key == "step":
            local = partition_state.get("step")
        buffer = torch.zeros(shape, dtype=torch.float32, device=flat.device)
        present = torch.zeros(1, dtype=torch.float32, device=flat.device)
        if _is_owner(piece) and local is not None:
            buffer.copy_(local)
            present.fill_(1.0)
        _sum_over(group, buffer, present)
        return buffer if present.item() > 0 else None
    if key == "exp_avg_sq" and isinstance(optimizer, CAME) and len(piece.global_shape) >= 2:
        return None  # factored: CAME keeps row / column factors instead
    local = _local_elementwise_state(optimizer, partition_state, piece, key)
    present = torch.tensor([1.0 if local is not None and piece.numel else 0.0], device=flat.device)
    buffer = torch.zeros(piece.global_shape.numel(), dtype=torch.float32, device=flat.device)
    if local is not None and piece.numel:
        buffer.narrow(0, piece.start, piece.numel).copy_(local)
    _sum_over(group, buffer, present)
    return buffer.view(piece.global_shape) if present.item() > 0 else None


def _local_elementwise_state(optimizer: FragmentOptimizer, partition_state: dict[str, Any], piece: Piece, key: str) -> Optional[Tensor]:
    """This rank's ``piece.numel`` values of per-element state ``key`` of one tensor, wherever
    the optimizer keeps them (partition-shaped or per tensor, see ``shard.zero``); ``None`` if absent."""
    if key in optimizer.partition_state_keys:
        flat_state = partition_state.get(key)
        return None if flat_state is None else flat_state.view(-1).narrow(0, piece.flat_offset, piece.numel)
    compact = partition_state.get(PER_TENSOR, {}).get(piece.index, {}).get(key)
    return None if compact is None else compact.view(-1)


def _sum_over(group: Optional[dist.ProcessGroup], buffer: Tensor, present: Tensor) -> None:
    """Sum ``buffer`` and ``present`` in place over ``group`` with ONE all-reduce (exactly one
    rank holds each element, or the owner alone sends the replicated value: the sum is exact)."""
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        packed = torch.cat([buffer.reshape(-1), present])
        dist.all_reduce(packed, group=group)
        buffer.view(-1).copy_(packed[: buffer.numel()])
        present.copy_(packed[buffer.numel() :])


def set_full_optimizer_state(param: Tensor, key: str, value: Tensor) -> None:
    """Set this rank's share of state ``key`` of one param from its full value (no
    communication: every rank of the group is given the same full value)."""
    optimizer, flat, piece = _piece_of(param)
    partition_state = optimizer.state[flat]
    value = torch.as_tensor(value, dtype=torch.float32)
    if key in FACTOR_KEYS or key == "step":
        tensor_state(partition_state, piece.index)[key] = value.to(flat.device if key != "step" else "cpu").clone()
        if key == "step":
            partition_state["step"] = value.clone()
        return
    local_value = value.reshape(-1).narrow(0, piece.start, piece.numel)
    if key not in optimizer.partition_state_keys:
        tensor_state(partition_state, piece.index)[key] = local_value.to(flat.device).clone()
        return
    if key not in partition_state:
        partition_state[key] = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
    if piece.numel:
        partition_state[key].view(-1).narrow(0, piece.flat_offset, piece.numel).copy_(local_value)


def set_full_fp32_param(param: Tensor, value: Tensor) -> None:
    """Set this rank's share of the fp32 master of one param from its full value (no
    communication). DeepSpeed's own ZeRO-3 setter assumes no padding and fails for a param
    smaller than the world size; this one reads the layout."""
    _, flat, piece = _piece_of(param)
    if piece.numel:
        flat.data.view(-1).narrow(0, piece.flat_offset, piece.numel).copy_(value.reshape(-1).narrow(0, piece.start, piece.numel))


def _managed_params(engine: Any) -> Iterator[tuple[str, Tensor]]:
    optimizer, _ = _basic_and_wrapper(engine)
    source = getattr(optimizer, "fragment_source", None)
    if not isinstance(source, ZeroFragmentSource):
        raise ValueError("dist_cautious: full-state save/load needs a ZeRO-partitioned dist_cautious optimizer (stage >= 1)")
    for _, pieces in source.layout.values():
        for piece in pieces:
            yield piece.name, piece.param


def _state_keys(optimizer: FragmentOptimizer, flat: Tensor, piece: Piece) -> list[str]:
    """Keys one param has, from shapes and the optimizer type alone (same on every rank)."""
    if isinstance(optimizer, CautiousAdamW):
        # amsgrad's running maximum: per element, kept per tensor (not partition-shaped) under ZeRO
        amsgrad = any(group.get("amsgrad") for group in optimizer.param_groups)
        return ["exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if amsgrad else []), "step"]
    if isinstance(optimizer, CautiousLion):
        return ["exp_avg", "step"]
    if len(piece.global_shape) >= 2:
        return ["exp_avg", *FACTOR_KEYS, "step"]
    return ["exp_avg", "exp_avg_sq", "step"]


def gather_full_state(engine: Any) -> dict[str, dict[str, Tensor]]:
    """``{param name: {"fp32": master weight, state key: full tensor}}`` for every param of the
    engine's dist_cautious optimizer; a collective over every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    full: dict[str, dict[str, Tensor]] = {}
    optimizer, _ = _basic_and_wrapper(engine)
    for name, param in _managed_params(engine):
        _, flat, piece = _piece_of(param)
        entry = {"fp32": safe_get_full_fp32_param(param).detach().float().cpu().clone()}
        for key in _state_keys(optimizer, flat, piece):
            value = get_full_optimizer_state(param, key)
            if value is not None:
                entry[key] = value.cpu()
        full[name] = entry
    return full


def save_full_state(engine: Any, path: str) -> None:
    """Write the full (unpartitioned) fp32 weights and optimizer state to ``path`` (rank 0),
    independent of the world size: ``load_full_state`` resumes it at any world size."""
    full = gather_full_state(engine)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"format": "dist_cautious.full_state/1", "optimizer": type(engine.basic_optimizer).__name__, "params": full}, path)
    if dist.is_initialized():
        dist.barrier()


def load_full_state(engine: Any, path: str) -> None:
    """Resume weights and optimizer state written by ``save_full_state`` at any world size and
    ZeRO stage >= 1. Call after ``deepspeed.initialize`` (and after ``load_checkpoint`` if that
    restores the rest: scheduler, loss scale), on every rank."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("format") != "dist_cautious.full_state/1":
        raise ValueError(f"dist_cautious: {path} is not a dist_cautious full-state file")
    if saved["optimizer"] != type(engine.basic_optimizer).__name__:
        raise ValueError(f"dist_cautious: {path} holds {saved['optimizer']} state, the engine runs {type(engine.basic_optimizer).__name__}")
    params = saved["params"]
    managed = dict(_managed_params(engine))
    missing = sorted(set(managed) ^ set(params))
    if missing:
        raise ValueError(f"dist_cautious: params differ between {path} and the model: {missing}")
    for name, param in managed.items():
        entry = params[name]
        set_full_fp32_param(param, entry["fp32"])
        for key, value in entry.items():
            if key != "fp32":
                set_full_optimizer_state(param, key, value)
    _refresh_low_precision_params(engine)


def _refresh_low_precision_params(engine: Any) -> None:
    """Copy the fp32 masters into the params the forward pass reads."""
    wrapper = engine.optimizer
    if hasattr(wrapper, "update_lp_params"):
        wrapper.update_lp_params()
        return
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):  # ZeRO-3: each param's own partition
        for flat, params in zip(wrapper.fp32_partitioned_groups_flat, wrapper.fp16_groups):
            for param in params:
                _, offset, numel = wrapper.grad_position[wrapper.get_param_id(param)]
                param.ds_tensor.data.view(-1).narrow(0, 0, numel).copy_(flat.data.narrow(0, offset, numel))
        return
    raise ValueError(f"dist_cautious: cannot refresh params of {type(wrapper).__name__}")


__all__ = [
    "OPTIMIZERS",
    "FACTOR_KEYS",
    "register",
    "resolve_config_name",
    "check_config",
    "install",
    "get_full_optimizer_state",
    "set_full_optimizer_state",
    "set_full_fp32_param",
    "gather_full_state",
    "save_full_state",
    "load_full_state",
    "PER_TENSOR",
]

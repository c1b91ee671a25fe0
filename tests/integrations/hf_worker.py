"""Hugging Face runs the integration tests launch as a user would (``python hf_worker.py``,
``torchrun ... hf_worker.py``, ``accelerate launch ... hf_worker.py``).

Every run trains the same tiny Llama (``LlamaConfig``, random weights from a fixed seed, no
download) on the same fixed token sequences, in order, ``STEPS`` optimizer steps of a global
batch of ``GLOBAL_BATCH`` sequences however many ranks share it. ``reference`` is a plain
PyTorch loop in one process: the single-process result a sharded run must equal. The other
modes go through ``transformers.Trainer`` (``optimizer_cls_and_kwargs``, or a DeepSpeed config
naming our optimizer) or an ``accelerate`` script with the FSDP2 plugin. Each rank writes what
the test checks (optimizer classes in use, the optimizer state it holds, full weights) to
``<out>/<mode>-rank<r>.pt``.

Usage: ``hf_worker.py MODE OUT_DIR CASES_JSON`` where CASES_JSON is a list of case dicts, or
``hf_worker.py local OUT_DIR '{"reference": [...], "trainer": [...]}'`` for several
single-process modes in one process (imports, not steps, are what costs).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

STEPS = 4
GLOBAL_BATCH = 8
SEQ = 12
SAMPLES = STEPS * GLOBAL_BATCH

#: the class each config name means, and its params as a user would write them in JSON
OPTIMIZER_PARAMS: dict[str, dict[str, Any]] = {
    "CautiousAdamW": {"lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1},
    # no betas / eps: Trainer's config check compares them with adam_beta1/2 and adam_epsilon.
    # lr 1e-3: at 3e-3 CAME's bias-free first steps grew the FSDP2 run's rounding difference to
    # 0.58 of the tolerance after 4 steps (9.4e-7); at 1e-3 it is 0.03 (6.9e-8)
    "CAME": {"lr": 1e-3, "weight_decay": 0.1},
    "CautiousLion": {"lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1},
}


def make_model(layers: int = 2) -> torch.nn.Module:
    """A ``layers``-layer Llama with awkward shapes (vocab 97 and intermediate 44 rows: not divisible by
    2 or 3 ranks), fp32, eager attention (the same kernel everywhere)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=44, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def tokens() -> torch.Tensor:
    """``SAMPLES`` fixed sequences of ``SEQ`` tokens (every one a label: equal token counts,
    so a mean over the global batch is the mean of the ranks' means)."""
    return torch.randint(0, 97, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(1))


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.data = tokens()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[index], "labels": self.data[index]}


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    from dist_cautious.integrations.names import lookup

    return lookup(name).cls


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# single process: the plain loop every run is compared with
# ---------------------------------------------------------------------------------------------


def reference(case: dict[str, Any]) -> dict[str, Any]:
    """One process, our optimizer over ``case["groups"]``: ``"one"`` (every param, the
    config's weight decay: what DeepSpeed builds from a config) or ``"hf"`` (Trainer's two
    groups: no weight decay for norms and biases).

    Each step's gradient is made as ``case["world"]`` data-parallel ranks make it: the mean
    loss of each rank's slice of the global batch, scaled by ``1 / world``, accumulated in
    rank order. Halving is exact and a sum of two terms does not depend on their order, so at
    2 ranks the gradient the optimizer sees is the one the sharded run reduces, to the bit
    (one thread per process, the same kernels); what is left to differ is the optimizer's own
    sharded arithmetic: partial row / column / square sums added in another order."""
    model = make_model(case.get("layers", 2))
    params = dict(OPTIMIZER_PARAMS[case["optimizer"]], cautious=case.get("cautious", True))
    if case.get("groups") == "hf":
        decay = [p for n, p in model.named_parameters() if "norm" not in n and "bias" not in n]
        rest = [p for n, p in model.named_parameters() if "norm" in n or "bias" in n]
        groups: Any = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
    else:
        groups = model.parameters()
    optimizer = optimizer_class(case["optimizer"])(groups, **params)
    world = case.get("world", 1)
    data = tokens()
    losses = []
    for step in range(STEPS):
        batch = data[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
        total = 0.0
        for part in batch.chunk(world):
            loss = model(input_ids=part, labels=part).loss
            (loss / world).backward()
            total += loss.item() / world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return {"weights": full_weights(model), "losses": losses, "initial": full_weights(make_model(case.get("layers", 2)))}


# ---------------------------------------------------------------------------------------------
# transformers.Trainer
# ---------------------------------------------------------------------------------------------


def _reset_between_trainers() -> None:
    """Several Trainers in one launch (start-up, not the steps, is what costs): forget the
    previous one's accelerate state and DeepSpeed config."""
    from accelerate.state import AcceleratorState, PartialState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=False)
    del PartialState  # the process group stays: one per launch


def deepspeed_config(case: dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config as a Trainer user writes it: the optimizer by name, "auto" where
    Trainer fills the value in."""
    params = {key: "auto" if key in ("lr", "weight_decay") else value for key, value in OPTIMIZER_PARAMS[case["optimizer"]].items()}
    if "betas" in params:  # two betas: Trainer fills them from adam_beta1 / adam_beta2
        params["betas"] = "auto"
    if case["optimizer"] == "CautiousAdamW":
        params["eps"] = "auto"
    if "config_cautious" in case:  # else the name decides (c-came, cadamw: masked; CAME: unmasked)
        params["cautious"] = case["config_cautious"]
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": case.get("type", case["optimizer"]), "params": params},
        "zero_optimization": {"stage": case["stage"]},
        "steps_per_print": 10**9,
    }


def trainer_case(case: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = make_model()  # before the arguments: with a ZeRO-3 config alive, HF would build it under zero.Init
    spec = OPTIMIZER_PARAMS[case["optimizer"]]
    args = TrainingArguments(
        output_dir=str(out_dir / f"trainer-{case['id']}"), per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS, learning_rate=spec["lr"], weight_decay=spec["weight_decay"], adam_beta1=0.9,
        adam_beta2=spec.get("betas", [0.9, 0.999])[1],
        adam_epsilon=1e-8, max_grad_norm=0.0, lr_scheduler_type="constant", warmup_steps=0,
        train_sampling_strategy="sequential", dataloader_drop_last=True, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        deepspeed=deepspeed_config(case) if "stage" in case else None,
    )
    extra: dict[str, Any] = {}
    if "stage" not in case:  # the optimizer handed to Trainer as (class, kwargs)
        kwargs = {k: v for k, v in spec.items() if k != "weight_decay"}  # Trainer passes no lr of its own
        extra["optimizer_cls_and_kwargs"] = (optimizer_class(case["optimizer"]), dict(kwargs, cautious=case.get("cautious", True)))
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), **extra)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    out = {"losses": losses, **describe_optimizer(trainer)}
    out["weights"] = gathered_weights(trainer)
    _reset_between_trainers()
    return out


def describe_optimizer(trainer: Any) -> dict[str, Any]:
    """Which optimizer steps, and how much per-element state this rank holds."""
    engine = trainer.model_wrapped
    basic = getattr(engine, "basic_optimizer", None)
    if basic is None:  # no DeepSpeed: accelerate's wrapper around the optimizer Trainer built
        basic = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state_numel = 0
    state_keys: set[str] = set()
    for state in basic.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key in ("exp_avg", "exp_avg_sq"):
                state_numel += value.numel() if key == "exp_avg" else 0
                state_keys.add(key)
    source = getattr(basic, "fragment_source", None)
    return {
        "optimizer": type(basic).__module__ + "." + type(basic).__name__,
        "cautious": basic.defaults.get("cautious"),
        "wrapper": type(getattr(engine, "optimizer", None)).__name__,
        "fragment_source": type(source).__name__,
        "exp_avg_numel": state_numel,
        "model_numel": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainer.model.parameters()),
        "groups": [len(g["params"]) for g in basic.param_groups],
    }


def gathered_weights(trainer: Any) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank: DeepSpeed's fp32 masters (a collective under ZeRO)."""
    engine = trainer.model_wrapped
    if not hasattr(engine, "basic_optimizer"):
        return full_weights(trainer.model)
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().float().cpu().clone() for name, p in engine.module.named_parameters()}


# ---------------------------------------------------------------------------------------------
# accelerate + FSDP2
# ---------------------------------------------------------------------------------------------


def fsdp2_accelerator() -> Any:
    """An ``Accelerator`` with the FSDP2 plugin ``accelerate launch --use_fsdp --fsdp_version 2
    ...`` describes (the plugin reads the launcher's ``FSDP_*`` environment), on CPU ranks.

    accelerate 1.15 turns its FSDP plugin on only inside the branch for accelerator devices
    (``AcceleratorState.__init__``: MULTI_GPU / XPU / NPU ...); on CPU ranks (MULTI_CPU over
    gloo) it would silently train unsharded. So the script asks for CPU ranks and then sets the
    state's distributed type to FSDP: from ``accelerator.prepare`` on, everything
    (``fsdp2_prepare_model``, ``fully_shard`` per decoder layer, the switch of the optimizer's
    params to the sharded DTensors) is accelerate's own code path."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        raise RuntimeError("launch with: accelerate launch --use_fsdp --fsdp_version 2 ...")
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    if accelerator.distributed_type != DistributedType.MULTI_CPU or plugin.fsdp_version != 2:
        raise RuntimeError(f"expected CPU ranks and FSDP2, got {accelerator.distributed_type}, fsdp_version {plugin.fsdp_version}")
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


def accelerate_fsdp2_case(case: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """An accelerate training script with the FSDP2 plugin: the optimizer is ours, built over
    the model's params before ``prepare`` (accelerate then switches it to the sharded params);
    ``case["compile"]`` also compiles the prepared model with ``torch.compile``."""
    from torch.distributed.tensor import DTensor

    accelerator = fsdp2_accelerator()
    plugin = accelerator.state.fsdp_plugin
    model = make_model(case.get("layers", 2))
    spec = OPTIMIZER_PARAMS[case["optimizer"]]
    optimizer = optimizer_class(case["optimizer"])(model.parameters(), **dict(spec, cautious=case.get("cautious", True)))
    model, optimizer = accelerator.prepare(model, optimizer)
    if case.get("compile"):
        model = torch.compile(model, backend=case.get("backend", "inductor"))
    world, rank = accelerator.num_processes, accelerator.process_index
    data = tokens()
    per_rank = GLOBAL_BATCH // world
    losses = []
    for step in range(STEPS):
        batch = data[step * GLOBAL_BATCH + rank * per_rank : step * GLOBAL_BATCH + (rank + 1) * per_rank]
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    inner = optimizer.optimizer
    local_state = sum(s["exp_avg"].to_local().numel() if isinstance(s["exp_avg"], DTensor) else s["exp_avg"].numel() for s in inner.state.values())
    params = list(model.parameters())
    unwrapped = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    weights = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone() for name, p in unwrapped.named_parameters()}
    return {
        "optimizer": type(inner).__module__ + "." + type(inner).__name__,
        "distributed_type": str(accelerator.distributed_type),
        "fsdp_version": getattr(plugin, "fsdp_version", None),
        "dtensor_params": sum(isinstance(p, DTensor) for p in params),
        "params": len(params),
        "exp_avg_numel": local_state,
        "model_numel": sum(p.numel() for p in params),
        "compiled": type(model).__name__,
        "losses": losses,
        "weights": weights,
    }


MODES = {"reference": lambda case, out: reference(case), "trainer": trainer_case, "accelerate_fsdp2": accelerate_fsdp2_case}


def main() -> None:
    mode, out_dir, cases = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    os.environ.setdefault("DIST_CAUTIOUS_KERNELS", "reference")
    import dist_cautious  # noqa: F401  (DeepSpeed config names)

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    for name, mode_cases in (cases.items() if mode == "local" else [(mode, cases)]):
        results = {case["id"]: MODES[name](case, out_dir) for case in mode_cases}
        torch.save(results, out_dir / f"{name}-rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

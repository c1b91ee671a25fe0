"""PNG of per-rank device memory against world size, one line per optimizer memory class.

The cautious variants hold exactly the state of their base optimizer (the mask is recomputed
each step), so AdamW / CautiousAdamW, CAME / C-CAME and Lion / CautiousLion share a line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dist_cautious.bench.memory import Setup, estimate, gib
from dist_cautious.bench.model_shapes import ModelShapes

LINES = (
    ("adamw", "AdamW / CautiousAdamW", "tab:blue", "o", "-"),
    ("came", "CAME / C-CAME", "tab:green", "s", "--"),
    ("lion", "Lion / CautiousLion", "tab:orange", "^", ":"),
)


def plot_world_sizes(models: Sequence[ModelShapes], world_sizes: Sequence[int], out: str | Path, sharding: str = "fsdp", precision: str = "bf16-mixed", offload: str = "none") -> Path:
    """One panel per model: rank-0 device GiB vs world size (log-log), plus the params+grads floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(models), figsize=(5.2 * len(models), 7.6), squeeze=False, sharex=True)
    for column, model in enumerate(models):
        total_axis, state_axis = axes[0][column], axes[1][column]
        floor = []
        for optimizer, label, colour, marker, style in LINES:
            estimates = [estimate(model, Setup(optimizer, sharding, world, precision, offload)) for world in world_sizes]
            common = dict(marker=marker, ms=4, ls=style, label=label, color=colour)
            total_axis.plot(world_sizes, [gib(e.device_total) for e in estimates], **common)
            state_axis.plot(world_sizes, [gib(e.total("optimizer_state") + e.total("master")) for e in estimates], **common)
            floor = [gib(e.device["params"] + e.device["grads"]) for e in estimates]
        total_axis.plot(world_sizes, floor, ls="-.", color="grey", label="params + grads only")
        total_axis.axhline(80, color="black", lw=0.8, ls=":")
        total_axis.text(world_sizes[-1], 80, " 80 GiB", va="bottom", ha="right", fontsize=8)
        total_axis.set_title(f"{model.name} ({model.numel / 1e9:.2f}B params)")
        total_axis.set_ylabel("per-rank device memory, total (GiB)")
        state_axis.set_ylabel("per-rank optimizer state + master (GiB)")
        state_axis.set_xlabel("world size (ranks)")
        for axis in (total_axis, state_axis):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks(list(world_sizes), [str(w) for w in world_sizes])
            axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Steady-state per-rank memory: {sharding}, {precision}" + ("" if offload == "none" else f", offload {offload}"), fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

"""Convergence demo: the six optimizers on the ``train`` model, same data, same budget.

Each optimizer trains the byte-level GPT of ``dist-cautious train`` from the same initial
weights on the same batches (single process: the sharded backends compute the same steps, to
fp32 rounding) with its default learning rate, warm-up and cosine decay. Writes one PNG of the
loss curves (exponential moving average, raw curves faint) and a markdown table: final train
loss (mean of the last 10% of steps), validation loss, and the step at which the smoothed curve
first reaches AdamW's final smoothed loss (the sample-efficiency measure of the Cautious paper).

    python -m dist_cautious.bench.convergence --steps 250 --out docs
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from dist_cautious.train.optimizers import OPTIMIZERS

COLOURS = {"adamw": "tab:blue", "cautious-adamw": "navy", "came": "tab:green", "c-came": "darkgreen", "lion": "tab:orange", "cautious-lion": "saddlebrown"}


def smooth(values: Sequence[float], beta: float = 0.95) -> list[float]:
    """Bias-corrected exponential moving average (the first points are not pulled to 0)."""
    out, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta**index))
    return out


def first_step_below(curve: Sequence[float], threshold: float) -> Optional[int]:
    for step, value in enumerate(curve, start=1):
        if value <= threshold:
            return step
    return None


def run(optimizers: Sequence[str], steps: int, global_batch: int, seed: int, width: int = 64, layers: int = 2) -> dict[str, object]:
    from dist_cautious.train.loop import TrainConfig, train

    results = {}
    for name in optimizers:
        config = TrainConfig(optimizer=name, backend="single", steps=steps, global_batch=global_batch, warmup=max(1, steps // 10), seed=seed, progress=False, eval_batches=8, width=width, layers=layers)
        results[name] = train(config)
        print(f"{OPTIMIZERS[name].label:>14}: final loss {results[name].losses[-1]:.4f}, val {results[name].val_loss:.4f}, {results[name].seconds:.0f}s", flush=True)
    return results


def table(results: dict, steps: int) -> str:
    baseline = smooth(results["adamw"].losses)[-1] if "adamw" in results else None
    tail = max(1, steps // 10)
    lines = [
        "| optimizer | lr | final train loss (last 10%) | val loss | steps to AdamW's final loss | s |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        spec = OPTIMIZERS[name]
        reach = first_step_below(smooth(result.losses), baseline) if baseline is not None else None
        lines.append(
            f"| {spec.label} | {spec.lr:g} | {sum(result.losses[-tail:]) / tail:.4f} | {result.val_loss:.4f} | "
            f"{reach if reach is not None else f'> {steps}'} | {result.seconds:.0f} |"
        )
    return "\n".join(lines)


def plot(results: dict, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 5))
    for name, result in results.items():
        steps = range(1, len(result.losses) + 1)
        style = "--" if name in ("cautious-adamw", "c-came", "cautious-lion") else "-"
        axis.plot(steps, result.losses, color=COLOURS[name], alpha=0.15, lw=0.8)
        axis.plot(steps, smooth(result.losses), color=COLOURS[name], ls=style, lw=1.8, label=f"{OPTIMIZERS[name].label} (val {result.val_loss:.3f})")
    axis.set_xlabel("step")
    axis.set_ylabel("train loss (nats / byte)")
    losses = [v for r in results.values() for v in smooth(r.losses)]
    axis.set_ylim(min(losses) - 0.1, min(max(losses), min(losses) + 2.5))
    axis.set_title(title, fontsize=10)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_cautious.bench.convergence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default="docs", help="directory for convergence.png and convergence_table.md")
    args = parser.parse_args(argv)
    if args.steps < 10 or args.global_batch < 1:
        parser.error("--steps must be >= 10 and --global-batch >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run(args.optimizers, args.steps, args.global_batch, args.seed, args.width, args.layers)
    command = "python -m dist_cautious.bench.convergence " + " ".join(argv if argv is not None else sys.argv[1:])
    config = results[args.optimizers[0]]
    title = f"byte-level GPT ({config.parameters:,} params) on stdlib source, {args.steps} steps x {args.global_batch} x 64 bytes"
    png = plot(results, out / "convergence.png", title)
    text = table(results, args.steps)
    (out / "convergence_table.md").write_text(f"{text}\n\nMade by `{command.strip()}` in {time.perf_counter() - start:.0f}s.\n")
    print(text)
    print(f"wrote {png} and {out / 'convergence_table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

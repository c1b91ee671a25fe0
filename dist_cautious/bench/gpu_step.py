"""GPU optimizer-step benchmark: the fused kernels against the fastest known baselines.

One run prints, for a LLaMA-shaped list of about 1B params (fp32 params, grads and state by
default), the median step time and the effective memory bandwidth of:

- CautiousAdamW (cautious and not) vs ``torch.optim.AdamW(fused=True)`` and DeepSpeed ``FusedAdam``;
- CautiousLion (cautious and not) vs DeepSpeed ``FusedLion`` (if its op builds);
- CAME (cautious and not) vs ``came_pytorch.CAME`` and vs our own torch reference path;
- a device-to-device copy, the bandwidth ceiling.

"Effective GB/s" divides the bytes an ideal single-pass implementation of the NON-cautious
update must move (AdamW: read p, g, m, v and write p, m, v = 7 words per param; Lion: 5 words;
CAME: read p, g, m and write p, m = 5 words) by the step time, so every row of one optimizer is
measured with the same yardstick. The cautious variants move more (a read-only count pass over
g and m, 2 words more): their "kernel GB/s" column counts those bytes too, and is the number to
hold against the copy bandwidth ("% of copy").

Run on a GPU: ``python -m dist_cautious.bench.gpu_step`` (``--params 1e9`` by default; ``--json
PATH`` also writes the table). ``--device cpu --params 2e5`` runs the same code on the CPU as a
smoke test of the script itself (the CUDA-only baselines are then skipped).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Optional

import torch

EXTRA_CAUTIOUS_WORDS = 2  # the read-only mask-count pass over g and m


@dataclass
class Row:
    name: str
    family: str
    step_ms: Optional[float]
    effective_gbs: Optional[float]
    kernel_gbs: Optional[float]
    note: str = ""


def llama_like_shapes(target: float, width: int = 2048, intermediate: int = 5504) -> list[tuple[int, ...]]:
    """LLaMA-style layers (q, k, v, o, gate, up, down matrices and two norm vectors) until the
    count reaches ``target`` params; small targets shrink the width so there is still a list."""
    while width > 64 and 4 * width * width + 3 * width * intermediate > max(target / 4, 1):
        width //= 2
        intermediate //= 2
    shapes: list[tuple[int, ...]] = []
    total = 0
    while total < target:
        layer = [(width, width)] * 4 + [(intermediate, width), (intermediate, width), (width, intermediate), (width,), (width,)]
        shapes += layer
        total += sum(math.prod(s) for s in layer)
    return shapes


def make_params(shapes, device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(dtype))
        param.grad = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(1e-3).to(dtype)
        params.append(param)
    return params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call of ``step`` (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(numel: int, device: torch.device, warmup: int, repeats: int) -> float:
    """GB/s of a device-to-device copy of ``numel`` fp32 values (bytes read + bytes written)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = time_steps(lambda: dst.copy_(src), device, warmup, repeats)
    del src, dst
    return 2 * numel * 4 / seconds / 1e9


@dataclass
class Case:
    name: str
    family: str
    cautious: bool
    build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    kernels: Optional[str] = None  # DIST_CAUTIOUS_KERNELS for our optimizers


def cases(device: torch.device) -> list[Case]:
    from dist_cautious.optim import CAME, CautiousAdamW, CautiousLion

    out = [
        Case("torch AdamW(fused=True)", "adamw", False, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, fused=True)),
        Case("CautiousAdamW(cautious=False)", "adamw", False, lambda p: CautiousAdamW(p, cautious=False), "auto"),
        Case("CautiousAdamW", "adamw", True, lambda p: CautiousAdamW(p), "auto"),
        Case("CautiousLion(cautious=False)", "lion", False, lambda p: CautiousLion(p, cautious=False), "auto"),
        Case("CautiousLion", "lion", True, lambda p: CautiousLion(p), "auto"),
        Case("CAME(cautious=False)", "came", False, lambda p: CAME(p, lr=2e-4), "auto"),
        Case("CAME(cautious=True)", "came", True, lambda p: CAME(p, lr=2e-4, cautious=True), "auto"),
        Case("CAME, torch reference path", "came", False, lambda p: CAME(p, lr=2e-4), "reference"),
        Case("came-pytorch CAME", "came", False, _came_pytorch),
    ]
    if device.type == "cuda":
        out.insert(1, Case("DeepSpeed FusedAdam", "adamw", False, _deepspeed_fused_adam))
        out.insert(6, Case("DeepSpeed FusedLion", "lion", False, _deepspeed_fused_lion))
    return out


def _deepspeed_fused_adam(params):
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(params, lr=1e-3, weight_decay=0.01, adam_w_mode=True)


def _deepspeed_fused_lion(params):
    from deepspeed.ops.lion import FusedLion

    return FusedLion(params, lr=1e-4)


def _came_pytorch(params):
    from came_pytorch import CAME as ReferenceCAME

    return ReferenceCAME(params, lr=2e-4)


def run_case(case: Case, shapes, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int, numel: int) -> Row:
    previous = os.environ.get("DIST_CAUTIOUS_KERNELS")
    if case.kernels is not None:
        os.environ["DIST_CAUTIOUS_KERNELS"] = case.kernels
    params = optimizer = None
    try:
        params = make_params(shapes, device, dtype)
        optimizer = case.build(params)
        seconds = time_steps(optimizer.step, device, warmup, repeats)
    except Exception as error:  # a baseline that does not build here is reported, not fatal
        return Row(case.name, case.family, None, None, None, f"unavailable: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}")
    finally:
        if case.kernels is not None:
            if previous is None:
                os.environ.pop("DIST_CAUTIOUS_KERNELS", None)
            else:
                os.environ["DIST_CAUTIOUS_KERNELS"] = previous
        del params, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    word = 4  # fp32 state; params/grads counted at fp32 too unless --dtype says otherwise
    value_bytes = torch.empty(0, dtype=dtype).element_size()
    ideal = _ideal_bytes(case.family, value_bytes, word) * numel
    actual = ideal + (EXTRA_CAUTIOUS_WORDS * word * numel if case.cautious else 0)
    note = _kernel_note(case, device)
    return Row(case.name, case.family, seconds * 1e3, ideal / seconds / 1e9, actual / seconds / 1e9, note)


def _ideal_bytes(family: str, value_bytes: int, word: int) -> int:
    """Bytes per param of one ideal pass: p and g in the param dtype, state in fp32."""
    state_words = 4 if family == "adamw" else 2  # m (and v) read and written
    return 3 * value_bytes + state_words * word  # p read and written, g read


def _kernel_note(case: Case, device: torch.device) -> str:
    if case.kernels is None:
        return ""
    from dist_cautious.kernels import ops_for

    previous = os.environ.get("DIST_CAUTIOUS_KERNELS")
    os.environ["DIST_CAUTIOUS_KERNELS"] = case.kernels
    try:
        ops = ops_for(device)
        name = getattr(ops, "native", None) or getattr(ops, "__name__", "native").rsplit(".", 1)[-1]
        return f"kernels: {name}"
    finally:
        if previous is None:
            os.environ.pop("DIST_CAUTIOUS_KERNELS", None)
        else:
            os.environ["DIST_CAUTIOUS_KERNELS"] = previous


def format_table(rows: list[Row], copy_gbs: float, device_name: str, numel: int, dtype: torch.dtype) -> str:
    lines = [
        f"device: {device_name}; {numel / 1e6:.1f}M params ({dtype}, fp32 state); copy bandwidth {copy_gbs:.0f} GB/s",
        f"{'optimizer':34} {'step ms':>9} {'eff GB/s':>9} {'kernel GB/s':>11} {'% of copy':>9} {'vs baseline':>12}  note",
    ]
    baselines = {"adamw": "torch AdamW(fused=True)", "lion": "DeepSpeed FusedLion", "came": "came-pytorch CAME"}
    by_name = {row.name: row for row in rows}
    for row in rows:
        if row.step_ms is None:
            lines.append(f"{row.name:34} {'-':>9} {'-':>9} {'-':>11} {'-':>9} {'-':>12}  {row.note}")
            continue
        base = by_name.get(baselines[row.family])
        ratio = f"{base.step_ms / row.step_ms:.2f}x" if base is not None and base.step_ms else "-"
        lines.append(
            f"{row.name:34} {row.step_ms:9.2f} {row.effective_gbs:9.0f} {row.kernel_gbs:11.0f} {100 * row.kernel_gbs / copy_gbs:8.0f}% {ratio:>12}  {row.note}"
        )
    lines.append("vs baseline = baseline step time / this step time (higher is faster); baselines: " + ", ".join(baselines.values()))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e9, help="total params (default 1e9)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="param and grad dtype (state is fp32)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated substrings of optimizer names to run")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available (use --device cpu for a smoke run)")
    dtype = getattr(torch, args.dtype)
    shapes = llama_like_shapes(args.params)
    numel = sum(math.prod(s) for s in shapes)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    copy_gbs = copy_bandwidth(numel, device, args.warmup, args.repeats)
    rows = []
    selected = [c for c in cases(device) if not args.only or any(s.strip() and s.strip() in c.name for s in args.only.split(","))]
    for case in selected:
        row = run_case(case, shapes, device, dtype, args.warmup, args.repeats, numel)
        rows.append(row)
        print(f"  {row.name}: {'%.2f ms' % row.step_ms if row.step_ms is not None else row.note}", flush=True)
    table = format_table(rows, copy_gbs, device_name, numel, dtype)
    print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(device=device_name, params=numel, dtype=args.dtype, copy_gbs=copy_gbs, rows=[asdict(r) for r in rows]), handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

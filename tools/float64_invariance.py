"""Print the float64 sharding-invariance table: per optimizer and backend, the worst relative
difference between the sharded run and the single-process run after 50 float64 steps.

    python tools/float64_invariance.py

Runs the cases of ``tests/dist/test_fsdp.py`` (FSDP2 at 3 ranks, HSDP 2x2 at 4 ranks, each
optimizer with the mask on and off) on CPU ranks over gloo; the test asserts rtol 1e-10, this
prints how far below that the runs are. DeepSpeed is not in the table: under ZeRO-1/2/3,
DeepSpeed 0.19.8 keeps fp32 flat partitions for a float64 model, so the optimizer never sees
float64 there (docs/ALGORITHMS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dist.test_fsdp import FLOAT64_RTOL, launched, reference_for, worst_relative_difference  # noqa: E402


def main() -> None:
    rows = []
    for world_size, backend in ((3, "FSDP2, 3 ranks"), (4, "HSDP 2x2")):
        for case, result in launched(world_size):
            if case.get("dtype") != "float64":
                continue
            worst = worst_relative_difference(result["weights"], reference_for(case))
            name = {"adamw": "CautiousAdamW", "came": "CAME", "lion": "CautiousLion"}[case["optimizer"]]
            rows.append((name, case["cautious"], backend, case["steps"], worst))
    print(f"| optimizer | cautious | backend | steps | worst relative difference (test: rtol {FLOAT64_RTOL:g}) |")
    print("|---|---|---|---:|---:|")
    for name, cautious, backend, steps, worst in rows:
        print(f"| {name} | {cautious} | {backend} | {steps} | {worst:.2e} |")


if __name__ == "__main__":
    main()

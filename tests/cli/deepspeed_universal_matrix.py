"""Measure (not a test): each optimizer resumed through DeepSpeed's universal checkpoint at
another world size, by `train`'s own checkpoint path. Saved at 4 ranks after 2 of 4 steps,
resumed at 2; prints the fraction of weight elements beyond fp32 tolerance against the 4-rank
run (the CI test, test_checkpoint_resume.py, covers CautiousAdamW on ZeRO-2 at 2 and 3 ranks).

    python tests/cli/deepspeed_universal_matrix.py      # from the repository root; minutes on 2 cores
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_jobs import deepspeed_weights, init_rank, run_jobs  # noqa: E402
from test_checkpoint_resume import STEP, _fraction_off, _job  # noqa: E402

from dist_cautious.local_ranks import run_ranks  # noqa: E402

CASES = (("came", 2), ("cautious-lion", 2), ("c-came", 3), ("cautious-adamw", 3))


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        settings = lambda optimizer, stage: dict(backend="deepspeed", zero_stage=stage, optimizer=optimizer, steps=4)  # noqa: E731
        run_ranks(run_jobs, 4, [_job(root / f"{o}-z{s}-ws4", **settings(o, s)) for o, s in CASES], timeout=900, init=init_rank)
        print("| optimizer | ZeRO stage | 4 -> 2 ranks: resumed from | weights beyond rtol 1e-4 / atol 1e-6 |")
        print("|---|---|---|---|")
        for optimizer, stage in CASES:
            job = {**_job(root / f"{optimizer}-z{stage}-ws2", **settings(optimizer, stage)), "resume_from": str(root / f"{optimizer}-z{stage}-ws4" / STEP(2))}
            try:
                outcome = run_ranks(run_jobs, 2, [job], timeout=900, init=init_rank)[0][0]
            except Exception as error:  # a failed conversion or load is a result here
                print(f"| {optimizer} | {stage} | failed: {str(error).splitlines()[-1][:200]} | |")
                continue
            off = _fraction_off(deepspeed_weights(root / f"{optimizer}-z{stage}-ws4" / STEP(4)), deepspeed_weights(root / f"{optimizer}-z{stage}-ws2" / STEP(4)))
            print(f"| {optimizer} | {stage} | step {outcome['resumed_from']} | {off:.2%} |")


if __name__ == "__main__":
    main()

"""The faults tools/mutation_check.py plants, and the tests that must catch each.

A fault is a list of source edits. Each edit names a file, optionally the function (or method)
it must stay within, an exact snippet and its replacement. ``plant`` checks that every snippet
occurs exactly once in its scope (``count`` times for a replace-all edit) and raises
``MutationTargetNotFound`` otherwise: code moves while these faults stay the same, and a fault
whose target vanished must fail loudly, not plant nothing and report a catch or a miss of an
unchanged tree.

Kernel modes (``DIST_CAUTIOUS_KERNELS``): a fault in the torch reference math
(``kernels/reference.py``) only acts where that path runs, so its tests run with ``reference``.
A fault in code every path shares (the optimizers' phases, the reducer, the shard adapters,
``mask_scales``) or in the native kernels' Python wrapper (``kernels/cpu_ops.py``) runs with
``native``, what CI runs: the native kernels must then build and pass their load-time
self-check, else the run fails (and is reported as such, not as a catch of the fault).
The DeepSpeed ranks use the reference path unless told otherwise (tests/dist/deepspeed_harness.py),
so the ZeRO faults run with ``reference`` throughout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


class MutationTargetNotFound(RuntimeError):
    """A snippet a fault edits is missing from (or not unique in) the copied tree."""


@dataclass(frozen=True)
class Edit:
    path: str  # relative to the tree root
    old: str
    new: str
    #: a definition line prefix (``"def adamw_apply("``, ``"    def lion_apply("``): the edit must
    #: fall between it and the next definition at the same indentation
    within: str | None = None
    #: replace every occurrence, of which there must be exactly this many (``None``: exactly one)
    count: int | None = None


@dataclass(frozen=True)
class TestRun:
    """One pytest run: node ids, the kernel mode, and the plugin's case filters."""

    tests: tuple[str, ...]
    mode: str  # DIST_CAUTIOUS_KERNELS
    env: tuple[tuple[str, str], ...] = ()
    label: str = ""

    def key(self) -> tuple:
        return (self.tests, self.mode, self.env)


@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    edits: tuple[Edit, ...]
    run: TestRun
    where: str = field(default="")

    def paths(self) -> list[str]:
        return sorted({edit.path for edit in self.edits})

    def location(self) -> str:
        return self.where or ", ".join(path.removeprefix("dist_cautious/") for path in self.paths())


def _scope(text: str, within: str | None, path: str) -> tuple[int, int]:
    """The [start, end) character range of definition ``within`` in ``text`` (whole text if
    None): from its ``def`` line to the next line at its indentation or less that is not the
    closing parenthesis of a multi-line signature."""
    if within is None:
        return 0, len(text)
    starts = [m.start() for m in re.finditer("^" + re.escape(within), text, flags=re.M)]
    if len(starts) != 1:
        raise MutationTargetNotFound(f"mutation target not found: {len(starts)} definitions {within!r} in {path}")
    indent = len(within) - len(within.lstrip())
    body_start = text.index("\n", starts[0]) + 1
    following = re.compile(r"^ {0,%d}[^\s)]" % indent, flags=re.M).search(text, body_start)
    return starts[0], following.start() if following else len(text)


def _apply(texts: dict[Path, str], root: Path, edit: Edit, fault: str) -> None:
    """Apply one edit to the texts read so far (``texts``, by path); raise if its snippet is not
    found exactly as often as it must be."""
    path = root / edit.path
    if path not in texts:
        if not path.is_file():
            raise MutationTargetNotFound(f"mutation target not found: {edit.path} does not exist")
        texts[path] = path.read_text()
    text = texts[path]
    lo, hi = _scope(text, edit.within, edit.path)
    region = text[lo:hi]
    found = region.count(edit.old)
    expected = 1 if edit.count is None else edit.count
    if found != expected:
        where = f" in {edit.within.strip()!r}" if edit.within else ""
        raise MutationTargetNotFound(f"mutation target not found: {fault}: {edit.old.strip()!r} occurs {found} times{where} in {edit.path}, expected {expected}")
    texts[path] = text[:lo] + region.replace(edit.old, edit.new) + text[hi:]


def plant(root: Path, fault: Fault) -> list[Path]:
    """Apply ``fault``'s edits to the tree at ``root``; return the files changed."""
    texts: dict[Path, str] = {}
    for edit in fault.edits:
        _apply(texts, root, edit, fault.name)
    for path, text in texts.items():
        path.write_text(text)
    for edit in fault.edits:  # read back: the replacement must be in the file now
        if edit.new and edit.new not in (root / edit.path).read_text():
            raise MutationTargetNotFound(f"{fault.name}: the planted text is not in {edit.path} after writing")
    return list(texts)


# --- the test runs ------------------------------------------------------------------------------

REFERENCES = "tests/unit/test_against_references.py"
LOW_PRECISION = "tests/unit/test_optimizer_api.py::test_low_precision_params_step_in_fp32"
FSDP_WS3 = "tests/dist/test_fsdp.py::test_fsdp_and_hsdp_match_single_process[3]"
FSDP_WS2 = "tests/dist/test_fsdp.py::test_fsdp_and_hsdp_match_single_process[2]"
HOLES = "tests/unit/test_mutation_holes.py"
DS_INVARIANCE = "tests/dist/test_deepspeed.py::test_sharded_weights_equal_single_process"


def _ds(world_size: int, *ids: str) -> TestRun:
    nodes = tuple(f"{DS_INVARIANCE}[ws{world_size}-{i}]" for i in ids)
    spec = f"{world_size}:" + ",".join(ids)
    return TestRun(nodes, "reference", (("MUTATION_DS_CASES", spec),), label=f"test_deepspeed ws{world_size}: " + ", ".join(ids))


UNIT_REFERENCE = TestRun((REFERENCES, LOW_PRECISION), "reference", label="test_against_references, test_low_precision_params_step_in_fp32")
UNIT_NATIVE = TestRun((REFERENCES, LOW_PRECISION), "native", label="test_against_references, test_low_precision_params_step_in_fp32")
FSDP3 = TestRun((FSDP_WS3,), "native", label="test_fsdp ws3, every case of that launch")
HSDP2 = TestRun((FSDP_WS2,), "native", (("MUTATION_FSDP_MESH", "hsdp"),), label="test_fsdp ws2, HSDP cases")
ZERO12 = _ds(3, "came_zero1-cautious=True", "came_zero2-cautious=True", "cautious_adamw_zero2-cautious=True", "cautious_lion_zero1-cautious=True")
ZERO3 = _ds(3, "came_zero3_offload-cautious=True", "cautious_adamw_zero3_offload-cautious=True", "cautious_lion_zero3_offload-cautious=True")

BASE, CAME, REF, ZERO = "dist_cautious/optim/base.py", "dist_cautious/optim/came.py", "dist_cautious/kernels/reference.py", "dist_cautious/shard/zero.py"

FAULTS: tuple[Fault, ...] = (
    # --- whole-tensor statistics taken per shard ----------------------------------------------
    Fault(
        "mask-mean-local",
        "C-AdamW / C-Lion mask counts not reduced: the mask mean of each shard's own entries",
        (Edit(BASE, "reduce_per_tensor(fragments, batch_counts, reducer)", "pass  # MUTATION", within="def global_mask_scales("),),
        FSDP3,
    ),
    Fault(
        "came-mask-mean-local",
        "C-CAME mask counts not reduced (phase 3)",
        (Edit(CAME, "batch.reduce_per_tensor(counts, reducer)", "pass  # MUTATION"),),
        FSDP3,
    ),
    Fault(
        "came-sq-sums-unreduced",
        "CAME's row/column sums of g^2 + eps1 not reduced (reduction 1 skipped)",
        (Edit(CAME, "plan.reduce_sums(0, reducer)", "pass  # MUTATION"),),
        FSDP3,
    ),
    Fault(
        "came-residual-sums-unreduced",
        "CAME's residual row/column sums not reduced (reduction 3's factor part skipped)",
        (Edit(CAME, "plan.reduce_sums(1, reducer)", "pass  # MUTATION"),),
        FSDP3,
    ),
    Fault(
        "came-col-mean-local-rows",
        "CAME's column mean of g^2 over this rank's rows only (2-D tensors): local column sums / local row count",
        (
            Edit(
                CAME,
                "        plan.reduce_sums(0, reducer)\n        reducer.all_reduce()\n",
                "        _mut = [(f, c, c.clone()) for b in plan.batches for s in b.segments for f, c in zip(s.fragments, s.sum_views(0)[1]) if len(f.global_shape) == 2]\n"
                "        plan.reduce_sums(0, reducer)\n        reducer.all_reduce()\n"
                "        for _f, _c, _local in _mut:  # MUTATION\n"
                "            _c.copy_(_local * (_f.global_shape[-2] / max(_f.local_numel // _f.global_shape[-1], 1)))\n",
            ),
        ),
        FSDP3,
    ),
    Fault(
        "came-rms-local",
        "CAME's RMS clip over the local shard: local sum of squares over the local element count",
        (
            Edit(CAME, "batch.reduce_per_tensor(batch_sumsq, reducer)", "pass  # MUTATION"),
            Edit(
                CAME,
                "rms = batch_sumsq.sqrt() / batch.sqrt_sizes",
                "rms = batch_sumsq.sqrt() / torch.tensor([float(max(f.local_numel, 1)) for f in batch.fragments], dtype=batch_sumsq.dtype).sqrt()  # MUTATION",
            ),
        ),
        FSDP3,
    ),
    Fault(
        "reducer-packing-offset",
        "the batched reducer copies every packed partial sum back from offset 0",
        (Edit("dist_cautious/shard/reducer.py", "offset += piece.numel()", "pass  # MUTATION"),),
        FSDP3,
    ),
    Fault(
        "hsdp-replicate-dim",
        "HSDP: partial sums reduced over mesh dim 0 (the replicate dim) instead of the sharding dim",
        (Edit("dist_cautious/shard/dtensor.py", "param.device_mesh.get_group(mesh_dim)", "param.device_mesh.get_group(0)"),),
        HSDP2,
    ),
    # --- DeepSpeed ZeRO piece mapping ----------------------------------------------------------
    Fault(
        "zero12-flat-offset+1",
        "ZeRO-1/2: each piece's offset in the flat partition one element late (_hp_mapping read)",
        (Edit(ZERO, "lp.shape, hp.start, lp_address.start, hp.numel, group)", "lp.shape, hp.start + 1, lp_address.start, hp.numel, group)", within="def zero12_layout("),),
        ZERO12,
    ),
    Fault(
        "zero-grad-view+1",
        "ZeRO: the gradient view of a piece one element late (after the layout checks)",
        (Edit(ZERO, "grad=flat_grad.narrow(0, lo, n),", "grad=flat_grad.narrow(0, min(lo + 1, flat_grad.numel() - n), n),", within="def fragment_of("),),
        ZERO12,
    ),
    Fault(
        "zero-stale-grad",
        "ZeRO step plan: a new flat gradient not rebound, so pieces step with the gradient of the step the plan was built on",
        (Edit(ZERO, "        if grad is self.grad:\n            return True\n", "        if True:  # MUTATION\n            return True\n", within="    def rebind_grad("),),
        ZERO12,
    ),
    Fault(
        "zero-rebound-grad+1",
        "ZeRO step plan: a rebound gradient view one element late (the split after the first step)",
        (Edit(ZERO, "views = grad.view(-1).split(self._split_sizes)", "views = torch.cat([grad.view(-1)[1:], grad.view(-1)[:1]]).split(self._split_sizes)  # MUTATION", within="    def rebind_grad("),),
        ZERO12,
    ),
    Fault(
        "zero3-range+1",
        "ZeRO-3: ranks > 0 take their range of each param one element late",
        (Edit(ZERO, "start = min(rank * per_rank, param.ds_numel)", "start = min(rank * per_rank + (1 if rank else 0), param.ds_numel)", within="def zero3_local_range("),),
        ZERO3,
    ),
    # --- precision ------------------------------------------------------------------------------
    Fault(
        "bf16-update-halved-reference",
        "the AdamW update halved for bf16 params only (torch reference path)",
        (Edit(REF, "p.addcdiv_(numerator, denom, value=-step_size)", "p.addcdiv_(numerator, denom, value=-step_size * (0.5 if param.dtype == torch.bfloat16 else 1.0))", within="def adamw_apply("),),
        UNIT_REFERENCE,
    ),
    Fault(
        "bf16-update-halved-native",
        "the AdamW update halved for bf16 params only (native CPU kernels' step sizes)",
        (
            Edit(
                "dist_cautious/kernels/cpu_ops.py",
                "neg_step_sizes = [-(lr / (1 - beta1**step)) for step in steps]",
                "neg_step_sizes = [-(lr / (1 - beta1**step)) * (0.5 if params[0].dtype == torch.bfloat16 else 1.0) for step in steps]",
                within="    def adamw_apply(",
            ),
        ),
        UNIT_NATIVE,
    ),
    Fault(
        "native-avx2-mask->=",
        "the native AVX2 kernels' mask test m * g >= 0 (their 'greater than zero' compare made 'not less')",
        (
            Edit(
                "csrc/cpu/simd.h",
                "static inline M gt0(R a) { return _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GT_OQ); }",
                "static inline M gt0(R a) { return _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GE_OQ); }",
            ),
        ),
        TestRun((REFERENCES, LOW_PRECISION, "tests/kernels/test_cpu_kernels.py"), "native", label="test_against_references, test_low_precision_params_step_in_fp32, test_cpu_kernels"),
    ),
    Fault(
        "fp16-no-op-step",
        "fp16 params are never stepped (dropped from the step's work)",
        (Edit(BASE, "        if work:\n", "        work = [(g, f) for g, f in work if f.param.dtype != torch.float16]  # MUTATION\n        if work:\n", within="    def step("),),
        UNIT_NATIVE,
    ),
    # --- the math of one step -------------------------------------------------------------------
    Fault(
        "bias-correction-step+1",
        "AdamW's first-moment bias correction one step ahead (beta1 ** (t + 1))",
        (Edit(REF, "step_size = lr / (1 - beta1**step)", "step_size = lr / (1 - beta1 ** (step + 1))", within="def adamw_apply("),),
        UNIT_REFERENCE,
    ),
    Fault(
        "mask-test->=",
        "the cautious mask 1[u * g >= 0] instead of > 0 (counts and applies, all three optimizers)",
        (Edit(REF, " > 0)", " >= 0)", count=4),),
        UNIT_REFERENCE,
    ),
    Fault(
        "eps-inside-bias-correction",
        "AdamW's eps added before dividing by sqrt(1 - beta2^t) instead of after",
        (
            Edit(
                REF,
                " / math.sqrt(1 - beta2**step)).add_(eps)",
                ".add(eps) / math.sqrt(1 - beta2**step))  # MUTATION",
                within="def adamw_apply(",
            ),
        ),
        UNIT_REFERENCE,
    ),
    Fault(
        "mask-floor-1e-2",
        "the floor of the mask mean 1e-2 instead of 1e-3 (mask_scales, every kernel path)",
        (Edit(REF, ".clamp(min=1e-3)", ".clamp(min=1e-2)", within="def mask_scales("),),
        UNIT_NATIVE,
    ),
    Fault(
        "weight-decay-masked",
        "AdamW's weight decay applied only where the cautious mask is on",
        (
            Edit(
                REF,
                "_decay_(p, numerator, lr * weight_decay, cautious_weight_decay)",
                "p.sub_(p * (lr * weight_decay) * (exp_avg * g > 0))  # MUTATION",
                within="def adamw_apply(",
            ),
        ),
        UNIT_REFERENCE,
    ),
    Fault(
        "lion-momentum-masked",
        "Lion's momentum updated with the masked gradient (the state must never be masked)",
        (Edit(REF, "exp_avg.lerp_(g, 1 - beta2)", "exp_avg.lerp_(g * (update != 0), 1 - beta2)  # MUTATION", within="def lion_apply("),),
        UNIT_REFERENCE,
    ),
    Fault(
        "came-residual-old-momentum",
        "CAME's residual (uh - m)^2 taken with the momentum before this step's update",
        (
            Edit(REF, "exp_avg.mul_(beta1).add_(update, alpha=1 - beta1)", "_old = exp_avg.clone()\n        exp_avg.mul_(beta1).add_(update, alpha=1 - beta1)", within="def came_momentum("),
            Edit(REF, "(update - exp_avg)", "(update - _old)", within="def came_momentum("),
        ),
        UNIT_REFERENCE,
    ),
)

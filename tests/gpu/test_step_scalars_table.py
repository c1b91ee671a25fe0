"""The apply ops' step-scalars table (issue 12).

With ``capturable=True`` lr and the step counts live on the device, so that a CUDA graph can
capture a whole step. The four apply ops then read each tensor's scalars (alpha, inv_bc2_sqrt,
decay, neg_lr) from an fp32 device table ``[slots, 4]``, row ``out_index``, instead of the host
lists (which must be empty). Checked here through the CPU-thread build of the real sources
(``tests/gpu/cuda_on_cpu``):

- each apply op with a table lands on the bits (params and state) of the call with host lists of
  the same values: distinct values per slot, an empty tensor (no descriptor) before others, CAME's
  slots out of order with rows no tensor names, and Lion's and CAME's unused columns NaN;
- a table of the wrong shape, dtype or layout, or given with host lists, is refused before
  anything runs, by the binding and by the ops' fake implementations alike;
- the binding's torch emulation (``binding_emulator.py``, for ``cuda_ops``' wiring tests) is held
  to the same two rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dist_cautious.kernels import cuda_library
from tests.gpu.binding_emulator import BindingEmulator

pytestmark = pytest.mark.cuda_emulated

BETA1, BETA2 = 0.9, 0.999
#: AdamW and Lion: one slot per tensor. An empty tensor (no descriptor) comes before others, so a
#: kernel must take its row by out_index, not by descriptor; sizes cross a 320-element chunk.
ELEM_SIZES = [6, 0, 333, 65, 901]
#: CAME: factored fragments (shape, start, end) and 1-D sizes, each with its slot (out_index) of
#: CAME_SLOTS, out of order; slots 3 and 5 belong to no tensor of the call.
FACTORED = [((6, 3, 3), 1, 54), ((5, 6), 12, 12), ((5, 9, 13), 21, 300), ((2, 3, 260), 99, 900)]
FACTORED_SLOTS = [6, 1, 8, 4]
VECTOR = [2, 321, 0, 5]
VECTOR_SLOTS = [2, 7, 9, 0]
CAME_SLOTS = 10


@pytest.fixture(scope="module")
def ext():
    from tests.gpu.cuda_on_cpu.build import load

    return load()


@pytest.fixture(params=["cuda_on_cpu", "binding_emulator"])
def backend(request, ext) -> tuple[Any, type[Exception] | tuple[type[Exception], ...]]:
    """The binding's functions: the CPU-thread build of the real sources, or the torch emulation
    of them; and what each raises for a refused call."""
    if request.param == "cuda_on_cpu":
        return ext, RuntimeError
    return BindingEmulator(), (ValueError, TypeError)


def _randn(n: int, gen: torch.Generator, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(n, generator=gen) * scale).to(dtype)


def _rand(n: int, gen: torch.Generator, low: float, high: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def _slot_scalars(slots: int) -> dict[str, list[float]]:
    """Distinct lr, weight decay and step per slot, as host lists: formed in double as
    ``cuda_ops`` forms them (the binding rounds each to fp32)."""
    lrs = [1e-3 * (1 + 0.37 * s) for s in range(slots)]
    wds = [0.013 * (s + 1) for s in range(slots)]
    steps = [1 + 3 * s for s in range(slots)]
    return {
        "alphas": [-(lr / (1 - BETA1**t)) for lr, t in zip(lrs, steps)],
        "bc2_sqrts": [math.sqrt(1 - BETA2**t) for t in steps],
        "decays": [1 - lr * wd for lr, wd in zip(lrs, wds)],
        "neg_lrs": [-lr for lr in lrs],
    }


def _table(host: dict[str, list[float]], unused_nan: bool) -> torch.Tensor:
    """The same values in the table's form: each rounded to fp32, inv_bc2_sqrt the fp32 quotient
    1 / fp32(bc2_sqrt); alpha and inv_bc2_sqrt NaN where the op must ignore them."""
    f32 = {key: torch.tensor(values, dtype=torch.float32) for key, values in host.items()}
    inv_bc2_sqrt = torch.div(torch.ones_like(f32["bc2_sqrts"]), f32["bc2_sqrts"])
    table = torch.stack([f32["alphas"], inv_bc2_sqrt, f32["decays"], f32["neg_lrs"]], dim=1).contiguous()
    if unused_nan:
        table[:, :2] = math.nan
    return table


@dataclass
class Apply:
    """One apply op's call on a fixed random case, run with the host lists or with the table of
    the same values (the lists then empty)."""

    op: str
    fn: Callable[..., None]
    args: list[Any]  # the binding's arguments before step_scalars, host lists included
    list_at: list[int]  # positions of the host per-tensor lists in args
    table: torch.Tensor
    written: list[torch.Tensor]  # what the call may write

    def table_args(self, table: Optional[torch.Tensor], keep_lists: bool = False) -> list[Any]:
        args = list(self.args)
        for position in [] if keep_lists else self.list_at:
            args[position] = []
        return args + [table]

    def run(self, table: Optional[torch.Tensor] = None, keep_lists: bool = False) -> None:
        """With ``table``: its rows, the host lists emptied (unless ``keep_lists``); else the lists."""
        self.fn(*(self.args + [None] if table is None else self.table_args(table, keep_lists)))

    def snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.written]


def _scales(slots: int, cautious: bool, gen: torch.Generator) -> Optional[torch.Tensor]:
    return _rand(slots, gen, 0.5, 2.0) if cautious else None


def _elementwise(param_dtype: torch.dtype, seed: int) -> tuple[torch.Generator, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    params = [_randn(n, gen, param_dtype) for n in ELEM_SIZES]
    grads = [_randn(n, gen, scale=0.1) for n in ELEM_SIZES]
    ms = [_randn(n, gen, scale=0.05) for n in ELEM_SIZES]
    return gen, params, grads, ms


def _adamw(ext, param_dtype: torch.dtype, cautious: bool) -> Apply:
    gen, params, grads, ms = _elementwise(param_dtype, 1)
    vs = [_rand(n, gen, 0.0, 1e-2) for n in ELEM_SIZES]
    host = _slot_scalars(len(ELEM_SIZES))
    args = [params, grads, ms, vs, host["alphas"], host["bc2_sqrts"], host["decays"], 1 - BETA1, BETA2, 1 - BETA2, 1e-8,
            _scales(len(ELEM_SIZES), cautious, gen)]  # fmt: skip
    return Apply("adamw_apply", ext.adamw_apply, args, [4, 5, 6], _table(host, unused_nan=False), params + ms + vs)


def _lion(ext, param_dtype: torch.dtype, cautious: bool) -> Apply:
    gen, params, grads, ms = _elementwise(param_dtype, 2)
    host = _slot_scalars(len(ELEM_SIZES))
    args = [params, grads, ms, host["decays"], 1 - BETA1, 0.01, host["neg_lrs"], _scales(len(ELEM_SIZES), cautious, gen)]
    return Apply("lion_apply", ext.lion_apply, args, [3, 6], _table(host, unused_nan=True), params + ms)


def _came_vector(ext, param_dtype: torch.dtype, cautious: bool) -> Apply:
    gen = torch.Generator().manual_seed(3)
    params = [_randn(n, gen, param_dtype) for n in VECTOR]
    grads = [_randn(n, gen, scale=0.1) for n in VECTOR]
    ms = [_randn(n, gen, scale=0.05) for n in VECTOR]
    has = [i % 2 == 0 for i in range(len(VECTOR))]  # second moments and identities
    preconds = [_rand(n, gen, 1e-4, 1e-2) if used else torch.empty(0) for n, used in zip(VECTOR, has)]
    host = _slot_scalars(CAME_SLOTS)
    decays, neg_lrs = [host["decays"][s] for s in VECTOR_SLOTS], [host["neg_lrs"][s] for s in VECTOR_SLOTS]
    args = [params, grads, ms, preconds, has, VECTOR_SLOTS, decays, neg_lrs, _scales(CAME_SLOTS, cautious, gen), CAME_SLOTS]
    return Apply("came_vector_apply", ext.came_vector_apply, args, [6, 7], _table(host, unused_nan=True), params + ms)


def _came_factored(ext, param_dtype: torch.dtype, cautious: bool) -> Apply:
    gen = torch.Generator().manual_seed(4)
    sizes = [end - start for _, start, end in FACTORED]
    params = [_randn(n, gen, param_dtype) for n in sizes]
    grads = [_randn(n, gen, scale=0.1) for n in sizes]
    ms = [_randn(n, gen, scale=0.05) for n in sizes]
    batches = [math.prod(shape[:-2]) for shape, _, _ in FACTORED]
    rows, cols = [shape[-2] for shape, _, _ in FACTORED], [shape[-1] for shape, _, _ in FACTORED]
    row_factor = [_rand(b * r, gen, 0.5, 1.5) for b, r in zip(batches, rows)]
    col_factor = [_rand(b * c, gen, 0.5, 1.5) for b, c in zip(batches, cols)]
    host = _slot_scalars(CAME_SLOTS)
    decays, neg_lrs = [host["decays"][s] for s in FACTORED_SLOTS], [host["neg_lrs"][s] for s in FACTORED_SLOTS]
    args = [params, grads, ms, [start for _, start, _ in FACTORED], batches, rows, cols, row_factor, col_factor, FACTORED_SLOTS,
            decays, neg_lrs, _scales(CAME_SLOTS, cautious, gen), CAME_SLOTS]  # fmt: skip
    return Apply("came_factored_apply", ext.came_factored_apply, args, [10, 11], _table(host, unused_nan=True), params + ms)


CASES = {"adamw_apply": _adamw, "lion_apply": _lion, "came_vector_apply": _came_vector, "came_factored_apply": _came_factored}


def _assert_equal(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a, e), f"{what}: tensor {index} differs ({int((a != e).sum())} of {a.numel()} entries)"


# ---- the table: the bits of the host lists -----------------------------------------------------------
@pytest.mark.parametrize("cautious", [False, True])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", list(CASES))
def test_table_gives_the_bits_of_the_host_lists(backend, op, param_dtype, cautious):
    ext, _ = backend
    with_lists, with_table = CASES[op](ext, param_dtype, cautious), CASES[op](ext, param_dtype, cautious)
    before = with_lists.snapshot()
    with_lists.run()
    with_table.run(with_table.table)
    _assert_equal(with_table.written, with_lists.written, f"{op} with the table vs the host lists")
    assert any(not torch.equal(a, b) for a, b in zip(with_lists.written, before)), f"{op}: the call changed nothing"


@pytest.mark.parametrize("op", list(CASES))
def test_without_a_table_the_call_is_as_before(backend, op):
    """The binding's step_scalars defaults to None: the call without it is the host-list call."""
    ext, _ = backend
    old_form, with_none, by_name = (CASES[op](ext, torch.float32, True) for _ in range(3))
    old_form.fn(*old_form.args)
    with_none.run()
    by_name.fn(*by_name.args, step_scalars=None)
    _assert_equal(old_form.written, with_none.written, f"{op} without step_scalars vs None")
    _assert_equal(by_name.written, with_none.written, f"{op} step_scalars=None by name vs None")


# ---- the table's checks ------------------------------------------------------------------------------
#: a table the ops refuse -> the messages of the binding and of the fake implementations
BAD_TABLES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "a row short": (lambda t: t[:-1].clone(), "must have shape"),
    "a row over": (lambda t: torch.cat([t, t[:1]]), "must have shape"),
    "three columns": (lambda t: t[:, :3].contiguous(), "must have shape"),
    "flat": (lambda t: t.reshape(-1).clone(), "must have shape"),
    "float64": (lambda t: t.double(), "float32|one of"),
    "bfloat16": (lambda t: t.bfloat16(), "float32|one of"),
    "transposed": (lambda t: t.t().contiguous().t(), "contiguous"),
}


@pytest.mark.parametrize("op", list(CASES))
def test_a_bad_table_or_one_with_host_lists_is_refused_before_anything_runs(backend, op):
    ext, refusal = backend
    call = CASES[op](ext, torch.float32, True)
    before = call.snapshot()
    for what, (bad, message) in BAD_TABLES.items():
        with pytest.raises(refusal, match=message):
            call.run(bad(call.table))
        _assert_equal(call.written, before, f"{op} after refusing a table ({what})")
    with pytest.raises(refusal, match="host lists.* must be empty"):
        call.run(call.table, keep_lists=True)
    _assert_equal(call.written, before, f"{op} after refusing a table with host lists")


def _faked(mode: FakeTensorMode, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value)
    if isinstance(value, list):
        return [_faked(mode, item) for item in value]
    return value


@pytest.mark.parametrize("op", list(CASES))
def test_fake_implementations_check_the_table_as_the_binding(ext, op):
    """Under FakeTensorMode the ops run their fake implementations: a good table (and none) passes,
    every table the binding refuses is refused, and a table on another device too."""
    call = CASES[op](ext, torch.float32, True)
    fn = getattr(torch.ops.dist_cautious, op)
    with FakeTensorMode() as mode:
        faked = Apply(op, fn, _faked(mode, call.args), call.list_at, _faked(mode, call.table), [])
        faked.run(faked.table)
        faked.run()
        fn(*faked.args)  # the schema's default
        for what, (bad, message) in BAD_TABLES.items():
            with pytest.raises(RuntimeError, match=message):
                faked.run(bad(faked.table))
        with pytest.raises(RuntimeError, match="host lists must be empty"):
            faked.run(faked.table, keep_lists=True)
        with pytest.raises(RuntimeError, match="must be on"):
            faked.run(torch.zeros(faked.table.shape, device="cuda"))


@pytest.mark.parametrize("with_table", [True, False], ids=["table", "host lists"])
@pytest.mark.parametrize("op", list(CASES))
def test_opcheck_with_and_without_a_table(ext, op, with_table, monkeypatch):
    """The schema (what the op writes, nothing else changes) and the fake implementation against
    the real binding (the CPU-thread build, bound for CPU tensors)."""
    monkeypatch.setitem(cuda_library._backends, "cpu", ext)
    call = CASES[op](ext, torch.float32, True)
    args = call.table_args(call.table) if with_table else call.args + [None]
    torch.library.opcheck(getattr(torch.ops.dist_cautious, op).default, tuple(args), test_utils=("test_schema", "test_faketensor"))

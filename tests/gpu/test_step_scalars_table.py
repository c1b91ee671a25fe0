"""The apply ops' step-scalars table and the descriptor tables kept on the device (issue 12).

With ``capturable=True`` lr and the step counts live on the device, so that a CUDA graph can
capture a whole step. The four apply ops then read each tensor's scalars (alpha, inv_bc2_sqrt,
decay, neg_lr) from an fp32 device table ``[slots, 4]``, row ``out_index``, instead of the host
lists (which must be empty), and the binding keeps its descriptor tables on the device instead of
uploading them in every call: a captured copy from the host would replay from a pinned buffer
that torch frees after capture (a table first needed while capturing is copied from a host
buffer the binding keeps). Checked here through the CPU-thread build of the real sources
(``tests/gpu/cuda_on_cpu``), whose test hooks simulate the stream and its capture
(``simulate_stream``, ``simulate_capture``) and count the uploads (``descriptor_uploads``):

- each apply op with a table lands on the bits (params and state) of the call with host lists of
  the same values: distinct values per slot, an empty tensor (no descriptor) before others, CAME's
  slots out of order with rows no tensor names, and Lion's and CAME's unused columns NaN;
- a table of the wrong shape, dtype or layout, or given with host lists, is refused before
  anything runs, by the binding and by the ops' fake implementations alike;
- the binding's torch emulation (``binding_emulator.py``, for ``cuda_ops``' wiring tests) is held
  to the same two rules;
- a call finds its descriptor table kept (one upload for two calls; a table of other values
  changes nothing the descriptors hold); while capturing, a call whose tables were seen runs
  without an upload, also when the warm-up ran on another stream (``torch.cuda.graph`` captures
  on a stream of its own); a table first seen while capturing (grads a captured backward
  allocates) is uploaded then and kept for good; an apply call with host scalars (no table)
  raises under capture and changes nothing; the cache evicts the least recently used of at most
  256 tables, never one a capture used.

What needs a GPU: that ``cudaStreamIsCapturing`` sees the capture of ``torch.cuda.graph``, and a
captured step replayed with new table values (``tests/gpu/test_cuda_kernels.py``).
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
from tests.factor_buffers import cloned, random_factor_buffers
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
#: csrc/cuda/binding.cpp, DescriptorTables::kMaxEntries
MAX_TABLES = 256

#: Every tensor the cases make stays alive for the whole module, so no case reuses the memory
#: of an earlier one: a case's descriptor tables are then new to the cache unless it ran before
#: (the cache is keyed by the descriptors' bytes, pointers included).
_KEPT: list[torch.Tensor] = []


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


@pytest.fixture
def hooks(ext):
    """The emulated build's test hooks, back to the default stream and no capture afterwards."""
    yield ext
    ext.simulate_capture(False)
    ext.simulate_stream(0)


def _kept(tensor: torch.Tensor) -> torch.Tensor:
    _KEPT.append(tensor)
    return tensor


def _randn(n: int, gen: torch.Generator, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return _kept((torch.randn(n, generator=gen) * scale).to(dtype))


def _rand(n: int, gen: torch.Generator, low: float, high: float) -> torch.Tensor:
    return _kept(torch.rand(n, generator=gen) * (high - low) + low)


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
    return _kept(table)


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
    preconds = [_rand(n, gen, 1e-4, 1e-2) if used else _kept(torch.empty(0)) for n, used in zip(VECTOR, has)]
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


# ---- descriptor tables kept on the device --------------------------------------------------------------
def _uploads(ext, run: Callable[[], None]) -> int:
    before = ext.descriptor_uploads()
    run()
    return ext.descriptor_uploads() - before


def _stepped(ext, op: str, steps: int) -> list[torch.Tensor]:
    """The op's case after ``steps`` plain calls with host lists (no hooks, no table)."""
    call = CASES[op](ext, torch.float32, True)
    for _ in range(steps):
        call.run()
    return call.written


@pytest.mark.parametrize("op", list(CASES))
def test_the_same_call_uploads_its_descriptors_once(hooks, op):
    ext = hooks
    call = CASES[op](ext, torch.float32, True)
    assert _uploads(ext, lambda: call.run(call.table)) == 1
    assert _uploads(ext, lambda: call.run(call.table)) == 0
    # the next step's values (lr, step) are the table's, not the descriptors': still no upload
    assert _uploads(ext, lambda: call.run(torch.flip(call.table, [0]).contiguous())) == 0
    # without a table the scalars are in the descriptors: other values, other bytes, one upload
    host = CASES[op](ext, torch.float32, True)
    assert _uploads(ext, host.run) == 1 and _uploads(ext, host.run) == 0
    for position in host.list_at:
        host.args[position] = [value * 0.5 for value in host.args[position]]
    assert _uploads(ext, host.run) == 1


@pytest.mark.parametrize("op", list(CASES))
def test_a_capture_after_the_warm_up_uploads_nothing(hooks, op):
    ext = hooks
    expected = _stepped(ext, op, 2)
    call = CASES[op](ext, torch.float32, True)
    call.run(call.table)  # the warm-up
    ext.simulate_capture(True)
    assert _uploads(ext, lambda: call.run(call.table)) == 0
    _assert_equal(call.written, expected, f"{op}: warm-up and captured call vs two calls")


@pytest.mark.parametrize("op", list(CASES))
def test_a_capture_with_an_unseen_table_uploads_it_for_good(hooks, op):
    """Tensors the warm-up did not have (grads a captured backward allocates from the graph's
    pool) have descriptor tables the cache has not seen: while capturing they are uploaded (in
    the CUDA build, from a host buffer kept for the replays) and never evicted."""
    ext = hooks
    expected = _stepped(ext, op, 1)
    call = CASES[op](ext, torch.float32, True)
    ext.simulate_capture(True)
    assert _uploads(ext, lambda: call.run(call.table)) == 1
    _assert_equal(call.written, expected, f"{op}: first seen while capturing vs one call")
    ext.simulate_capture(False)
    _new_tables(ext, 2 * MAX_TABLES)
    ext.simulate_capture(True)
    assert _uploads(ext, lambda: call.run(call.table)) == 0


@pytest.mark.parametrize("op", list(CASES))
def test_host_scalars_under_capture_raise_and_change_nothing(hooks, op):
    """Without a table the scalars are in the descriptors: a captured graph would replay this
    step's lr and bias corrections forever, so a capturing stream refuses the call, before it
    uploads or launches anything."""
    ext = hooks
    call = CASES[op](ext, torch.float32, True)
    before = call.snapshot()
    ext.simulate_capture(True)
    uploads = ext.descriptor_uploads()
    with pytest.raises(RuntimeError, match="with host scalars cannot be captured"):
        call.run()
    assert ext.descriptor_uploads() == uploads
    _assert_equal(call.written, before, f"{op} after a refused capture")


def test_a_capture_on_another_stream_finds_the_warm_up_tables(hooks):
    """torch.cuda.graph captures on a stream of its own, not the warm-up's: while capturing, a
    table kept for another stream serves. Outside capture each stream keeps its own (an entry is
    read only by launches ordered after its upload, on its stream)."""
    ext = hooks
    expected = _stepped(ext, "adamw_apply", 4)
    call = CASES["adamw_apply"](ext, torch.float32, True)
    ext.simulate_stream(1)  # the warm-up's side stream
    assert _uploads(ext, lambda: call.run(call.table)) == 1
    ext.simulate_stream(2)  # the capture stream
    ext.simulate_capture(True)
    assert _uploads(ext, lambda: call.run(call.table)) == 0
    ext.simulate_capture(False)
    assert _uploads(ext, lambda: call.run(call.table)) == 1
    ext.simulate_stream(0)
    assert _uploads(ext, lambda: call.run(call.table)) == 1
    _assert_equal(call.written, expected, "adamw_apply over three streams and a capture")


def _new_tables(ext, count: int) -> None:
    """``count`` tables the cache has not seen: one Lion call on one element, a new decay each."""
    param, grad, m = _kept(torch.ones(1)), _kept(torch.ones(1)), _kept(torch.zeros(1))
    for index in range(count):
        ext.lion_apply([param], [grad], [m], [1.0 - (index + 1) * 2.0**-20], 0.1, 0.01, [-1e-3], None)


def test_the_cache_keeps_what_a_capture_used_and_the_most_recent_tables(hooks):
    ext = hooks
    captured, recent, old = (CASES[op](ext, torch.float32, False) for op in ("adamw_apply", "lion_apply", "came_factored_apply"))
    for call in (captured, recent, old):
        call.run(call.table)
    ext.simulate_capture(True)
    captured.run(captured.table)  # used while capturing: kept for good
    ext.simulate_capture(False)
    _new_tables(ext, MAX_TABLES - 56)
    recent.run(recent.table)  # used again: the least recently used is now `old`
    assert _uploads(ext, lambda: _new_tables(ext, 100)) == 100
    ext.simulate_capture(True)
    assert _uploads(ext, lambda: (captured.run(captured.table), recent.run(recent.table))) == 0
    assert _uploads(ext, lambda: old.run(old.table)) == 1  # evicted: uploaded again, now for good
    ext.simulate_capture(False)
    _new_tables(ext, 2 * MAX_TABLES)
    ext.simulate_capture(True)
    assert _uploads(ext, lambda: captured.run(captured.table)) == 0


def _assert_same_buffers(actual, expected, what: str) -> None:
    """Bit for bit: the outputs start as torch.empty memory, which may hold NaNs."""
    for key, value in vars(actual).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value.view(torch.int32), getattr(expected, key).view(torch.int32)), f"{what}: {key}"


def test_came_factor_update_run_table_under_capture(hooks):
    """The run table is kept per distinct list of runs (never evicted): first needed while
    capturing, it is uploaded then (from a kept host buffer in the CUDA build); once kept, a
    capture runs with no upload."""
    ext = hooks
    before = random_factor_buffers([(11, 3, 29), (2, 5, 3), (40, 2, 2)], 31)  # runs no other test uses
    first, warm_up, captured = cloned(before), cloned(before), cloned(before)
    ext.simulate_capture(True)
    assert _uploads(ext, lambda: ext.came_factor_update(*first.op_args(0.9))) == 1
    ext.simulate_capture(False)
    assert _uploads(ext, lambda: ext.came_factor_update(*warm_up.op_args(0.9))) == 0
    _assert_same_buffers(first, warm_up, "first seen while capturing vs after")
    ext.simulate_capture(True)
    assert _uploads(ext, lambda: ext.came_factor_update(*captured.op_args(0.9))) == 0
    _assert_same_buffers(captured, warm_up, "captured vs warm-up")

"""How a kernel call reaches the compiled kernels: through the dispatcher, or straight in.

The kernels are PyTorch custom ops (``torch.ops.dist_cautious_cpu.*`` defined in C++,
``torch.ops.dist_cautious.*`` for CUDA with Python forwarders), so that whatever works at the
dispatcher sees them: ``FakeTensorMode`` runs their fake implementations, a
``TorchDispatchMode`` counts them, ``torch.compile`` traces them. That visibility costs host time
proportional to the tensors in a call: the dispatcher boxes every entry of an op's tensor and
number lists, and a Python forwarder unboxes them again. Measured here (AVX2 EPYC, one call,
300 tensors): ``adamw_apply`` through the C++-registered CPU op 176 us against 99 us direct; an
op with a Python forwarder that does nothing at all, 250 us (46 us at 30 tensors), against a
step of torch's fused AdamW of a few hundred microseconds on a GPU.

So each call asks ``dispatched()``: when something must see it, the op; otherwise the
extension's function, which is the very same C++ function the op runs. The route changes how a
kernel is reached, never what it computes (tested bit for bit for both kernel families).
"""

from __future__ import annotations

import torch


def dispatched() -> bool:
    """True when a kernel call must go through the dispatcher to be seen: a dispatch mode is
    active (``FakeTensorMode``, a counting ``TorchDispatchMode``, functionalisation) or
    ``torch.compile`` is tracing."""
    # is_compiling first: torch.compile folds it to True, and never reaches the dispatch-stack
    # query, which it cannot trace (a graph break at every kernel call)
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0

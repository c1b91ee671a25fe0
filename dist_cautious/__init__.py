"""dist_cautious: CautiousAdamW, CAME and CautiousLion, exact under every sharding.

Single process, DDP, FSDP2 / HSDP and DeepSpeed ZeRO-1/2/3 (with CPU offload) all hand the
optimizer pieces of tensors; the optimizers reduce the few whole-tensor statistics they need
(mask counts, CAME's row/column means, the RMS clip) in one batched all-reduce per phase, so a
sharded run computes what a single process computes on the global batch.
"""

import torch as _torch

from dist_cautious.versions import check_version as _check_version

_check_version("torch", _torch.__version__)  # fail closed on an untested torch

from dist_cautious.optim import CAME, CautiousAdamW, CautiousLion  # noqa: E402
from dist_cautious.integrations import deepspeed as _deepspeed_integration  # noqa: E402
from dist_cautious.train.optimizers import create_optimizer  # noqa: E402

# DeepSpeed configs may name the optimizers ("type": "CAME"); cheap when DeepSpeed is not imported
_deepspeed_integration.register()

__version__ = "0.1.0"
__all__ = ["CAME", "CautiousAdamW", "CautiousLion", "create_optimizer", "__version__"]

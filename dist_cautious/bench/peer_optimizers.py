"""The peer implementations dist_cautious is compared with, loaded the way this machine allows.

timm's package ``__init__`` imports torchvision (no CPU build here), so its optimizer files
(``timm/optim/adamw.py``, ``lion.py``; torch-only imports) are loaded by path as a stand-alone
package. came-pytorch and lion-pytorch import normally. Used by the unit tests (references)
and by ``dist_cautious.bench.peers`` (how the peers fare under sharding).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def timm_optim(module: str) -> ModuleType:
    """``timm.optim.<module>`` without importing ``timm/__init__.py``."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed (pip install --no-deps timm)")
    optim_dir = Path(list(spec.submodule_search_locations)[0]) / "optim"
    package = "_timm_optim_reference"
    if package not in sys.modules:
        package_spec = importlib.util.spec_from_file_location(package, optim_dir / "__init__.py", submodule_search_locations=[str(optim_dir)])
        sys.modules[package] = importlib.util.module_from_spec(package_spec)  # __init__ deliberately not executed
    return importlib.import_module(f"{package}.{module}")

# The README's two set-up commands: `make train` (the main job) and `make test` (the suite CI runs).
# Both install what they need; constraints.txt pins torch / deepspeed for this CPU machine only.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: install install-test train test cuda-compile-check

install:
	$(PIP) -e .

# timm's package requires torchvision (no CPU build here): its optimizers are loaded by path,
# so it is installed without dependencies.
install-test: install
	$(PIP) -r requirements-test.txt
	$(PYTHON) -m pip install -q --no-deps timm==1.0.31

train: install
	$(PYTHON) -m dist_cautious.cli train

# The CUDA kernels cannot run here, but they must compile for sm_80 and sm_90 (and the binding
# against torch's headers). Without nvcc the check is skipped, unless REQUIRE_NVCC=1 (CI).
cuda-compile-check:
	@if command -v nvcc >/dev/null 2>&1; then bash tools/check_cuda_compile.sh --with-binding; \
	elif [ "$(REQUIRE_NVCC)" = "1" ]; then echo "nvcc not found and REQUIRE_NVCC=1"; exit 1; \
	else echo "nvcc not found: CUDA compile check skipped"; fi

# The suite runs on whatever kernels DIST_CAUTIOUS_KERNELS picks (auto: native where they build;
# CI sets native, so a broken build fails instead of falling back); then the optimizer-level
# unit tests once more on the torch reference path, the fallback every device may end up on.
test: install-test cuda-compile-check
	$(PYTHON) -m pytest tests -q -p no:cacheprovider
	DIST_CAUTIOUS_KERNELS=reference $(PYTHON) -m pytest tests/unit -q -p no:cacheprovider

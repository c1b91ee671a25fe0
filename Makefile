# The README's two set-up commands: `make train` (the main job) and `make test` (the suite CI runs).
# Both install what they need; constraints.txt pins torch / deepspeed for this CPU machine only.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: install install-test train test

install:
	$(PIP) -e .

# timm's package requires torchvision (no CPU build here): its optimizers are loaded by path,
# so it is installed without dependencies.
install-test: install
	$(PIP) -r requirements-test.txt
	$(PYTHON) -m pip install -q --no-deps timm==1.0.31

train: install
	$(PYTHON) examples/train_tiny_gpt.py

test: install-test
	$(PYTHON) -m pytest tests -q -p no:cacheprovider

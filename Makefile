# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv if missing and install
# the project from pyproject.toml (torch/torchvision pinned to the versions this machine has on disk).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DATA := data/demo
# pip on this machine warns once per local index that lacks a package; that is noise, not a problem.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

# The optional extras get an environment of their own, so that `make test` keeps testing the light base install.
# LiteRT gets a third: its converter needs xdsl 0.28, which pins typing-extensions < 4.13 and so pydantic 2.11, where
# the other extras take the newest; it installs from exact pins (.ci/litert-constraints.txt), without which pip's
# resolver backtracked for over 15 minutes.
EXTRAS_VENV := .venv-extras
EXTRAS_STAMP := $(EXTRAS_VENV)/.installed-stamp
EXTRAS := inspect,sweep,openvino,wandb,hf,executorch
LITERT_VENV := .venv-litert
LITERT_STAMP := $(LITERT_VENV)/.installed-stamp

.PHONY: install demo test test-fast test-extras test-litert docs lint clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | $(QUIET_PIP)
	$(PY) -c "import finetune, torch, timm, albumentations, pycocotools, sklearn"
	touch $(STAMP)

install: $(STAMP)

$(DEMO_DATA)/annotations/instances_source.json: | $(STAMP)
	$(VENV)/bin/finetune data demo $(DEMO_DATA)

# The demo pretrains on the "source" split, then fine-tunes from that run with staged unfreezing. Each demo gets
# its own run directories: an earlier run is never overwritten.
demo: $(STAMP) $(DEMO_DATA)/annotations/instances_source.json
	stamp=$$(date +%Y%m%d-%H%M%S); \
	$(VENV)/bin/finetune run recipes/demo_pretrain.toml --set output.name=demo_pretrain-$$stamp; \
	$(VENV)/bin/finetune run recipes/quickstart.toml --set output.name=quickstart-$$stamp \
		--set model.checkpoint=\"runs/demo_pretrain-$$stamp\"

lint: $(STAMP)
	$(VENV)/bin/ruff check finetune tests benchmarks
	$(VENV)/bin/ruff format --check finetune tests benchmarks

# One pytest worker per core (pytest-xdist), a test file to a worker, so a module's trained-run fixture runs once;
# each worker computes on one thread (tests/conftest.py). The slowest tests are listed at the end.
test: $(STAMP) lint
	$(PY) -m pytest -n auto --dist loadfile --durations=15

# Everything but the tests marked slow (subprocesses, torchrun, the notebook, whole training runs).
test-fast: $(STAMP) lint
	$(PY) -m pytest -n auto --dist loadfile -m "not slow"

$(EXTRAS_STAMP): pyproject.toml
	test -x $(EXTRAS_VENV)/bin/python || $(PYTHON) -m venv $(EXTRAS_VENV)
	$(EXTRAS_VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,$(EXTRAS)]' 2>&1 | $(QUIET_PIP)
	$(EXTRAS_VENV)/bin/python -c "import finetune, pytorch_grad_cam, cleanlab, optuna, openvino, wandb, datasets, executorch"
	touch $(EXTRAS_STAMP)

# The tests marked @pytest.mark.extra(...) with every extra installed: a test of an installed extra that skips fails
# (tests/conftest.py), so CI cannot stay green while an extra's feature breaks.
test-extras: $(EXTRAS_STAMP)
	$(EXTRAS_VENV)/bin/python -m pytest -n auto --dist loadfile -m extra -rs $$(grep -l 'mark.extra(' tests/test_*.py)

$(LITERT_STAMP): pyproject.toml .ci/litert-constraints.txt
	test -x $(LITERT_VENV)/bin/python || $(PYTHON) -m venv $(LITERT_VENV)
	$(LITERT_VENV)/bin/python -m pip install -q --disable-pip-version-check -c .ci/litert-constraints.txt \
		-e '.[dev,litert]' 2>&1 | $(QUIET_PIP)
	$(LITERT_VENV)/bin/python -c "import finetune, litert_torch, ai_edge_litert, ai_edge_quantizer"
	touch $(LITERT_STAMP)

# LiteRT's tests (their names or parameters say litert) in its own environment; as above, one that skips there fails.
test-litert: $(LITERT_STAMP)
	$(LITERT_VENV)/bin/python -m pytest -m extra -k litert -rs $$(grep -l 'mark.extra(' tests/test_*.py)

$(VENV)/.docs-stamp: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,docs]' 2>&1 | $(QUIET_PIP)
	touch $(VENV)/.docs-stamp

# The documentation site, warnings as errors: a broken link, a missing page or a docstring mkdocstrings cannot read
# fails the build. The recipe-key table is generated from the schema (docs/hooks.py).
docs: $(VENV)/.docs-stamp
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

clean-demo:
	rm -rf $(DEMO_DATA)

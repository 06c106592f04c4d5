# `make quickstart` and `make test` work on a fresh machine: they create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
TEST := $(VENV)/.installed-test
PYTEST_ARGS ?= -n 2
QUICKSTART_DIR := checkpoints/quickstart

.PHONY: quickstart lint test test-fast venv clean

venv: $(CORE)

$(CORE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[digits]'
	touch $@

$(TEST): $(CORE) constraints-test.txt
	$(PY) -m pip install -c constraints-test.txt -e '.[torch,test]'
	touch $@

# Train SimpleCNN on the bundled digits, restore the best checkpoint, evaluate it on the test split.
quickstart: $(CORE)
	$(PY) train.py --config configs/quickstart.py --workdir $(QUICKSTART_DIR)
	$(PY) eval.py --workdir $(QUICKSTART_DIR) --split test
	@echo "curves:      $(QUICKSTART_DIR)/curves.png"
	@echo "metrics:     $(QUICKSTART_DIR)/metrics.jsonl"
	@echo "checkpoints: $(QUICKSTART_DIR)/checkpoints"
	@echo "report:      $(QUICKSTART_DIR)/eval/report.json"

# The format and the lint first (seconds): CI keeps them.
lint: $(TEST)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# It installed every extra: a test that needs a missing one fails instead of skipping (tests/conftest.py).
test: lint
	CIFAR_JAX_REQUIRE_EXTRAS=1 $(PY) -m pytest $(PYTEST_ARGS)

# The daily loop: everything but the tests marked slow.
test-fast: lint
	CIFAR_JAX_REQUIRE_EXTRAS=1 $(PY) -m pytest $(PYTEST_ARGS) -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache

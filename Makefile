# Every target creates .venv on first use and installs the project into it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
KDRAY  := $(VENV)/bin/kdray
STAMP  := $(VENV)/.kdray-installed
# torch and torchvision must be installed as a matching pair from the registry (never the CPU-only
# local torch wheel, against which torchvision fails to import).
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
WORKDIR ?= kdray-work
PYTEST_ARGS ?= -m "not cluster"

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PAIR)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)


# The main job on the embedded default: a sweep of search_spaces/quick.yaml (EKD on 25% of digits),
# local Ray, MLflow sqlite store in $(WORKDIR). `kdray tune` trains the space's teachers once into
# $(WORKDIR)/teachers (or finds them there), runs the trials and prints the best student. Each run
# is a new Optuna study (quick-TIME), so `make demo` can be repeated.
# Two trials at a time keep both cores of a small machine busy (kdray caps it at what Ray can host).
DEMO_SPACE       ?= search_spaces/quick.yaml
DEMO_CONCURRENCY ?= 2
demo: $(STAMP)
	$(KDRAY) --workdir $(WORKDIR) tune --space $(DEMO_SPACE) --concurrency $(DEMO_CONCURRENCY) \
	  --experiment quick-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# pyflakes, pycodestyle errors, import order and 120-character lines ([tool.ruff] in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check kdray tests benchmarks

clean:
	rm -rf $(WORKDIR) .pytest_cache

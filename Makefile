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

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PAIR)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# The main job on the embedded default: digits, local, MLflow sqlite store in $(WORKDIR).
demo: $(STAMP)
	@test -f $(WORKDIR)/teachers/digits/manifest.json || \
	  $(KDRAY) --workdir $(WORKDIR) teachers train --dataset digits --arch resnet20 --count 3 --epochs 30 --train-fraction 0.25
	$(KDRAY) --workdir $(WORKDIR) train --method ekd --branches 3 --student resnet8 \
	  --teachers $(WORKDIR)/teachers/digits --dataset digits --train-fraction 0.25 --epochs 30

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(WORKDIR) .pytest_cache

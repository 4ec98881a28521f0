# One virtualenv (.venv) holds everything; every target installs what it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PORT   ?= 13000
DEMO_KEY ?= db-DEMO0000000000000000000000000

.PHONY: install run test test-deps test-uvloop test-asyncio lint types fmt bench bench-quick soak clean

# the native order books compile at install: a change to their C sources reinstalls
NATIVE_SRC := setup.py gateway/books/native_build.py $(wildcard gateway/books/_native/*.c gateway/books/_native/*.h)
NATIVE_SRC := $(filter-out gateway/books/_native/_books.c,$(NATIVE_SRC))

$(STAMP): pyproject.toml $(NATIVE_SRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

## make run: start the gateway on the embedded synthetic demo feed
## More `gateway serve` options go in ARGS: make run ARGS="--metrics-port 9313"
## The key goes through a file (mode 600, under .venv), not the command line: the demo key is
## public, but `make run DEMO_KEY=<a real key>` must not show that key in ps either.
run: $(STAMP)
	@(umask 077 && printf '%s\n' '$(DEMO_KEY)' > $(VENV)/demo.key)
	$(PY) -m gateway serve --host 127.0.0.1 --port $(PORT) --api-key-file $(VENV)/demo.key \
		--feed DEMO.SYNTH=synthetic: --feed "DEMO.MBO=synthetic:?schemas=mbo" \
		--journal-dir .journal --journal-max-bytes 1073741824 \
		--print-connect-help $(ARGS)

## make test-deps: install the programs the tests use (chromium, nats-server, redis-server,
## promtool, shellcheck, systemd-analyze) with apt-get where it can (root); never fails, and
## only runs `command -v` when everything is there. Tests skip, saying why, without them.
test-deps:
	@sh .ci/test-deps

## make test: install and run the whole suite, on uvloop and again on the stdlib loop (slow_e2e once)
test: $(STAMP) test-deps
	GATEWAY_TEST_LOOP=uvloop $(PY) -m pytest -q -p no:cacheprovider
	GATEWAY_TEST_LOOP=asyncio $(PY) -m pytest -q -p no:cacheprovider -m "not slow_e2e" tests/unit tests/integration

## make image: the gateway's container image (deploy/README.md: Container image). Without a
## registry the base comes from Debian's mirror (deploy/docker/build-base.sh, debootstrap, root);
## with one: make image BASE=python:3.11-slim. IMAGE names the tag; the machine's local CA
## certificates (CA_DIR) are trusted by the build stage only (pip behind a re-signing proxy).
IMAGE  ?= dbn-gateway:latest
BASE   ?= local/debian:bookworm
CA_DIR ?= $(wildcard /usr/local/share/ca-certificates)
.PHONY: image
image:
	deploy/docker/build-image.sh -t $(IMAGE) --base $(BASE) $(if $(CA_DIR),--ca-dir $(CA_DIR))

## make test-swarm: the image, deploy/swarm/stack.yml and the relay edges on a private one-node
## Docker Swarm (tests/swarm; root, docker.io and debootstrap: make test-deps). Skips, saying
## why, where it cannot run. Not part of make test. A few minutes.
.PHONY: test-swarm
test-swarm: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -s -rs tests/swarm

## make test-fast: the unit tests without the slow ones (seconds; no gateway process, no tools)
.PHONY: test-fast
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow_e2e" tests/unit

test-uvloop: $(STAMP)
	GATEWAY_TEST_LOOP=uvloop $(PY) -m pytest -q

test-asyncio: $(STAMP)
	GATEWAY_TEST_LOOP=asyncio $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/ruff format --check gateway tests bench

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix gateway tests bench
	$(VENV)/bin/ruff format gateway tests bench

types: $(STAMP)
	$(VENV)/bin/mypy

## make bench: every scenario against NATS, Redis, ZeroMQ and the raw socket limit
bench: $(STAMP)
	$(PY) -m bench $(ARGS)

bench-quick: $(STAMP)
	$(PY) -m bench --quick

## make soak: the long soak (60 s, 200 sessions joining and leaving, stalled and hostile clients)
soak: $(STAMP)
	$(PY) -m tests.soak.soak --duration 60

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

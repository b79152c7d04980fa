# e2a: `make up` installs, builds and starts the server; `make test` runs every test.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CACHE   ?= /var/cache/e2a
E2A_URL ?= http://127.0.0.1:8080
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: up deps venv build envd runsc rclone stripe-mock k8s templates image serve stop test test-unit test-guest test-e2e bench bench-templates bench-workspaces bench-agents bench-sessions bench-billing bench-pause bench-kube bench-relay openapi asyncapi clean

up: build templates
	@$(BIN)/e2a admin bootstrap
	@scripts/start-server.sh

deps:
	scripts/install-deps.sh

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

build: deps venv envd runsc rclone stripe-mock

envd:
	cd guest && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o ../build/envd .

runsc:
	E2A_CACHE_DIR=$(CACHE) scripts/build-runsc.sh

rclone:
	E2A_CACHE_DIR=$(CACHE) scripts/build-rclone.sh

stripe-mock:
	E2A_CACHE_DIR=$(CACHE) scripts/build-stripe-mock.sh

# The Kubernetes backend's test cluster (scripts/k8s/): built once per version into the cache.
k8s:
	scripts/k8s/deps.sh
	E2A_CACHE_DIR=$(CACHE) scripts/k8s/build.sh

templates: venv
	$(BIN)/e2a admin build-templates

# e2a's own OCI image, for running it in a cluster (deploy/kubernetes/, docs/kubernetes.md):
# a docker archive under $(CACHE)/images, cached by content hash.
image: venv envd
	E2A_CACHE_DIR=$(CACHE) $(BIN)/e2a admin image

serve: build templates
	$(BIN)/e2a serve

stop:
	scripts/stop-server.sh

openapi: venv
	$(BIN)/python -m e2a.api.openapi > docs/openapi.json

asyncapi: venv
	$(BIN)/python -m e2a.api.session_protocol > docs/sessions.asyncapi.json

# The Kubernetes tests (marker `kube`) share one cluster per machine, so they run after the
# rest, in one process (xdist's loadgroup does not keep a group together with pytest 9).
test: build templates k8s
	scripts/test-services.sh
	cd guest && go test ./...
	E2A_TEST_PG_URL=postgresql+asyncpg://e2a_test:e2a_test@127.0.0.1/e2a_test \
	  $(BIN)/python -m pytest -q -n 2 -m "not kube" tests
	$(BIN)/python -m pytest -q -m kube tests

test-unit: venv
	$(BIN)/python -m pytest -q tests/unit

bench: build templates
	$(BIN)/python bench/sandboxes.py
	$(BIN)/python bench/templates.py

bench-templates: build templates
	$(BIN)/python bench/templates.py

bench-workspaces: build templates
	$(BIN)/python bench/workspaces.py

bench-agents: build templates
	$(BIN)/python bench/agents.py

bench-sessions: build templates
	$(BIN)/python bench/sessions.py

bench-billing: venv
	$(BIN)/python bench/billing.py

bench-pause: build templates
	$(BIN)/python bench/pause.py

bench-kube: build templates k8s
	$(BIN)/python bench/kube.py

bench-relay: venv
	$(BIN)/python bench/session_relay.py

clean:
	rm -rf build

# The verbs a user types. `make dev` runs Tally; `make test` tests it.

CARGO ?= cargo
DATA_DIR ?= ./.data
PORT ?= 8080
# `make dev` answers on loopback only: its authentication is off.
HOST ?= 127.0.0.1

.PHONY: dev stack token services bench torture watch up backends down kind kind-down validate test lint fmt openapi build release walkthrough clean help

help: ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

dev: ## every public route on 127.0.0.1:8080, embedded backends, data under ./.data, no tokens (no services needed)
	TALLY_DATA_DIR=$(DATA_DIR) HOST=$(HOST) PORT=$(PORT) $(CARGO) run -p gateway

stack: ## every function as its own process on the real backends (S3, Kafka, PostgreSQL, Redis), routes on :8080 (STORE=postgres: events in PostgreSQL)
	./scripts/stack.sh

token: ## print an access token of the local identity provider for make stack (CLIENT=alice|bob|reader|tally-ops, SCOPE=...)
	@./scripts/idp.sh token $(or $(CLIENT),alice) "$(SCOPE)"

services: ## install and start the backing services on 127.0.0.1 (PostgreSQL, Redis, S3, Kafka, an OpenID Connect provider)
	./scripts/services.sh up

bench: ## load (dev, stack, ceiling), rebuild, micro-benchmarks, serverless figures; results in bench/results/ (BENCH_QUICK=1: a harness check)
	./scripts/bench.sh

torture: ## the fault harness: seeded load and faults, then a checker of every invariant (TORTURE_SEED, TORTURE_SECONDS, TORTURE_TOPOLOGY)
	./scripts/torture.sh

watch: ## every function under `cargo lambda watch` on :9000, against `make backends` if up, else `make services` (installs cargo-lambda if missing)
	./scripts/watch.sh

up: ## docker compose: the backends, the init job, every function and the gateway on 127.0.0.1:8080
	docker compose --profile functions up -d --build --wait
	@echo "Tally on http://127.0.0.1:8080 — try: TOKEN=\$$(IDP_PORT=9401 scripts/idp.sh token alice) make walkthrough"

backends: ## docker compose, backends only (for make watch): S3 :9002, Kafka :9092, PostgreSQL :5433, Redis :6380, identity provider :9401
	docker compose up -d --wait

down: ## stop docker compose and delete its data
	docker compose --profile functions down --volumes --remove-orphans

kind: ## a kind cluster: image, k8s/ infrastructure, the Helm chart, port-forwards, the walk-through
	./scripts/kind.sh up

kind-down: ## delete the kind cluster
	./scripts/kind.sh down

validate: ## offline checks of the chart, k8s/ and docker-compose.yml (part of make test)
	./scripts/validate-deploy.sh

test: ## provision what the tests need, then fmt check, clippy and every test
	./scripts/test.sh

lint: ## cargo fmt --check and clippy -D warnings
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

openapi: ## regenerate openapi.json from the code
	UPDATE_OPENAPI=1 $(CARGO) test -p tally-api --test openapi

build: ## debug build of every function
	$(CARGO) build --workspace

release: ## stripped release build of every function
	$(CARGO) build --workspace --release

walkthrough: ## the seed's curl walk-through against a running `make dev` (make stack: TOKEN=$(make -s token) make walkthrough)
	./scripts/walkthrough.sh http://localhost:$(PORT)

clean: ## remove build output and local data
	$(CARGO) clean
	rm -rf $(DATA_DIR)

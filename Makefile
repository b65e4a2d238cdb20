# The verbs a user types. `make dev` runs Tally; `make test` tests it.

CARGO ?= cargo
DATA_DIR ?= ./.data
PORT ?= 8080

.PHONY: dev stack services test lint fmt openapi build release walkthrough clean help

help: ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

dev: ## every public route on :8080, embedded backends, data under ./.data (no services needed)
	TALLY_DATA_DIR=$(DATA_DIR) PORT=$(PORT) $(CARGO) run -p gateway

stack: ## every function as its own process on the real backends (S3, Kafka, PostgreSQL, Redis), routes on :8080
	./scripts/stack.sh

services: ## install and start the backing services on 127.0.0.1 (PostgreSQL, Redis, S3, Kafka)
	./scripts/services.sh up

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

walkthrough: ## the seed's curl walk-through against a running `make dev`
	./scripts/walkthrough.sh http://localhost:$(PORT)

clean: ## remove build output and local data
	$(CARGO) clean
	rm -rf $(DATA_DIR)

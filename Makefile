# waymark: `make help` lists the targets.
SHELL := /bin/bash
CARGO_TARGET_DIR ?= $(HOME)/.cache/waymark-target
export CARGO_TARGET_DIR
BROKER_PORT ?= 9092
BROKERS := 127.0.0.1:$(BROKER_PORT)
BIN := $(CARGO_TARGET_DIR)/release/waymark
CARGO := cargo
# One profile for everything (release), so RocksDB and librdkafka compile once.
PROFILE := --release
# The test-only crash hooks (`failpoints`) are built into the binary that make builds and tests;
# the release image (deploy/Dockerfile) is built without them.
FEATURES := --features failpoints

.PHONY: help deps build test test-unit lint broker broker-stop demo fuzz bench bench-core bench-replay bench-profiles bench-backtest bench-kafka bench-kafka-profiles bench-startup bench-guarantees chaos validate clean

help: ## List the targets
	@grep -hE '^[a-z][a-zA-Z_-]*:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

deps: ## Install the system packages the build and tests need (Debian; run as root; chromium for the HTML report test)
	@missing=""; for p in cmake clang libclang-dev libcurl4-openssl-dev pkg-config build-essential chromium; do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else echo "system packages present"; fi

build: ## Build the waymark binary (release)
	@[ -x "$(BIN)" ] || echo "building waymark (release, all targets): the first build compiles RocksDB and librdkafka, about 12 minutes on 2 idle cores (24 with other work); later builds take seconds to a minute"
	$(CARGO) build $(PROFILE) $(FEATURES) --all-targets

broker: ## Start the local test broker (tansu on sqlite), installing it if missing
	@scripts/broker.sh start $(BROKER_PORT)

broker-stop: ## Stop the local test broker
	@scripts/broker.sh stop $(BROKER_PORT)

validate: build ## Validate config/journeys
	$(BIN) validate config/journeys

lint: ## rustfmt and clippy (warnings are errors)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy $(PROFILE) $(FEATURES) --all-targets -- -D warnings

test-unit: ## Unit, golden and property tests (no broker)
	$(CARGO) test $(PROFILE) $(FEATURES) --lib --test golden --test properties --test cli

test: deps build broker ## Everything: lint, unit, golden, property and broker tests
	$(MAKE) --no-print-directory lint
	@# One test at a time: the broker tests start several instances and brokers each, and on two
	@# cores tansu then answers heartbeats late enough for members to lose their partitions.
	WAYMARK_TEST_BROKERS=$(BROKERS) $(CARGO) test $(PROFILE) $(FEATURES) -- --test-threads 1

chaos: deps build broker ## The chaos suite, full form (200k events a scenario; see docs/reliability.md for what completed here and how long it took): report lines on stderr and in .run/chaos-report.txt
	@mkdir -p .run
	CHAOS_SCALE=full CHAOS_REPORT=$(CURDIR)/.run/chaos-report.txt WAYMARK_TEST_BROKERS=$(BROKERS) \
	  $(CARGO) test $(PROFILE) $(FEATURES) --test chaos -- --nocapture --test-threads 1 $(CHAOS_TESTS)
	@grep -h "^chaos report" .run/chaos-report.txt | tail -n 8

fuzz: ## Bad-input fuzzing: decoder and compilers on arbitrary bytes and JSON (FUZZ_CASES=500000 per property, about 30 seconds)
	FUZZ_CASES=$${FUZZ_CASES:-500000} $(CARGO) test $(PROFILE) $(FEATURES) --test fuzz -- --test-threads 2

demo: deps build broker ## End to end: broker, waymark run, the seed scenario's events, the output records
	@scripts/demo.sh $(BROKERS)

bench: bench-core bench-replay ## All benchmarks that need no broker

bench-core: ## Criterion benchmarks of condition matching and the engine step
	$(CARGO) bench --bench engine

bench-replay: build ## 1M events, 100k users, 10 journeys through `waymark replay --state`
	@scripts/bench-replay.sh $(BIN)

bench-profiles: build ## The 1M-event replay workload with 1M profiles loaded and journeys reading them, vs without (target 80%)
	@scripts/bench-profiles.sh $(BIN)

bench-backtest: build broker ## backtest vs replay on the 1M workload, and backtest from Kafka vs a consume-only read of the same range (targets 90% and 80%)
	@scripts/bench-backtest.sh $(BIN) $(BROKERS)

bench-guarantees: ## Changelog on/off and exactly-once vs at-least-once, side by side (mock cluster)
	BENCH_EVENTS=$${BENCH_EVENTS:-200000} $(CARGO) bench $(FEATURES) --bench guarantees

bench-kafka: build broker ## 2M events through `waymark run` against the local broker
	@scripts/bench-kafka.sh $(BIN) $(BROKERS)

bench-startup: build broker ## Start-up: 200k events, one fresh `waymark run` from process start until every input is durable
	@scripts/bench-startup.sh $(BIN) $(BROKERS)

bench-kafka-profiles: build broker ## `waymark run` with and without 1M profiles loaded, each as a share of consume-only (400k events)
	@scripts/bench-kafka-profiles.sh $(BIN) $(BROKERS)

clean: ## Remove local state and broker data (not the cargo cache)
	rm -rf state .run

# spliced: the test command is `make test`. Every target installs what it needs.
CARGO ?= cargo
SPLICED := $(or $(CARGO_TARGET_DIR),target)/release/spliced

.PHONY: all build test lint unit tools bench bench-quick bench-peers deps e2e health-real faults scale soak fuzz fuzz-smoke artifacts ci clean

all: build

build:
	$(CARGO) build --release

# The README's test command: unit + loopback integration tests (both engines),
# the bench smoke run and the lints.
test: lint unit bench-quick

unit: tools
	$(CARGO) test --release --all-targets
	$(CARGO) test --release --doc

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	# The lean library (no default features) builds clean too.
	$(CARGO) clippy --no-default-features --lib -- -D warnings

bench:
	$(CARGO) bench --bench relay

bench-quick: build
	$(SPLICED) bench --quick

bench-peers: build
	bash scripts/bench-peers.sh

# The commands `make test` runs beside cargo (ip, tc, ethtool, strace,
# setpriv): installed with apt-get when missing.
tools:
	bash scripts/install-deps.sh --tools

# Debian packages the database, fault and peer tests drive.
deps:
	bash scripts/install-deps.sh

# tests/e2e.rs, one scenario at a time, against real servers on 127.0.0.1:
# PostgreSQL and Redis clients through spliced on every engine (pgbench,
# COPY by sha256, idle timeout, redis-benchmark, --pipe) and the
# throughput beside direct; a real Prometheus scraping spliced; failovers
# through active checks (PostgreSQL promotion, Redis REPLICAOF, MariaDB)
# and cancel routing; role routing judged by the server that answers each
# client (reloads under load, split brain, two Redis masters, monitor
# password rotation, prefer-replica); a three-node Patroni cluster through
# a switchover and a leader crash, spliced beside HAProxy; live upgrades
# (`spliced upgrade`) that fail and leave the old process serving, and
# ones that hand the listening sockets over.
e2e: build health-real
	SPLICED_REAL_SERVERS=1 $(CARGO) test --release --test e2e -- --ignored --test-threads=1 --nocapture
	# The uring loop where io_uring is forbidden (a seccomp filter).
	$(CARGO) test --release --test uring -- --ignored --nocapture

# Health probes against real Redis, PostgreSQL (trust, md5, SCRAM; primary
# and a streaming replica) and MariaDB started on 127.0.0.1 (~5 s).
health-real: deps
	SPLICED_REAL_SERVERS=1 $(CARGO) test --release --test health_real -- --ignored --nocapture

faults: build
	bash scripts/faults.sh

scale: build
	bash scripts/scale.sh

soak: build
	SOAK_SECS=$${SOAK_SECS:-1800} bash scripts/soak.sh

fuzz:
	bash scripts/fuzz.sh $${FUZZ_SECS:-60}

fuzz-smoke:
	bash scripts/fuzz.sh 10

# The image's default config and HEALTHCHECK, the ConfigMap's config and the
# Deployment's probes, run against spliced in a network namespace, and the
# manifests against the Kubernetes schemas (no container runtime needed).
artifacts: build
	SPLICED=$(SPLICED) bash scripts/artifacts.sh

# What .ci/run calls after `make test`. The fuzz corpus already runs as a
# regression test inside `make test` (fuzzing::tests::seed_corpus_passes);
# `make fuzz-smoke` adds a 10 s cargo-fuzz run per target (≈8 min cold).
# scale runs first: it opens 9 000 relays at once and measures fd and RSS
# baselines, so it starts before the other suites leave sockets behind
# (TIME_WAIT, TCP memory).
ci: scale e2e faults artifacts
	SOAK_SECS=120 bash scripts/soak.sh

clean:
	$(CARGO) clean

//! End-to-end scenarios against real servers (PostgreSQL, Redis, MariaDB)
//! started on 127.0.0.1 under a temp dir and stopped by PID, with spliced
//! as a child process on a TOML config file. Judged by what clients see:
//! which server answered, and whether the client was served, refused or
//! reset.
//!
//! Every test is ignored in a plain `cargo test` (they need the packages
//! and start servers); `make e2e` installs the packages and runs them with
//! `--ignored --test-threads=1` and SPLICED_REAL_SERVERS=1, under which a
//! missing binary fails the test. Run by hand without that variable, a
//! test whose binary is missing prints SKIPPED and why, and passes.

mod common;
#[path = "e2e/failover.rs"]
mod failover;
#[path = "e2e/fixture.rs"]
mod fixture;
#[path = "e2e/parking.rs"]
mod parking;
#[path = "e2e/patroni.rs"]
mod patroni;
#[path = "e2e/prometheus.rs"]
mod prometheus;
#[path = "e2e/relay.rs"]
mod relay;
#[path = "e2e/routing.rs"]
mod routing;
#[path = "health_real/servers.rs"]
mod servers;
#[path = "e2e/tls_routes.rs"]
mod tls_routes;
#[path = "e2e/upgrade.rs"]
mod upgrade;

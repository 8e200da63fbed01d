//! The real-server fixture of the end-to-end tests: PostgreSQL (a primary
//! and streaming replicas), Redis (masters and replicas), MariaDB, and the
//! spliced child on a TOML config file, all on 127.0.0.1 under one temp dir
//! ([`TempDir`], removed on drop), each server run as an unprivileged user
//! when the tests run as root and stopped by PID when dropped.
//!
//! What it offers:
//! - [`TempDir::new`], [`free_port`], [`loopback`]: the place and the ports.
//! - [`pg_bin`], [`Pg::primary`], [`Pg::replica_of`] (or
//!   [`primary_and_replica`]): PostgreSQL with `wal_level = replica`,
//!   `hot_standby = on`, a [`MONITOR_USER`] role logging in by SCRAM with
//!   its password, every other login trusted ([`CLIENT_USER`] is the one
//!   clients use); [`Pg::promote`], [`Pg::stop_immediate`], [`Pg::start`]
//!   (again), [`Pg::psql`] (output of psql -At), [`Pg::timeline`].
//! - [`redis_bin`], [`Redis::master`], [`Redis::replica_of`],
//!   [`Redis::on_port`] + [`Redis::start`] (a server named in a config
//!   before it runs), [`Redis::promote`] (REPLICAOF NO ONE),
//!   [`Redis::replicaof`], [`Redis::stop`], [`Redis::clients_named`].
//! - [`Mariadb::start`].
//! - [`Proxy::start`]: `spliced run --config FILE --admin ... --workers 2`;
//!   [`Proxy::reload`] rewrites the file and SIGHUPs, returning once the
//!   reload is logged; [`Proxy::metric`] reads one sample of /metrics;
//!   [`Proxy::check`] runs `spliced check`.
//! - [`PgConn`] and [`RespConn`]: clients that tell which server answered
//!   (`current_setting('port')`, `INFO server`'s `tcp_port`) and how a
//!   failure looked ([`WireError::is_refused`], [`WireError::is_read_only`]).
//! - [`write_secret`]: a password file.
//!
//! A test whose binaries are missing gets `None` from [`pg_bin`] /
//! [`redis_bin`] / [`Mariadb::start`] (after printing SKIPPED and why)
//! and returns; under SPLICED_REAL_SERVERS=1 that is a failure instead.
// Each test file uses a different part of the fixture.
#![allow(dead_code, unused_imports)]

#[path = "fixture/mariadb.rs"]
mod mariadb;
#[path = "fixture/pg.rs"]
mod pg;
#[path = "fixture/proxy.rs"]
mod proxy;
#[path = "fixture/redis.rs"]
mod redis;
#[path = "fixture/wire.rs"]
mod wire;

use std::path::PathBuf;

pub use self::mariadb::Mariadb;
pub use self::pg::{pg_bin, primary_and_replica, psql_command, Pg, CLIENT_USER, MONITOR_USER};
pub use self::proxy::{sample, Proxy};
pub use self::redis::{redis_bin, Redis};
pub use self::wire::{info_field, PgConn, Resp, RespConn, Rows, WireError};
pub use crate::servers::{free_port, loopback, TempDir};

/// Writes `secret` and a newline to `DIR/name` (replacing it) and returns
/// the path: a `password-file` for a health check.
pub fn write_secret(dir: &TempDir, name: &str, secret: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    p
}

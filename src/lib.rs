//! spliced: a Linux layer-4 TCP proxy whose data path never copies payload
//! through userspace.
//!
//! See docs/ARCHITECTURE.md for the lifetime of a relay and where each part
//! lives. In short:
//!
//! | module | what lives there |
//! |---|---|
//! | [`config`] | validated settings, the TOML config file, duration/size/address parsing |
//! | [`proxy`] | [`start`] a proxy, its [`ProxyHandle`] |
//! | [`service`] | pid file, privilege drop, `sd_notify` |
//! | [`reload`] | replace a running proxy's listeners without refusing a client: [`Reloader`] |
//! | [`runtime`] | the [`Runtime`]: workers and their command channel; a proxy is one with listeners |
//! | [`handoff`] | hand two connected sockets to a runtime: [`Runtime::handoff`], the [`Handoff`] handle |
//! | `listener`, `upstream` | a listener's limits and access list; pools, balancing, passive health, re-resolution |
//! | `worker` | one mio event loop per thread: accept, connect, readiness, budget, timers |
//! | `relay` | a relay = two `Direction`s; the pure per-direction state machine |
//! | `engine` | the one transfer interface: splice (pipe) and copy (buffer), and their pools |
//! | `timer` | coarse deadlines with lazy re-arm |
//! | `sys` | the OS boundary, the one module allowed raw syscalls: pipe2, splice, fcntl pipe size, rlimits |
//! | [`stats`] | per-worker counters and close reasons |
//! | [`health`] | active health probes (pure conversations), their non-blocking driver, rise/fall state |
//! | [`proxy_protocol`] | PROXY protocol v1/v2: encoder, strict incremental parser, trusted sources |
//! | `pgwire` | the PostgreSQL messages spliced speaks itself: first packets, the ErrorResponse of a refusal |
//! | [`route`] | routing by a client's first bytes: the TLS ClientHello's server name and ALPN ([`route::hello`]) |
//! | [`shm`] | the stats file the counters live in, and its reader |
//! | [`ops`] | settings of the admin endpoint, stats file and progress lines |
//! | [`os`] | the safe OS helpers programs beside a runtime use: thread ids, per-thread CPU time, network namespaces |
//! | `bench` | `spliced bench`: the self-contained benchmark (feature `cli`) |
//!
//! The default feature `cli` adds the command line and the benchmark, and
//! with them the features it needs: `admin` (the HTTP endpoint),
//! `config-file` (the TOML file, through toml and serde), `postgres-checks`
//! (postgres health probes, through postgres-protocol), `service` (the
//! pid file, `--user`, sd_notify and socket activation, through sd-notify)
//! and `serde` (`Serialize` for snapshots). With `default-features = false`
//! the crate is the relay, its config built in code and its runtime.
//!
//! `unsafe_code` is denied for the whole crate (Cargo.toml `[lints]`); only
//! `sys` allows it, and every block there carries a `// SAFETY:` comment.

#[cfg(feature = "admin")]
mod admin;
#[cfg(feature = "cli")]
pub mod bench;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
mod control;
mod engine;
pub mod error;
/// Drivers for the fuzz targets and the property tests; built for tests
/// and under cargo-fuzz (`--cfg fuzzing`), never into a release library.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
pub mod handoff;
pub mod health;
pub mod listener;
pub mod ops;
pub mod os;
mod pgwire;
pub mod proxy;
pub mod proxy_protocol;
mod relay;
pub mod reload;
pub mod route;
pub mod runtime;
#[cfg(feature = "service")]
pub mod service;
pub mod shm;
pub mod stats;
mod sys;
mod timer;
mod token;
#[cfg(feature = "service")]
pub mod upgrade;
mod upstream;
mod worker;

pub use config::{Config, EventLoop, ListenerConfig, Mode, Timeouts};
pub use error::{Side, StartError};
pub use handoff::{End, Ending, Handoff, HandoffError, Outcome, PairError, Socket};
#[cfg(feature = "service")]
pub use proxy::start_activated;
#[cfg(feature = "service")]
pub use proxy::start_upgraded;
pub use proxy::{start, start_with, ProxyHandle};
pub use reload::{ReloadReport, Reloader};
pub use runtime::{Controller, Runtime, RuntimeBuilder};
pub use stats::{CloseReason, Stats};
pub use upstream::{Resolve, SystemResolver};

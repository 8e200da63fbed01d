//! spliced: a Linux layer-4 TCP proxy whose data path never copies payload
//! through userspace.
//!
//! See docs/ARCHITECTURE.md for the lifetime of a relay and where each part
//! lives. In short:
//!
//! | module | what lives there |
//! |---|---|
//! | [`config`] | validated settings, duration/size/address parsing |
//! | [`proxy`] | [`start`] a proxy, its [`ProxyHandle`] |
//! | `worker` | one mio event loop per thread: accept, connect, readiness, budget, timers |
//! | `relay` | a relay = two `Direction`s; the pure per-direction state machine |
//! | `engine` | the one transfer interface: splice (pipe) and copy (buffer), and their pools |
//! | `timer` | coarse deadlines with lazy re-arm |
//! | `sys` | the OS boundary, the one module allowed raw syscalls: pipe2, splice, fcntl pipe size, rlimits |
//! | [`stats`] | per-worker counters and close reasons |
//! | [`health`] | active health probes (pure conversations), their non-blocking driver, rise/fall state |
//! | [`proxy_protocol`] | PROXY protocol v1/v2: encoder, strict incremental parser, trusted sources |
//! | [`bench`] | `spliced bench`: the self-contained benchmark |
#![deny(unsafe_code)]

pub mod bench;
pub mod config;
mod control;
mod engine;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod listener;
pub mod proxy;
pub mod proxy_protocol;
mod relay;
pub mod stats;
pub mod sys;
mod timer;
mod token;
mod upstream;
mod worker;

pub use config::{Config, ListenerConfig, Mode, Timeouts};
pub use error::{Side, StartError};
pub use proxy::{start, Controller, ProxyHandle};
pub use stats::{CloseReason, Stats};

//! Settings of the operations surface: the admin endpoint, the stats file
//! and progress lines. None of them touches the data path.

use std::net::SocketAddr;
use std::time::Duration;

/// What a running instance exposes about itself. All off by default in the
/// library; `spliced run` names its instance `spliced` unless told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ops {
    /// Serve `/metrics`, `/healthz` and `/livez` over HTTP here.
    pub admin: Option<SocketAddr>,
    /// Keep the counters in the stats file of this instance name (see
    /// [`crate::shm::stats_path`]); `None` keeps them in anonymous memory.
    pub instance: Option<String>,
    /// Log a progress line for every relay alive longer than this, once per
    /// interval.
    pub log_interval: Option<Duration>,
}

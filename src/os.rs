//! The OS helpers that programs built on the library use beside a
//! [`Runtime`](crate::Runtime), as a public, safe API over the private
//! `sys` module: the benchmark measures its own threads' CPU time the way
//! the runtime measures its workers', and enters network namespaces.

pub use crate::sys::{gettid, thread_cpu_time};

/// Network namespaces (feature `cli`, for `spliced bench`'s veth paths).
#[cfg(feature = "cli")]
pub mod netns {
    pub use crate::sys::netns::enter;
}

//! Shared helpers of the loopback integration tests.
//!
//! Everything here talks to 127.0.0.1 only. Waiting is always bounded by a
//! deadline: reads use `set_read_timeout`, conditions are polled with
//! [`wait_until`]. The only deliberate sleeps are [`pace`] (a trickling or
//! slow peer) and [`measure_window`] (a fixed window over which CPU use is
//! measured).
#![allow(dead_code)]

mod child;
mod data;
mod files;
mod io;
mod peers;
mod redis;
mod tls;
mod wait;

// Every test binary uses a different subset (as with `dead_code` above).
#[allow(unused_imports)]
pub use self::{child::*, data::*, files::*, io::*, peers::*, redis::*, tls::*, wait::*};

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use spliced::{start, Config, Mode, ProxyHandle};

/// Runs a case once per engine and loop: `both_engines!(case_a, case_b)`
/// makes `case_a::splice`, `case_a::copy` and `case_a::auto` tests calling
/// `case_a(Mode)` on the epoll loop (auto switches engines per direction
/// as it goes), and `case_a::uring_splice`, `uring_copy` and `uring_auto`
/// the same on the uring loop: [`proxy`] and [`Spliced`] children take
/// the loop of the test's thread ([`event_loop`]).
#[macro_export]
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn splice() {
                    super::$name(spliced::Mode::Splice)
                }
                #[test]
                fn copy() {
                    super::$name(spliced::Mode::Copy)
                }
                #[test]
                fn auto() {
                    super::$name(spliced::Mode::Auto)
                }
                #[test]
                fn uring_splice() {
                    $crate::common::on_loop(spliced::EventLoop::Uring);
                    super::$name(spliced::Mode::Splice)
                }
                #[test]
                fn uring_copy() {
                    $crate::common::on_loop(spliced::EventLoop::Uring);
                    super::$name(spliced::Mode::Copy)
                }
                #[test]
                fn uring_auto() {
                    $crate::common::on_loop(spliced::EventLoop::Uring);
                    super::$name(spliced::Mode::Auto)
                }
            }
        )*
    };
}

thread_local! {
    static LOOP: std::cell::Cell<spliced::EventLoop> = const { std::cell::Cell::new(spliced::EventLoop::Epoll) };
}

/// Runs the rest of this test (its thread) on `event_loop`.
pub fn on_loop(event_loop: spliced::EventLoop) {
    LOOP.with(|l| l.set(event_loop));
}

/// The loop this test's proxies run ([`on_loop`]; epoll by default).
pub fn event_loop() -> spliced::EventLoop {
    LOOP.with(|l| l.get())
}

pub const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------
// Serialising timing-sensitive tests inside one test binary.

static SERIAL: Mutex<()> = Mutex::new(());

/// Held for a whole test whose timing or CPU measurements must not compete
/// with other tests of the same binary (the machine has 2 cores).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------
// The proxy, in-process.

/// A one-listener proxy on 127.0.0.1:0 with one worker; `tweak` adjusts the
/// config before start.
pub fn proxy(
    mode: Mode,
    upstreams: Vec<SocketAddr>,
    tweak: impl FnOnce(&mut Config),
) -> ProxyHandle {
    let mut cfg = Config::single("127.0.0.1:0".parse().unwrap(), upstreams, mode);
    cfg.workers = 1;
    cfg.event_loop = event_loop();
    tweak(&mut cfg);
    start(cfg).unwrap_or_else(|e| panic!("start the proxy: {e}"))
}

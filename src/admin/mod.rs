//! The admin endpoint: `GET /metrics` (Prometheus text format), `GET
//! /healthz` (readiness: 200 while accepting, 503 while draining), `GET
//! /healthz/LISTENER` (200 while that listener has a server that takes new
//! relays, 503 otherwise or while draining) and `GET /livez` (200 while the
//! process answers).
//!
//! It runs on its own thread, one non-blocking event loop for every client
//! (see [`server`]), and reads only the counter mapping and the drain flag,
//! both atomics: a slow or stuck scraper costs that thread a slot, never a
//! worker, and never another scraper's answer. Its fds are bounded and kept
//! out of the relay budget ([`crate::ops::Ops::admin_fds`]).

mod conn;
mod http;
mod metrics;
mod server;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use mio::net::TcpListener;
use mio::{Interest, Poll, Waker};

use self::http::{Head, Response};
use crate::shm::Arena;

/// Reads every server's state at scrape time, lock-free per server.
pub(crate) type ServerSamples =
    Arc<dyn Fn() -> Vec<(String, crate::upstream::ServerSample)> + Send + Sync>;

/// Reads every route's count of clients at scrape time: (listener, route).
pub(crate) type RouteSamples =
    Arc<dyn Fn() -> Vec<(String, crate::listener::RouteSample)> + Send + Sync>;

/// A running admin endpoint; dropping it stops the thread.
pub(crate) struct Admin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Waker,
    thread: Option<JoinHandle<()>>,
}

impl Admin {
    /// Binds `addr` and starts serving.
    pub(crate) fn start(
        addr: SocketAddr,
        arena: Arc<Arena>,
        servers: ServerSamples,
        routes: RouteSamples,
        draining: Arc<AtomicBool>,
    ) -> std::io::Result<Admin> {
        let mut listener = bind(addr)?;
        let addr = listener.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, server::LISTENER, Interest::READABLE)?;
        let waker = Waker::new(poll.registry(), server::WAKER)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("spliced-admin".into())
            .spawn(move || {
                let samples = Arc::clone(&servers);
                let registry = metrics::registry(arena, servers, routes);
                let answer = |head: &Head<'_>| answer(head, &registry, &samples, &draining);
                server::Server::new(poll, listener, answer, stopping).run();
            })?;
        Ok(Admin {
            addr,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// The address it listens on (useful with port 0).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.waker.wake() {
            tracing::warn!(error = %e, "admin: wake the admin thread to stop it");
            return;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connections the kernel completes and queues while the loop is busy. A
/// burst past it has its SYNs dropped (clients retry after a second);
/// queued connections hold no fd of ours.
const LISTEN_BACKLOG: i32 = 1024;

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// The answer to one request.
fn answer(
    head: &Head<'_>,
    registry: &prometheus_client::registry::Registry,
    servers: &ServerSamples,
    draining: &AtomicBool,
) -> Response {
    let ok = |body: &str| Response::text(200, body.to_string());
    if head.method != "GET" && head.method != "HEAD" {
        return Response::text(405, "only GET and HEAD\n".into());
    }
    match head.path {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics::render(registry),
        },
        "/healthz" if draining.load(Ordering::Relaxed) => Response::text(503, "draining\n".into()),
        "/healthz" | "/livez" => ok("ok\n"),
        path => match path.strip_prefix("/healthz/") {
            Some(name) => listener_ready(name, servers, draining),
            None => Response::text(
                404,
                "not found: try /metrics, /healthz, /healthz/LISTENER or /livez\n".into(),
            ),
        },
    }
}

/// Readiness of one listener, for an outer balancer that follows one role:
/// 200 while one of its servers takes new relays.
fn listener_ready(name: &str, servers: &ServerSamples, draining: &AtomicBool) -> Response {
    let all = servers();
    let mine: Vec<_> = all.iter().filter(|(l, _)| l == name).collect();
    if mine.is_empty() {
        return Response::text(404, format!("no listener named {name:?}\n"));
    }
    if draining.load(Ordering::Relaxed) {
        return Response::text(503, "draining\n".into());
    }
    let up = mine.iter().filter(|(_, s)| s.up).count();
    let body = format!("{up} of {} servers take new relays\n", mine.len());
    Response::text(if up > 0 { 200 } else { 503 }, body)
}

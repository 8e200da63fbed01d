//! The admin endpoint: `GET /metrics` (Prometheus text format), `GET
//! /healthz` (readiness: 200 while accepting, 503 while draining) and `GET
//! /livez` (200 while the process answers).
//!
//! It runs on its own thread with a blocking HTTP server (tiny_http) and
//! reads only the counter mapping and the drain flag, both atomics: a slow
//! or stuck scraper costs that thread, never a worker.

mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tiny_http::{Header, Method, Response, Server};

use crate::shm::Arena;

/// Reads every server's state at scrape time, lock-free per server.
pub(crate) type ServerSamples =
    Arc<dyn Fn() -> Vec<(String, crate::upstream::ServerSample)> + Send + Sync>;

/// A running admin endpoint; dropping it stops the thread.
pub(crate) struct Admin {
    addr: SocketAddr,
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
}

impl Admin {
    /// Binds `addr` and starts serving.
    pub(crate) fn start(
        addr: SocketAddr,
        arena: Arc<Arena>,
        servers: ServerSamples,
        stopping: Arc<AtomicBool>,
    ) -> std::io::Result<Admin> {
        let server = Server::http(addr).map_err(std::io::Error::other)?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| std::io::Error::other("the admin endpoint is not an IP socket"))?;
        let server = Arc::new(server);
        let serving = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("spliced-admin".into())
            .spawn(move || serve(&serving, arena, servers, &stopping))?;
        Ok(Admin {
            addr,
            server,
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
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(server: &Server, arena: Arc<Arena>, servers: ServerSamples, stopping: &AtomicBool) {
    let registry = metrics::registry(Arc::clone(&arena), servers);
    for request in server.incoming_requests() {
        let (status, content_type, body) = match (request.method(), path(request.url())) {
            (Method::Get | Method::Head, "/metrics") => (
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics::render(&registry),
            ),
            (Method::Get | Method::Head, "/healthz") => {
                if stopping.load(Ordering::Relaxed) {
                    (503, "text/plain", "draining\n".to_string())
                } else {
                    (200, "text/plain", "ok\n".to_string())
                }
            }
            (Method::Get | Method::Head, "/livez") => (200, "text/plain", "ok\n".to_string()),
            (Method::Get | Method::Head, _) => (
                404,
                "text/plain",
                "not found: try /metrics, /healthz or /livez\n".to_string(),
            ),
            _ => (405, "text/plain", "only GET and HEAD\n".to_string()),
        };
        let header = Header::from_bytes("Content-Type", content_type).expect("a valid header");
        let response = Response::from_string(body)
            .with_status_code(status)
            .with_header(header);
        if let Err(e) = request.respond(response) {
            tracing::debug!(error = %e, "admin: client went away before the answer");
        }
    }
}

/// The path of a request target, without its query.
fn path(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

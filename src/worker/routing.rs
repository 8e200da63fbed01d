//! Where a client goes once what it showed is known: its listener's own
//! pool, or the pool of the first route that takes it; and, for a TLS
//! client, what spliced must say to the server before the client's bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;

use super::negotiate::Negotiation;
use super::Worker;
use crate::listener::Listener;
use crate::pgwire;
use crate::relay::RouteTag;
use crate::route::startup::TlsStyle;
use crate::route::Shown;
use crate::upstream::Pool;

/// Where a client goes: its pool, the route that chose it, and whether it
/// speaks TLS (then spliced negotiates with the server first).
pub(super) struct Destination {
    pub(super) pool: Arc<Pool>,
    pub(super) route: Option<Box<RouteTag>>,
    pub(super) tls: Option<TlsStyle>,
}

impl Destination {
    /// A listener's own pool, without routes.
    pub(super) fn own(listener: &Listener) -> Destination {
        Destination {
            // A listener without routes has exactly its own pool.
            pool: Arc::clone(&listener.pools[0]),
            route: None,
            tls: None,
        }
    }
}

/// Splits what goes to the server ahead of the client's bytes (`ahead`,
/// whose first `header_len` bytes are the `send-proxy` header) for a TLS
/// client: classic TLS sends the header and an SSLRequest itself, then the
/// hello as read-ahead bytes once the server agreed; direct TLS sends the
/// header and the hello itself, and nothing is read ahead. Others keep
/// `ahead` as it is.
pub(super) fn for_tls(
    ahead: Vec<u8>,
    header_len: u16,
    tls: Option<TlsStyle>,
) -> (Vec<u8>, u16, Option<Box<Negotiation>>) {
    let Some(style) = tls else {
        return (ahead, header_len, None);
    };
    let (header, hello) = ahead.split_at(usize::from(header_len).min(ahead.len()));
    let mut send = header.to_vec();
    let ahead = match style {
        TlsStyle::Classic => {
            send.extend_from_slice(&pgwire::SSL_REQUEST);
            hello.to_vec()
        }
        TlsStyle::Direct => {
            send.extend_from_slice(hello);
            Vec::new()
        }
    };
    (ahead, 0, Some(Box::new(Negotiation::new(style, send))))
}

impl Worker {
    /// Where a client of `listener` that showed `shown` goes: its own pool,
    /// or the pool of the first route that takes it (`None`: none does).
    pub(super) fn destination(
        &self,
        listener: &Listener,
        tls: Option<TlsStyle>,
        shown: &Shown,
    ) -> Option<Destination> {
        if !listener.has_routes() {
            return Some(Destination::own(listener));
        }
        let routed = listener.route(shown)?;
        Some(Destination {
            pool: routed.pool,
            route: Some(Box::new(RouteTag {
                position: routed.position,
                server_name: shown.server_name.as_deref().map(Into::into),
            })),
            tls,
        })
    }

    /// Resets a client no route takes (or whose opening cannot be
    /// routed), counts it and logs it (at most once a second, with a
    /// count of the lines held back).
    pub(super) fn refuse_unrouted(
        &mut self,
        client: TcpStream,
        addr: SocketAddr,
        listener: &Listener,
        why: &str,
        now: Instant,
    ) {
        let counter = &listener.counters(self.index).refused_no_route;
        self.reset_refused(client, addr, listener, counter, why, now);
    }
}

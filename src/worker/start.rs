//! A relay's start: the first upstream connect of an admitted client,
//! holding it when no server takes it (`queue-timeout`), turning it away
//! when it may not wait, and making the relay once a connect started.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;

use super::routing::{self, Destination};
use super::{farewell, next_relay_id, preface, Worker};
use crate::config::Protocol;
use crate::error::{Op, RelayError, Side};
use crate::listener::{Admission, Listener};
use crate::relay::report::ClosedLine;
use crate::relay::{Accepted, Relay, Unstarted};
use crate::stats::{CloseReason, CounterBlock};
use crate::upstream::Round;

/// An admitted client whose relay is about to start.
pub(super) struct Arrival {
    pub(super) client: TcpStream,
    pub(super) client_addr: SocketAddr,
    /// The address the client connected to, when a PROXY header named it.
    pub(super) local: Option<SocketAddr>,
    pub(super) listener: Arc<Listener>,
    pub(super) admission: Admission,
    /// The bytes the client sent already (after any PROXY header).
    pub(super) preread: Vec<u8>,
    /// When the client was accepted.
    pub(super) since: Instant,
}

impl Worker {
    /// Starts the relay's upstream connect for `arrival` to `to`. Its
    /// `local` address and `preread` bytes, with `send-proxy`'s header in
    /// front, reach the server before anything else (after what spliced
    /// negotiates itself for a TLS client). A client no server takes now
    /// is held for one (`queue-timeout`), else closed.
    pub(super) fn start_relay(&mut self, arrival: Arrival, to: Destination, now: Instant) {
        let Arrival {
            client,
            client_addr,
            local,
            listener,
            admission,
            preread,
            since,
        } = arrival;
        let counters = listener.counters(self.index);
        CounterBlock::add(&counters.relays_accepted, 1);
        let id = next_relay_id();
        self.tune(&listener, &client, Side::Client, now);
        let Destination { pool, route, tls } = to;
        let (ahead, ahead_header) = preface::ahead(&pool, &client, client_addr, local, preread);
        let (ahead, ahead_header, negotiation) = routing::for_tls(ahead, ahead_header, tls);
        let unstarted = Unstarted {
            accepted: Accepted {
                id,
                listener: Arc::clone(&listener),
                pool: Arc::clone(&pool),
                route,
                client,
                client_addr,
                admission,
            },
            ahead,
            ahead_header,
            since,
            negotiation,
        };
        let mut round = Round::new(&pool, client_addr.ip());
        let upstream = match self.connect_next(id, &mut round, &listener, &pool, now) {
            Ok(Some(upstream)) => upstream,
            failed => {
                // A TLS client cannot be told anything, nor wait unheard.
                let tls = unstarted.negotiation.is_some();
                if failed.is_ok() && !tls {
                    if let Some(deadline) = self.hold_deadline(&pool, since, now) {
                        let after_failure = !round.tried_none();
                        self.hold(unstarted, deadline, false, after_failure, now);
                        return;
                    }
                }
                let reason = match failed {
                    Err(_) => CloseReason::LocalError,
                    Ok(_) if round.tried_none() => CloseReason::NoServer,
                    Ok(_) => CloseReason::ConnectFailed,
                };
                listener.counters(self.index).closed(reason);
                if reason == CloseReason::NoServer {
                    // One line per listener and second, however many
                    // clients a failover turns away.
                    let limit = self.no_server_warnings.entry(listener.id).or_default();
                    if let Some(held_back) = limit.allow(now) {
                        tracing::warn!(
                            worker = self.index,
                            listener = %listener.label(),
                            pool = pool.name().map(tracing::field::display),
                            client = %client_addr,
                            reason = %reason,
                            similar_closes_held_back = held_back,
                            "relay closed: no server of the pool takes new relays (none answers in its role, or several claim primary)"
                        );
                    }
                } else {
                    ClosedLine {
                        relay: id,
                        client: Some(client_addr),
                        listener: listener.label(),
                        upstream: None,
                        traffic: None,
                        route: None,
                        reason,
                        error: None,
                    }
                    .log();
                }
                let Unstarted {
                    accepted,
                    ahead,
                    ahead_header,
                    ..
                } = unstarted;
                match farewell::TurnAway::of_close(reason).filter(|_| !tls) {
                    Some(why) => {
                        let preread = ahead
                            .get(usize::from(ahead_header)..)
                            .unwrap_or_default()
                            .to_vec();
                        let leaving = farewell::Leaving {
                            client: accepted.client,
                            client_addr,
                            preread,
                        };
                        self.turn_away(leaving, &listener, Some(&*pool), why, now);
                    }
                    None if tls => farewell::let_go(accepted.client, true),
                    None => {}
                }
                return;
            }
        };
        self.launch(unstarted, upstream, round, now);
    }

    /// Makes the relay of a client whose upstream connect (attempt one
    /// of `round`) just started, with the bytes meant for the server first.
    pub(super) fn launch(
        &mut self,
        client: Unstarted,
        upstream: (TcpStream, SocketAddr),
        round: Round,
        now: Instant,
    ) {
        let Unstarted {
            accepted,
            ahead,
            ahead_header,
            since,
            negotiation,
        } = client;
        // A PostgreSQL client whose connects all fail is still answered:
        // keep what it sent until a server takes it.
        let first_bytes = ahead.get(usize::from(ahead_header)..).unwrap_or_default();
        let first_bytes = (accepted.listener.config.protocol == Protocol::Postgres
            && negotiation.is_none()
            && !first_bytes.is_empty())
        .then(|| first_bytes.to_vec());
        let mut relay = Relay::new(accepted, upstream, round, now);
        relay.resume(since, ahead_header, negotiation);
        if let Some(bytes) = first_bytes {
            relay.keep_first_bytes(bytes);
        }
        if let Err(e) = relay.read_ahead(&ahead, &mut self.pools) {
            let e = RelayError::new(Side::Internal, Op::Read, e);
            if let Some(key) = self.admit(relay, now) {
                self.close(key, CloseReason::Internal, Some(&e), now);
            }
            return;
        }
        self.admit(relay, now);
    }
}

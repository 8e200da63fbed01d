//! A relay's start: the first upstream connect of an admitted client,
//! holding it when no server takes it (`queue-timeout`), turning it away
//! when it may not wait, and making the relay once a connect started.

use super::*;

impl Worker {
    /// Starts a relay's upstream connect. `local` is the address the
    /// client connected to when a PROXY header named it; `preread` are
    /// bytes the client sent already. Both, with `send-proxy`'s header in
    /// front, reach the server before anything else (after what spliced
    /// negotiates itself for a TLS client). `since`: when the client was
    /// accepted. A client no server takes now is held for one
    /// (`queue-timeout`), else closed.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_relay(
        &mut self,
        client: TcpStream,
        client_addr: SocketAddr,
        local: Option<SocketAddr>,
        listener: Arc<Listener>,
        admission: Admission,
        preread: Vec<u8>,
        since: Instant,
        to: Destination,
        now: Instant,
    ) {
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
                    tracing::info!(
                        relay = id,
                        listener = %listener.label(),
                        client = %client_addr,
                        reason = %reason,
                        "relay closed"
                    );
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
                        self.turn_away(
                            accepted.client,
                            client_addr,
                            &listener,
                            Some(&*pool),
                            preread,
                            why,
                            now,
                        );
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
        relay.core.accepted_at(since);
        relay.ahead_header = ahead_header;
        relay.negotiation = negotiation;
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

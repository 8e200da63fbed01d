//! Cancel requests: a PostgreSQL CancelRequest sent on to every server of
//! every pool the listener can send clients to, each over its own
//! connection, written once connected and closed.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;
use mio::Interest;

use super::super::Worker;
use super::{Entry, CANCEL_LEN};
use crate::stats::CounterBlock;
use crate::token;

use crate::upstream::{self, Connect};

/// A CancelRequest on its way to one server.
pub(super) struct CancelSend {
    pub(super) stream: TcpStream,
    pub(super) server: SocketAddr,
    pub(super) packet: [u8; CANCEL_LEN],
    pub(super) deadline: Instant,
}

impl Worker {
    /// An event on a cancel request's connect: once connected, the
    /// request is written and the connection closed.
    pub(super) fn on_cancel_event(&mut self, key: usize) {
        let Some(Entry::Cancel(c)) = self.prefaces.entries.get_mut(key) else {
            return;
        };
        // Readiness is not known here: confirm with getpeername.
        let outcome = upstream::connect_result(&c.stream, false);
        match outcome {
            Connect::Pending => {}
            Connect::Established => {
                // Sixteen bytes into an empty send buffer.
                if let Err(e) = c.stream.write_all(&c.packet) {
                    tracing::debug!(upstream = %c.server, error = %e, "cancel request not sent");
                }
                self.prefaces.entries.remove(key);
            }
            Connect::Lost(e) | Connect::Failed(e) => {
                tracing::debug!(upstream = %c.server, error = %e, "cancel request not sent: connect failed");
                self.prefaces.entries.remove(key);
            }
        }
    }

    /// Sends a CancelRequest to every server of every pool of the client's
    /// listener (its own, or each its routes lead to) and closes the
    /// client, as PostgreSQL itself does after one.
    pub(super) fn fan_out_cancel(&mut self, key: usize, packet: [u8; CANCEL_LEN], now: Instant) {
        let p = self.take_pending(key);
        let listener = Arc::clone(&p.listener);
        CounterBlock::add(&listener.counters(self.index).pg_cancel_requests, 1);
        let deadline = now
            + listener
                .config
                .timeouts
                .connect
                .unwrap_or(listener.config.first_packet_timeout);
        let mut servers: Vec<SocketAddr> = listener
            .pools
            .iter()
            .flat_map(|p| {
                p.members()
                    .servers
                    .iter()
                    .map(|s| s.addr)
                    .collect::<Vec<_>>()
            })
            .collect();
        servers.sort();
        servers.dedup();
        let mut sent = 0;
        for addr in servers {
            let mut stream = match TcpStream::connect(addr) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(upstream = %addr, error = %e, "cancel request not sent: connect failed");
                    continue;
                }
            };
            let entry = self.prefaces.entries.vacant_entry();
            if self
                .poll
                .registry()
                .register(&mut stream, token::preface(entry.key()), Interest::WRITABLE)
                .is_err()
            {
                continue;
            }
            entry.insert(Entry::Cancel(CancelSend {
                stream,
                server: addr,
                packet,
                deadline,
            }));
            sent += 1;
        }
        self.prefaces.wake_by(deadline);
        tracing::info!(
            worker = self.index,
            listener = %listener.label(),
            client = %p.client_addr,
            servers = sent,
            "postgres cancel request sent to every server of the listener's pools"
        );
    }
}

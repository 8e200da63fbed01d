//! A probe on a non-blocking socket, for a mio worker; and a blocking
//! wrapper around it for the CLI and the tests.
//!
//! The worker registers [`ProbeConn::stream`] under a token of its own for
//! READABLE | WRITABLE, calls [`ProbeConn::on_ready`] on every event for
//! that token and [`ProbeConn::on_deadline`] when its timer for
//! [`ProbeConn::deadline`] fires, and drops the connection once either
//! returns a verdict. Readiness is edge-triggered, so each call reads and
//! writes until the socket would block.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::{CheckSpec, Probe, Step, Verdict};

pub struct ProbeConn {
    stream: TcpStream,
    probe: Probe,
    target: SocketAddr,
    connected: bool,
    out: Vec<u8>,
    written: usize,
    started: Instant,
    deadline: Instant,
    verdict: Option<Verdict>,
}

impl ProbeConn {
    /// Starts a non-blocking connect to the check's target for `server`.
    /// An immediate failure is already the verdict.
    pub fn connect(
        spec: &CheckSpec,
        server: SocketAddr,
        now: Instant,
        timeout: Duration,
    ) -> Result<ProbeConn, Verdict> {
        let target = spec.target(server);
        let stream = TcpStream::connect(target).map_err(|e| connect_failed(target, &e))?;
        Ok(ProbeConn {
            stream,
            probe: Probe::new(spec, target),
            target,
            connected: false,
            out: Vec::new(),
            written: 0,
            started: now,
            deadline: now + timeout,
            verdict: None,
        })
    }

    /// To register and deregister under the worker's token.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// A PostgreSQL primary's timeline, once the probe's answer gave it.
    pub fn timeline(&self) -> Option<u32> {
        self.probe.timeline()
    }

    /// Where the server is in its replication stream, once its role
    /// answer said.
    pub fn position(&self) -> Option<super::lag::Position> {
        self.probe.position()
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Drives the conversation as far as the socket allows.
    pub fn on_ready(&mut self, now: Instant) -> Option<Verdict> {
        if self.verdict.is_none() {
            if let Err(v) = self.drive() {
                self.finish(v);
            }
        }
        if self.verdict.is_none() {
            return self.on_deadline(now);
        }
        self.verdict.clone()
    }

    /// The verdict if the deadline passed.
    pub fn on_deadline(&mut self, now: Instant) -> Option<Verdict> {
        if self.verdict.is_none() && now >= self.deadline {
            let phase = if self.connected {
                self.probe.phase()
            } else {
                "connecting"
            };
            let ms = (self.deadline - self.started).as_millis();
            self.finish(Verdict::down(format!(
                "{} timed out after {ms} ms while {phase}",
                self.target
            )));
        }
        self.verdict.clone()
    }

    /// Err carries the verdict; Ok means "wait for the next event".
    fn drive(&mut self) -> Result<(), Verdict> {
        if !self.connected {
            // mio's recipe: take_error, then peer_addr tells a finished
            // connect from a spurious wakeup.
            if let Ok(Some(e)) | Err(e) = self.stream.take_error() {
                return Err(connect_failed(self.target, &e));
            }
            match self.stream.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(connect_failed(self.target, &e)),
            }
            self.connected = true;
            let step = self.probe.start();
            self.take(step)?;
        }
        loop {
            self.flush()?;
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(self.probe.on_eof()),
                Ok(n) => {
                    let step = self.probe.on_bytes(&buf[..n]);
                    self.take(step)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Verdict::down(format!(
                        "{} read failed while {}: {e}",
                        self.target,
                        self.probe.phase()
                    )))
                }
            }
        }
    }

    fn take(&mut self, step: Step) -> Result<(), Verdict> {
        match step {
            Step::Send(bytes) => {
                self.out.extend_from_slice(&bytes);
                Ok(())
            }
            Step::NeedMore => Ok(()),
            Step::Done(v) => Err(v),
        }
    }

    fn flush(&mut self) -> Result<(), Verdict> {
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Verdict::down(format!(
                        "{} write failed while {}: {e}",
                        self.target,
                        self.probe.phase()
                    )))
                }
            }
        }
        self.out.clear();
        self.written = 0;
        Ok(())
    }

    fn finish(&mut self, v: Verdict) {
        // A few bytes into an empty send buffer: one try is enough, and a
        // failure changes nothing.
        let bye = self.probe.goodbye();
        if self.connected && !bye.is_empty() {
            let _ = self.stream.write(bye);
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        self.verdict = Some(v);
    }
}

fn connect_failed(target: SocketAddr, e: &io::Error) -> Verdict {
    Verdict::down(format!("connect to {target} failed: {e}"))
}

/// Runs one probe to its end on the calling thread, within `timeout`.
pub fn probe_blocking(spec: &CheckSpec, server: SocketAddr, timeout: Duration) -> Verdict {
    let start = Instant::now();
    let mut conn = match ProbeConn::connect(spec, server, start, timeout) {
        Ok(c) => c,
        Err(v) => return v,
    };
    let mut run = || -> io::Result<Verdict> {
        let mut poll = Poll::new()?;
        let token = Token(0);
        poll.registry().register(
            conn.stream(),
            token,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let mut events = Events::with_capacity(4);
        loop {
            let now = Instant::now();
            if let Some(v) = conn.on_ready(now) {
                return Ok(v);
            }
            poll.poll(
                &mut events,
                Some(conn.deadline().saturating_duration_since(now)),
            )?;
        }
    };
    run().unwrap_or_else(|e| Verdict::down(format!("internal: probe event loop failed: {e}")))
}

//! A fake Redis server for the health-check tests: it answers the probe's
//! `PING` and `INFO replication` with the role and replication offset the
//! test sets, and to a client its tag byte, then an echo of what it sent.
//! While `stalled`, a probe gets no answer (its check times out).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::peers::{serve, Server};

pub struct FakeRedis {
    pub server: Server,
    /// Whether it answers as master (else as a replica).
    pub master: Arc<AtomicBool>,
    /// The replication offset it reports.
    pub offset: Arc<AtomicU64>,
    /// When it first answered a probe as master.
    pub promoted_seen: Arc<Mutex<Option<Instant>>>,
    /// When each client's first bytes arrived.
    pub first_bytes: Arc<Mutex<Vec<Instant>>>,
    /// While set, probes get no answer.
    pub stalled: Arc<AtomicBool>,
}

/// A fake Redis on 127.0.0.1 that tags its clients with `tag` and starts
/// as master or replica.
pub fn fake_redis(tag: u8, master: bool) -> FakeRedis {
    let master = Arc::new(AtomicBool::new(master));
    let offset = Arc::new(AtomicU64::new(0));
    let promoted_seen = Arc::new(Mutex::new(None));
    let first_bytes = Arc::new(Mutex::new(Vec::new()));
    let stalled = Arc::new(AtomicBool::new(false));
    let (flag, at, seen, firsts, stall) = (
        Arc::clone(&master),
        Arc::clone(&offset),
        Arc::clone(&promoted_seen),
        Arc::clone(&first_bytes),
        Arc::clone(&stalled),
    );
    let server = serve(move |mut s: TcpStream| {
        let mut buf = [0u8; 4096];
        let mut tagged = false;
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let text = String::from_utf8_lossy(&buf[..n]);
            let probe = text.starts_with("*1\r\n$4\r\nPING") || text.contains("$11\r\nreplication");
            if probe && stall.load(Ordering::SeqCst) {
                // No answer while stalled (bounded, so no thread outlives
                // a test by much), the connection held open; then the
                // answer, if the probe still waits.
                let until = Instant::now() + Duration::from_secs(60);
                while stall.load(Ordering::SeqCst) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            let reply = if text.starts_with("*1\r\n$4\r\nPING") {
                b"+PONG\r\n".to_vec()
            } else if text.contains("$11\r\nreplication") {
                let master = flag.load(Ordering::SeqCst);
                if master {
                    seen.lock().unwrap().get_or_insert_with(Instant::now);
                }
                let r = if master { "master" } else { "slave" };
                let at = at.load(Ordering::SeqCst);
                let body = format!(
                    "# Replication\r\nrole:{r}\r\nconnected_slaves:0\r\n\
                     master_replid:f00d\r\nslave_repl_offset:{at}\r\nmaster_repl_offset:{at}\r\n"
                );
                format!("${}\r\n{body}\r\n", body.len()).into_bytes()
            } else {
                let mut out = Vec::new();
                if !tagged {
                    firsts.lock().unwrap().push(Instant::now());
                    out.push(tag);
                    tagged = true;
                }
                out.extend_from_slice(&buf[..n]);
                out
            };
            if s.write_all(&reply).is_err() {
                return;
            }
        }
    });
    FakeRedis {
        server,
        master,
        offset,
        promoted_seen,
        first_bytes,
        stalled,
    }
}
